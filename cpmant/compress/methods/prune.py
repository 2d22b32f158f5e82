"""Structured pruning as a recipe method: keep shares of the parent's sub-layers, heads and FFN width, chosen by
importance on held-out rows (the algorithm: cpmant/compress/prune.py)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from ...config import ModelConfig
from .base import MethodConfig, MethodContext, register_method


class PruneConfig(MethodConfig):
    name: Literal["prune"] = "prune"
    att_keep: float = Field(1.0, gt=0, le=1, description="share of attention sub-layers kept")
    ffn_keep: float = Field(1.0, gt=0, le=1, description="share of FFN sub-layers kept")
    heads_keep: float = Field(1.0, gt=0, le=1, description="share of attention heads kept")
    dim_ff_keep: float = Field(1.0, gt=0, le=1, description="share of FFN width kept")

    def check_order(self, names: list[str], index: int) -> str | None:
        late = [n for n in names[:index] if n in ("quantize", "moefy")]
        if late:
            return f"prune needs a dense fp model: put it before {', '.join(late)}"
        return None

    def summary(self) -> str:
        return ""  # the shape is in the description already

    def target_shape(self, base: ModelConfig) -> dict:
        """The student's shape on `base`: kept sub-layers, heads and dim_ff, rounded half up, at least one of each."""
        att0, ffn0 = base.kept()

        def keep(n: int, share: float) -> int:
            return max(1, math.floor(n * share + 0.5))  # half up: 4 heads x 62.5% keeps 3, not round()'s 2

        return {
            "att_layers": keep(att0, self.att_keep),
            "ffn_layers": keep(ffn0, self.ffn_keep),
            "num_heads": keep(base.num_heads, self.heads_keep),
            "dim_ff": keep(base.dim_ff, self.dim_ff_keep),
        }


@register_method("prune", PruneConfig, uses=("importance_rows", "batch_size"))
def apply(ctx: MethodContext, cfg: PruneConfig):
    """Structured pruning of sub-layers, heads and FFN neurons by importance (shares of the parent's shape)."""
    from ..prune import prune

    student, ctx.report["prune"] = prune(ctx.student, cfg.target_shape(ctx.teacher.config), ctx.importance_batches(),
                                         precision=ctx.precision)
    return student
