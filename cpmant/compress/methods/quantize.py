"""Int8 quantization, the recipe method `quantize`: post-training int8 weights.

`quantize_model` turns every Linear of the encoder (project_q/k/v, attention_out, w_0, w_1, w_out) into a
`cpmant.modules.quant.QuantLinear` (int8 weight + fp32 per-output-channel scale, symmetric, scale = max|w_row| / 127)
and sets `quantization="int8"` in the config. Embeddings, norms and the position bias stay floating point.
A saved int8 model is rebuilt by `cpmant.factory.build_model(config)`, not by this module.

QAT (`enable_qat`, `disable_qat`: fake-int8 weights while training) is in `cpmant.modules.quant`: `distill` with
`qat: true` uses it.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field

from ...model import CPMAnt
from ...modules.quant import swap_in_quant_linears
from .base import MethodConfig, MethodContext, register_method

__all__ = ["QuantizeConfig", "quantize_model"]


@torch.no_grad()
def quantize_model(model: CPMAnt) -> CPMAnt:
    """A new model whose encoder Linears are int8 `QuantLinear`s; config.quantization = "int8". Input untouched."""
    if model.config.quantization == "int8":
        return copy.deepcopy(model)
    new = copy.deepcopy(model)  # a model in QAT: QATLinear is a Linear, its weight is quantized the same way
    swap_in_quant_linears(new, from_weights=True)
    new.config = new.config.replace(quantization="int8")
    return new


# ---- the recipe method ---------------------------------------------------------------------------------------------
class QuantizeConfig(MethodConfig):
    name: Literal["quantize"] = "quantize"
    bits: Literal[8] = Field(8, description="int8 weights with per-output-channel scales")

    def summary(self) -> str:
        return f"int{self.bits} weights"


@register_method("quantize", QuantizeConfig, description="int8 weights, per-output-channel scales")
def apply(ctx: MethodContext, cfg: QuantizeConfig):
    ctx.report["quantize"] = {"bits": cfg.bits}
    return quantize_model(ctx.student)
