"""The plan: which layers stay resident and which stream, under a budget."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import CpmantError
from .mapped import _Entry
from .sizes import _round_up_size, format_size

DEFAULT_HEADROOM = 0.10  # of the budget, for activations, the KV cache and allocator slack ...
MIN_HEADROOM = 12 * 2**20  # ... and at least this (capped at a quarter of the budget). Measured on d512 / 24 layers
# after a warm-up at the same shapes: the KV cache, logits, the bias and per-call buffers took 10-13 MiB above the
# resident weights and the ring; a cold process also grows by about 16 MiB at the first decoding steps (torch's
# first-use caches), which a budget this small does not cover


def _smallest(base: int, head_of) -> int:
    """The smallest budget b with base + head_of(b) <= b (bisection; head_of grows slower than b)."""
    lo, hi = base, 2 * base + 2 * MIN_HEADROOM
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if base + head_of(mid) <= mid else (mid + 1, hi)
    return lo



# ---- the plan: which layers stay, which stream ----------------------------------------------------------------
@dataclass
class OffloadPlan:
    budget_bytes: int
    headroom_bytes: int
    always_bytes: int  # embeddings, position bias, final norm
    layer_bytes: list[int]
    resident: list[int]
    streamed: list[int]
    ring_bytes: int  # the two streaming buffers
    int8: bool
    device: str
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def weights_bytes(self) -> int:
        return self.always_bytes + sum(self.layer_bytes)

    @property
    def planned_bytes(self) -> int:
        return self.always_bytes + sum(self.layer_bytes[i] for i in self.resident) + self.ring_bytes

    def summary(self) -> str:
        return (f"memory budget {format_size(self.budget_bytes)}: {len(self.resident)} of {len(self.layer_bytes)} "
                f"layers resident, {len(self.streamed)} streamed ({'int8' if self.int8 else 'float'} weights "
                f"{format_size(self.weights_bytes)}, planned {format_size(self.planned_bytes)} + headroom "
                f"{format_size(self.headroom_bytes)}, on {self.device})")

    def as_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "weights_bytes": self.weights_bytes,
                "planned_bytes": self.planned_bytes, "resident_layers": len(self.resident),
                "streamed_layers": len(self.streamed), "int8": self.int8, "device": self.device}


def _layer_of(name: str) -> Optional[int]:
    m = re.match(r"encoder\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def make_plan(index: dict[str, _Entry], num_layers: int, budget: int, *, int8: bool, device: str,
              headroom: float = DEFAULT_HEADROOM) -> OffloadPlan:
    """Keep the first layers resident while always + resident + ring (2 largest streamed layers) + headroom fits."""
    layer_bytes = [0] * num_layers
    always = 0
    for name, e in index.items():
        i = _layer_of(name)
        if i is None:
            always += e.nbytes
        else:
            layer_bytes[i] += e.nbytes
    def head_of(b: int) -> int:
        return int(max(b * headroom, min(MIN_HEADROOM, b / 4)))

    head = head_of(budget)
    on_gpu = torch.device(device).type == "cuda"

    # two layers in the ring; int8 on the CPU adds the one being computed's prepacked copy (QuantLinear.packed)
    ring_layers = 3 if int8 and not on_gpu else 2

    def need(k: int) -> int:
        rest = sorted(layer_bytes[k:], reverse=True)[:ring_layers]
        return always + sum(layer_bytes[:k]) + sum(rest) + head

    k = num_layers
    while k > 0 and need(k) > budget:
        k -= 1
    if need(k) > budget:
        least = _smallest(need(0) - head, head_of)
        raise CpmantError(
            f"a memory budget of {format_size(budget)} is too small for this model: the embeddings "
            f"({format_size(always)}), two streamed layers and the headroom for activations "
            f"need {format_size(least)}" + (" of GPU memory" if on_gpu else ""),
            f"give --memory-budget {_round_up_size(least)} or more"
            + ("" if int8 else ", or add --int8"))
    streamed = list(range(k, num_layers))
    ring = sum(sorted((layer_bytes[i] for i in streamed), reverse=True)[:ring_layers])
    return OffloadPlan(budget, head, always, layer_bytes, list(range(k)), streamed, ring, int8, str(device))
