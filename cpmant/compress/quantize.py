"""Post-training int8 weights with per-output-channel scales, and a small quantization-aware-training switch.

`quantize_model` turns every Linear of the encoder (project_q/k/v, attention_out, w_0, w_1, w_out) into a
`QuantLinear`: `weight` is an int8 buffer (dim_out, dim_in) and `weight_scale` an fp32 buffer (dim_out,), symmetric,
scale = max|w_row| / 127. The forward dequantizes and keeps CPM-Live's scaling:
y = x @ (weight * scale[:, None]).T / sqrt(dim_in). Embeddings, norms and the position bias stay floating point.
The config says `quantization="int8"`; `build_quantized_skeleton(config)` makes the model a saved state dict
(`...weight` int8, `...weight_scale` fp32) loads into. Weight-only int8: activations and matmuls stay float.

QAT: `enable_qat(model)` swaps the encoder's Linear modules for `QATLinear`, which shares the same Parameter and
uses `fake_quant_int8(weight)` (round to the int8 grid, straight-through gradient) in every forward, train and eval,
so the model computes what its int8 version will; state-dict keys and optimizer references are unchanged.
`disable_qat(model)` swaps them back.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model import CPMAnt, Linear

QMAX = 127


def encoder_linears(model: nn.Module, cls=Linear) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, module) of every `cls` module under model.encoder."""
    out = []
    for parent in model.encoder.modules():
        for name, child in parent.named_children():
            if isinstance(child, cls):
                out.append((parent, name, child))
    return out


def int8_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per row): symmetric, scale = max|row| / 127 (1 for an all-zero row)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


class QuantLinear(nn.Module):
    """Linear with int8 weight (dim_out, dim_in) and fp32 per-row scale; y = x @ (W_q * s).T / sqrt(dim_in)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dim_in, self.dim_out = dim_in, dim_out
        self.scale = 1.0 / math.sqrt(dim_in)
        self.register_buffer("weight", torch.zeros(dim_out, dim_in, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(dim_out, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: Linear) -> "QuantLinear":
        q = cls(linear.dim_in, linear.dim_out).to(linear.weight.device)
        q.weight, q.weight_scale = int8_per_row(linear.weight)
        return q

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this module computes with (without the 1/sqrt(dim_in))."""
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim_in) -> (..., dim_out)
        # the 1/sqrt(dim_in) folded into the per-row scale: one (dim_out, dim_in) dequantized weight per call
        w = self.weight.to(x.dtype) * (self.weight_scale.float() * self.scale).to(x.dtype)[:, None]
        return F.linear(x, w)

    def extra_repr(self) -> str:
        return f"dim_in={self.dim_in}, dim_out={self.dim_out}, int8"


def _swap_linears(model: CPMAnt, quantize_weights: bool) -> None:
    for parent, name, lin in encoder_linears(model):
        if quantize_weights:
            setattr(parent, name, QuantLinear.from_linear(lin))
        else:
            setattr(parent, name, QuantLinear(lin.dim_in, lin.dim_out).to(lin.weight.device))


@torch.no_grad()
def quantize_model(model: CPMAnt) -> CPMAnt:
    """A new model whose encoder Linears are int8 `QuantLinear`s; config.quantization = "int8". Input untouched."""
    if model.config.quantization == "int8":
        return copy.deepcopy(model)
    new = copy.deepcopy(model)  # a model in QAT: QATLinear is a Linear, its weight is quantized the same way
    _swap_linears(new, quantize_weights=True)
    new.config = new.config.replace(quantization="int8")
    return new


def build_quantized_skeleton(config: ModelConfig, device=None) -> CPMAnt:
    """An int8 model of `config` (quantization="int8"; MoE fields honoured) to `load_state_dict` a saved one into.

    Weights are placeholders (random floats, zero int8) until the state dict is loaded.
    """
    if config.moe_experts:
        from .moefy import build_moe_skeleton  # it quantizes too when config.quantization is set

        return build_moe_skeleton(config, device=device)
    with torch.device(device or "cpu"):
        model = CPMAnt(config)
    if config.quantization == "int8":
        _swap_linears(model, quantize_weights=False)
    return model


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
