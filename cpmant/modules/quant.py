"""Int8 weights: `QuantLinear` stores an int8 weight (dim_out, dim_in) and an fp32 per-output-channel scale.

Symmetric per row: scale = max|w_row| / 127. The forward dequantizes and keeps CPM-Live's scaling:
y = x @ (weight * scale[:, None]).T / sqrt(dim_in). Weight-only: activations and matmuls stay floating point.
A saved int8 model's state dict holds `...weight` (int8) and `...weight_scale` (fp32) for each encoder Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Linear

QMAX = 127


def encoder_linears(model: nn.Module, cls: type = Linear) -> list[tuple[nn.Module, str, nn.Module]]:
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
        """The int8 version of a float Linear (its weights rounded to the per-row grid)."""
        with torch.device(linear.weight.device):
            q = cls(linear.dim_in, linear.dim_out)
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


def swap_in_quant_linears(model: nn.Module, from_weights: bool) -> int:
    """Replace every encoder `Linear` by a `QuantLinear` (from its weights, or empty to load a state dict into)."""
    n = 0
    for parent, name, lin in encoder_linears(model):
        if from_weights:
            new = QuantLinear.from_linear(lin)
        else:
            with torch.device(lin.weight.device):
                new = QuantLinear(lin.dim_in, lin.dim_out)
        setattr(parent, name, new)
        n += 1
    return n
