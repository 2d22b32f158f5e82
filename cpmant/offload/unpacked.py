"""int8 layers under a memory budget multiplied without fbgemm's prepacked copy.

The int8 kernel of `QuantLinear` (cpmant.modules.quant) prepacks each weight for fbgemm once and keeps the pack: fine
for a model held in memory, ruinous for a streamed layer, whose weights are bound anew at every step, so its packs
are rebuilt every step and dropped after (`drop_packs`). Measured on the 10B's shapes (AMD EPYC, 2 threads, loaded
machine): fbgemm's `linear_prepack` packs about 0.06 GB/s, 3.2 s for one 193 MB layer, against 33 ms for the
layer's one-token matmuls. `torch._weight_int8pack_mm` multiplies the int8 weight as it lies (per-row scales, the
activations in bf16 or fp32): nothing to pack, nothing held beside the weight. One row (decoding): 5.8 GB/s of
weights in bf16 on a CPU with AVX512-BF16 (fbgemm prepacked: 2.4 GB/s), relative error 0.3% against the fp32
product of the int8 weight (fbgemm's per-tensor uint8 activations: 0.9%); in fp32 about 0.6 GB/s, still ten times
the packing. Many rows (the prompt) in bf16: 0.38 GB/s, still faster than packing; in fp32 far slower, so without
bf16 the prompt keeps fbgemm's path.

`use_unpacked_kernel(model, plan)` (load_with_budget calls it on the CPU) turns the large QuantLinears (at least
KERNEL_MIN_WEIGHTS weights; smaller ones keep their float copies) of the streamed layers, and on a CPU with native
bf16 those of the resident layers too (their packs would be held outside the budget's plan), into `UnpackedQuantLinear`:
the same module and tensors, another forward. The fused one-token step (cpmant.decode) then computes those sub-blocks
module by module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules.quant import KERNEL_MIN_WEIGHTS, QuantLinear, use_int8_kernel
from ..precision import _cpu_flags

_OK = hasattr(torch, "_weight_int8pack_mm")
_BF16 = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())  # where bf16 activations multiply natively
# Up to this many rows the kernel takes a weight at any 8-byte offset, as the mapped file's views are; from 4 rows on
# it needs a 64-byte aligned one (torch 2.13 crashes otherwise; measured 1-3 rows at offsets 8, 24, 56: same results)
_ANY_OFFSET_ROWS = 3


class UnpackedQuantLinear(QuantLinear):
    """A QuantLinear whose int8 kernel multiplies the weight as it lies (`torch._weight_int8pack_mm`), no pack."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.dim_in
        if not (_OK and use_int8_kernel(x) and (_BF16 or rows == 1)):
            return super().forward(x)  # plain forwards (exact, dequantized), and the prompt without bf16
        dt = torch.bfloat16 if _BF16 else torch.float32
        x2 = x.reshape(rows, self.dim_in).to(dt).contiguous()
        w, s = self.weight, (self.weight_scale * self.scale).to(dt)
        if rows <= _ANY_OFFSET_ROWS or w.data_ptr() % 64 == 0:
            y = torch._weight_int8pack_mm(x2, w, s)
        elif rows <= 4 * _ANY_OFFSET_ROWS:  # a few rows (beam search) on a view of the mapped file: a few calls
            y = torch.cat([torch._weight_int8pack_mm(c, w, s) for c in x2.split(_ANY_OFFSET_ROWS)])
        else:  # the prompt: one aligned copy of the weight
            y = torch._weight_int8pack_mm(x2, w.clone(), s)
        return y.view(*x.shape[:-1], self.dim_out).to(x.dtype)


def use_unpacked_kernel(model: nn.Module, plan) -> int:
    """Turn the large QuantLinears of the streamed layers (and of the resident ones where bf16 is native and
    something streams) into UnpackedQuantLinear; returns how many. Nothing changes where torch lacks the kernel."""
    if not _OK or not plan.streamed:
        return 0
    layers = list(plan.streamed) + (list(plan.resident) if _BF16 else [])
    n = 0
    for i in layers:
        for m in model.encoder.layers[i].modules():
            if type(m) is QuantLinear and m.dim_in * m.dim_out >= KERNEL_MIN_WEIGHTS:  # streamed: unbound now
                m.__class__ = UnpackedQuantLinear  # same state, another forward (no copy of anything)
                n += 1
    return n
