"""The compression stage's config (recipes themselves live in recipe.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..configio import FrozenModel


class CompressConfig(FrozenModel):
    recipes: str = Field("all,int8", description="recipes for the lifecycle: names, `all`, or YAML paths")
    corpus: str | None = Field(None, description="corpus for importance, distillation and evaluation (None = default)")
    valid_fraction: float = Field(0.05, gt=0, lt=0.5, description="held-out share (same split as pretraining)")
    seed: int = Field(0, description="split and data order")
    importance_rows: int = Field(48, ge=1, description="held-out rows that score importance")
    eval_rows: int = Field(64, ge=1, description="held-out rows that measure LM loss")
    batch_size: int = Field(16, ge=1, description="rows per forward pass when scoring and evaluating")
    gen_tokens: int = Field(32, ge=1, description="new tokens per prompt when measuring generation speed")
    distill_steps: int | None = Field(None, ge=0, description="overrides every recipe's distill.steps when set")
    distill_batch_size: int | None = Field(None, ge=1, description="overrides every recipe's distill batch size")
    backend: Literal["torch", "bmcook"] = Field("torch", description="torch anywhere; bmcook needs CUDA")
    output_dir: str | None = Field(None, description="None = $CPMANT_HOME/runs/compress-<base>")
