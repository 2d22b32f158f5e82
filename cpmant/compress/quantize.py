"""Int8 quantization, the method: post-training int8 weights, and a small quantization-aware-training switch.

`quantize_model` turns every Linear of the encoder (project_q/k/v, attention_out, w_0, w_1, w_out) into a
`cpmant.modules.quant.QuantLinear` (int8 weight + fp32 per-output-channel scale, symmetric, scale = max|w_row| / 127)
and sets `quantization="int8"` in the config. Embeddings, norms and the position bias stay floating point.
A saved int8 model is rebuilt by `cpmant.factory.build_model(config)`, not by this module.

QAT: `enable_qat(model)` swaps the encoder's Linear modules for `QATLinear`, which shares the same Parameter and
uses `fake_quant_int8(weight)` (round to the int8 grid, straight-through gradient) in every forward, train and eval,
so the model computes what its int8 version will; state-dict keys and optimizer references are unchanged.
`disable_qat(model)` swaps them back.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..factory import build_model
from ..model import CPMAnt, Linear
from ..modules.quant import QMAX, QuantLinear, encoder_linears, int8_per_row, swap_in_quant_linears

__all__ = ["quantize_model", "fake_quant_int8", "QATLinear", "enable_qat", "disable_qat",
           # homes elsewhere, importable from here for existing callers
           "QMAX", "QuantLinear", "encoder_linears", "int8_per_row", "build_quantized_skeleton"]


@torch.no_grad()
def quantize_model(model: CPMAnt) -> CPMAnt:
    """A new model whose encoder Linears are int8 `QuantLinear`s; config.quantization = "int8". Input untouched."""
    if model.config.quantization == "int8":
        return copy.deepcopy(model)
    new = copy.deepcopy(model)  # a model in QAT: QATLinear is a Linear, its weight is quantized the same way
    swap_in_quant_linears(new, from_weights=True)
    new.config = new.config.replace(quantization="int8")
    return new


def build_quantized_skeleton(config: ModelConfig, device=None) -> CPMAnt:
    """Deprecated alias of `cpmant.factory.build_model` (kept for existing imports)."""
    return build_model(config, device=device)


# ---- quantization-aware training -----------------------------------------------------------------
def fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    """w rounded to its per-row symmetric int8 grid in the forward; identity gradient (straight-through)."""
    scale = (w.detach().abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(torch.finfo(w.dtype).tiny)
    q = torch.round(w.detach() / scale).clamp(-QMAX, QMAX) * scale
    return w + (q - w).detach()


class QATLinear(Linear):
    """A Linear computing with fake_quant_int8(weight); shares the Parameter of the Linear it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant_int8(self.weight) * self.scale)


def _swap_class(model: CPMAnt, src: type, dst: type) -> int:
    """Replace every encoder module of exactly type `src` by a `dst` that shares its weight Parameter."""
    n = 0
    for parent, name, old in encoder_linears(model, src):
        if type(old) is not src:
            continue
        with torch.device("meta"):
            new = dst(old.dim_in, old.dim_out)
        new.weight = old.weight
        setattr(parent, name, new)
        n += 1
    return n


def enable_qat(model: CPMAnt) -> int:
    """Swap the encoder's Linears for QATLinear (same Parameter objects); returns how many were swapped."""
    return _swap_class(model, Linear, QATLinear)


def disable_qat(model: CPMAnt) -> int:
    """Undo enable_qat; returns how many modules were swapped back."""
    return _swap_class(model, QATLinear, Linear)
