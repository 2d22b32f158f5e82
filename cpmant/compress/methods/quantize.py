"""int8 weight quantization as a recipe method (the algorithm: cpmant/compress/quantize.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import MethodConfig, MethodContext, register_method


class QuantizeConfig(MethodConfig):
    name: Literal["quantize"] = "quantize"
    bits: Literal[8] = Field(8, description="int8 weights with per-output-channel scales")

    def summary(self) -> str:
        return f"int{self.bits} weights"


@register_method("quantize", QuantizeConfig, description="int8 weights, per-output-channel scales")
def apply(ctx: MethodContext, cfg: QuantizeConfig):
    from ..quantize import quantize_model

    ctx.report["quantize"] = {"bits": cfg.bits}
    return quantize_model(ctx.student)
