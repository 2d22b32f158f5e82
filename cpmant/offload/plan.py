"""The plan: which layers stay resident and which stream, under a budget, counting everything the process keeps.

A budget holds, above the baseline (`cpmant.offload.peak`: the process after torch's first use):
- the always-resident tensors (embeddings, position bias, the final norm);
- the resident layers (the first ones), each with the int8 kernel's caches it keeps (`cache_bytes`: fbgemm's
  packed copies, fused q/k/v and w_0/w_1 packs, float copies of small matrices; measured, cpmant.offload.caches);
- the streaming ring: the two largest streamed layers (mapped in: the one computing and the one prefetched) and
  the caches of the one computing (dropped when it is streamed out, `cpmant.modules.quant.drop_packs`);
- the headroom: activations and the KV cache for the rows and tokens to generate (`activation_bytes`), plus
  RUNTIME_SLACK, what generating costs beyond that and cannot be planned tensor by tensor (measured once, below).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import CpmantError
from .mapped import _Entry
from .sizes import _round_up_size, format_size

# Measured once (this machine, AMD EPYC with AVX-512, torch 2.x; d256 models of 8 and 24 layers, fp32 and int8, 0-24
# layers streamed), with the allocator bounded and torch warmed up (cpmant.offload.peak): the peak above the baseline
# minus the planned weights, int8 caches and activations was 2.5-4.5 MiB, in every run: code pages of the kernels
# first run at the model's shapes (about 1.5 MiB), torch's per-call buffers and glibc's bookkeeping. Nothing here can
# bound them tensor by tensor (they are the allocator's and the loader's), so the plan holds this much for them.
RUNTIME_SLACK = 8 * 2**20
DEFAULT_TOKENS = 64  # prompt + new tokens when the caller does not say (the CLI does)
_BIAS_BLOCK = 1 << 22  # cpmant.generate.BIAS_BLOCK_ELEMENTS: the decoding steps' attention bias, floats at a time


def activation_bytes(config, rows: int = 1, tokens: int = DEFAULT_TOKENS, prefill: Optional[int] = None) -> int:
    """Bytes of activations and KV cache of generating `tokens` positions (the prompt, its prompt_length and the
    new tokens) for `rows` rows (texts x beams), prefill of `prefill` positions (default all): fp32, as on the CPU.

    KV cache 2 x attention layers x rows x positions x heads x dim_head; the prefill's largest live set (hidden
    states, q/k/v, the gated FFN's two halves, and per head the bias, scores and softmax of every position pair);
    the logits (three live copies: model output, penalties, sampling); the decoding steps' bias block."""
    T = int(tokens) + int(config.prompt_length)
    P = T if prefill is None else int(prefill) + int(config.prompt_length)
    H, Dh, D, F = config.num_heads, config.dim_head, config.dim_model, config.dim_ff
    masks = config.mask_modules or [(False, False)] * config.num_layers
    att_layers = sum(1 for m in masks if not m[0])
    kv = 2 * att_layers * rows * T * H * Dh
    prefill_live = rows * P * (4 * D + 3 * H * Dh + 3 * F) + 3 * H * rows * P * P
    logits = 3 * rows * config.vocab_size
    bias = min(H * rows * T * T, _BIAS_BLOCK + H * rows * T)
    return 4 * (kv + prefill_live + logits + bias)


# ---- the plan: which layers stay, which stream ----------------------------------------------------------------
@dataclass
class OffloadPlan:
    budget_bytes: int
    headroom_bytes: int  # activations, KV cache and RUNTIME_SLACK
    always_bytes: int  # embeddings, position bias, final norm
    layer_bytes: list[int]
    resident: list[int]
    streamed: list[int]
    ring_bytes: int  # the two streaming buffers and the caches of the streamed layer computing
    int8: bool
    device: str
    source: str = ""
    cache_bytes: list[int] = field(default_factory=list)  # int8 kernel caches of each resident layer (0: none)
    extra: dict = field(default_factory=dict)

    @property
    def weights_bytes(self) -> int:
        return self.always_bytes + sum(self.layer_bytes)

    @property
    def resident_cache_bytes(self) -> int:
        return sum(self.cache_bytes[i] for i in self.resident) if self.cache_bytes else 0

    @property
    def planned_bytes(self) -> int:
        """Weights held (always + resident layers), their int8 caches and the ring: all but the headroom."""
        return (self.always_bytes + sum(self.layer_bytes[i] for i in self.resident) + self.resident_cache_bytes
                + self.ring_bytes)

    def summary(self) -> str:
        packs = f", int8 kernel caches {format_size(self.resident_cache_bytes)}" if self.int8 else ""
        return (f"memory budget {format_size(self.budget_bytes)}: {len(self.resident)} of {len(self.layer_bytes)} "
                f"layers resident, {len(self.streamed)} streamed ({'int8' if self.int8 else 'float'} weights "
                f"{format_size(self.weights_bytes)}; planned {format_size(self.planned_bytes)}: always "
                f"{format_size(self.always_bytes)}, resident layers "
                f"{format_size(sum(self.layer_bytes[i] for i in self.resident))}{packs}, ring "
                f"{format_size(self.ring_bytes)}; + headroom {format_size(self.headroom_bytes)} for activations, "
                f"KV cache and allocator; on {self.device})")

    def as_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "weights_bytes": self.weights_bytes,
                "planned_bytes": self.planned_bytes, "headroom_bytes": self.headroom_bytes,
                "cache_bytes": self.resident_cache_bytes, "resident_layers": len(self.resident),
                "streamed_layers": len(self.streamed), "int8": self.int8, "device": self.device}


def _layer_of(name: str) -> Optional[int]:
    m = re.match(r"encoder\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def layer_sizes(index: dict[str, _Entry], num_layers: int) -> tuple[int, list[int]]:
    """(bytes of the always-resident tensors, bytes of each layer) in a safetensors index."""
    layer_bytes = [0] * num_layers
    always = 0
    for name, e in index.items():
        i = _layer_of(name)
        if i is None:
            always += e.nbytes
        else:
            layer_bytes[i] += e.nbytes
    return always, layer_bytes


def make_plan(index: dict[str, _Entry], num_layers: int, budget: int | None, *, int8: bool, device: str,
              headroom_bytes: int, caches=None) -> OffloadPlan:
    """Keep the first layers resident while always + resident layers and their caches + ring + headroom fits.

    caches: the int8 kernel's caches per layer (cpmant.offload.caches.CacheSizes: all resident, resident while
    something streams, streamed while computing); None: none (float weights, or CUDA). budget None: no budget,
    every layer resident (the plan's budget is what that needs)."""
    always, layer_bytes = layer_sizes(index, num_layers)
    none = [0] * num_layers
    full_cache = list(caches.full) if caches else none
    res_cache = list(caches.resident) if caches else none
    stream_cache = list(caches.streamed) if caches else none
    on_gpu = torch.device(device).type == "cuda"

    def need(k: int) -> int:
        if k == num_layers:
            return always + sum(layer_bytes) + sum(full_cache) + headroom_bytes
        rest = sorted(layer_bytes[k:], reverse=True)[:2]
        return (always + sum(layer_bytes[:k]) + sum(res_cache[:k]) + sum(rest) + max(stream_cache[k:])
                + headroom_bytes)

    if budget is None:
        budget = need(num_layers)
    k = num_layers
    while k > 0 and need(k) > budget:
        k -= 1
    if need(k) > budget:
        least = need(0)
        raise CpmantError(
            f"a memory budget of {format_size(budget)} is too small for this model: the embeddings "
            f"({format_size(always)}), two streamed layers" + (" and the int8 kernel's caches of one" if int8 else "")
            + f", activations and KV cache for these lengths and {format_size(RUNTIME_SLACK)} of allocator slack "
            f"need {format_size(least)}" + (" of GPU memory" if on_gpu else ""),
            f"give --memory-budget {_round_up_size(least)} or more" + ("" if int8 else ", or add --int8"))
    streamed = list(range(k, num_layers))
    if streamed:
        ring = sum(sorted((layer_bytes[i] for i in streamed), reverse=True)[:2]) + max(stream_cache[i]
                                                                                      for i in streamed)
        kept = res_cache
    else:
        ring, kept = 0, full_cache
    return OffloadPlan(budget, headroom_bytes, always, layer_bytes, list(range(k)), streamed, ring, int8,
                       str(device), cache_bytes=kept)
