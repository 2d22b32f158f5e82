"""MoEfication as a recipe method: each FFN split into experts with a router (the algorithm:
cpmant/compress/moefy.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import MethodConfig, MethodContext, register_method


class MoefyConfig(MethodConfig):
    name: Literal["moefy"] = "moefy"
    num_experts: int = Field(8, ge=2, description="experts per FFN")
    top_k: int = Field(2, ge=1, description="experts used per token")
    cluster: Literal["activation", "weight"] = Field("activation", description="neuron clustering")
    max_tokens: int = Field(2048, ge=1, description="held-out tokens sampled for activation clustering")

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise ValueError("top_k must not exceed num_experts")
        return self

    def summary(self) -> str:
        return f"MoE {self.num_experts} experts, top {self.top_k}"


@register_method("moefy", MoefyConfig, uses=("importance_rows", "batch_size"),
                 description="MoEfication: FFN neurons clustered into experts, top-k routing")
def apply(ctx: MethodContext, cfg: MoefyConfig):
    from ..moefy import moefy

    student, ctx.report["moefy"] = moefy(ctx.student, ctx.importance_batches(), cfg.num_experts, cfg.top_k,
                                         cluster=cfg.cluster, max_tokens=cfg.max_tokens, precision=ctx.precision)
    return student
