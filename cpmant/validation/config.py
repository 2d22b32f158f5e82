"""The validation stage's config (`validate:` in a LifecycleConfig): what is measured and the promotion gates."""

from __future__ import annotations

from pydantic import Field

from ..configio import FrozenModel


class ValidateConfig(FrozenModel):
    promote: bool = Field(True, description="move `champion` to a candidate whose every gate passes")
