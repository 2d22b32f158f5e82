"""The delta-tuning stage's config (`tune:` in a LifecycleConfig)."""

from __future__ import annotations

from pydantic import Field

from ..configio import FrozenModel


class TuneConfig(FrozenModel):
    tasks: str = Field("demo-ccpm,demo-c3,demo-lcsts,demo-math23k", description="CUGE or demo task names, comma list")
    methods: str = Field("lora", description="delta methods, comma list (`full` = full fine-tuning baseline)")
    data: str | None = Field(None, description="folder of a CUGE task's raw files (None: $CUGE_DATA/<task>)")
