"""What the int8 kernel keeps beside a layer's weights, measured: fbgemm's prepacked copies (per Linear for the
prompt, fused across q/k/v and w_0/w_1 for the one-token step) and the float copies of matrices too small for the
kernel (`cpmant.modules.quant`). fbgemm does not say how large a pack is (it holds the packed matrix, the original
int8 weight for unpacking, per-row offsets, scales and zero points, padded to its blocks: 1.2-2.4 bytes per weight
measured on 256-4096 wide matrices), so the plan takes the resident set's growth while one layer of each shape makes
them (`kernel_cache_bytes`), once per machine (kept under CPMANT_HOME/cache/offload)."""

from __future__ import annotations

import copy
import ctypes
import gc
import json

from dataclasses import dataclass

import psutil
import torch
from torch import nn

from ..modules.quant import KERNEL_MIN_WEIGHTS, QuantLinear, drop_packs, fused_forward, int8_kernel

_PROMPT_ROWS = 8  # the prompt's path (several rows) and the step's (one row) each make their caches


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc malloc_trim): freed tensors otherwise stay in the
    process's resident set, hiding the next allocations from a measurement (no-op where there is no glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)


def bound_allocator() -> None:
    """Make glibc's malloc give freed memory back: every allocation of 128 KiB or more its own mapping, unmapped
    when freed (glibc otherwise raises that threshold after the first free, and later tensors come from a heap that
    keeps its freed pages), and one arena for all threads (a thread's first allocation otherwise opens an arena of
    its own: measured +8 MiB of the peak in one run of two). Process-wide; a no-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def _anon_rss() -> int:
    """Bytes of the process's anonymous resident memory (heap, not mapped files or code)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


def _groups(layer: nn.Module) -> list[tuple[QuantLinear, ...]]:
    """The Linears the one-token step multiplies as one (q/k/v, w_0/w_1), where the layer has them."""
    out = []
    att = getattr(layer, "self_att", None)
    if att is not None:
        a = att.self_attention
        out.append((a.project_q, a.project_k, a.project_v))
    ffn = getattr(layer, "ffn", None)
    if ffn is not None and hasattr(ffn.ffn.w_in, "w_0"):
        out.append((ffn.ffn.w_in.w_0, ffn.ffn.w_in.w_1))
    return out


def kernel_cache_bytes(meta_layer: nn.Module, convert=None) -> int:
    """Bytes the int8 kernel keeps for a layer shaped like `meta_layer` (a layer on the meta device) after the
    prompt and a one-token step. The float copies of small matrices are counted from their shapes (4 bytes a
    weight: per Linear, and per fused group); fbgemm's packs are measured on a copy with random int8 weights (the
    resident set's growth while they are made, the allocator bounded), then dropped. `convert(layer)` turns its
    Linears into the kind the plan will run (cpmant.offload.unpacked), if not plain QuantLinears."""
    if not any(isinstance(m, QuantLinear) for m in meta_layer.modules()):
        return 0
    layer = copy.deepcopy(meta_layer).to_empty(device="cpu")
    if convert is not None:
        convert(layer)
    lins = [m for m in layer.modules() if isinstance(m, QuantLinear)]
    fused = [g for g in _groups(layer) if all(type(m) is QuantLinear for m in g)]  # the fused step's groups
    small = [m for m in lins if m.weight.numel() < KERNEL_MIN_WEIGHTS]
    copies = 4 * sum(m.weight.numel() for m in small)
    copies += 4 * sum(n for n in (sum(m.weight.numel() for m in g) for g in fused) if n < KERNEL_MIN_WEIGHTS)
    large = [m for m in lins if m.weight.numel() >= KERNEL_MIN_WEIGHTS]
    large_groups = [g for g in fused if sum(m.weight.numel() for m in g) >= KERNEL_MIN_WEIGHTS]
    if not large and not large_groups:
        return copies
    shapes = [[type(m).__name__, m.dim_out, m.dim_in] for m in large] + [[len(g), g[0].dim_in] for g in large_groups]
    return copies + _measured_once(shapes, lambda: _pack_bytes(lins, large, large_groups))


# The packs' measurement varied by up to 20% between processes (fbgemm's and torch's small allocations share the
# heap): each one is taken once per machine and kind of layer, kept under CPMANT_HOME/cache/offload (so that a plan,
# and the smallest budget an error names, come out the same at every load) with this much added for the spread.
_PACK_SPREAD = 1.25


def _measured_once(shapes: list, measure) -> int:
    """The packs' bytes for these Linear shapes: from the cache file, else measured now and kept."""
    from ..fsutil import write_json_atomic
    from ..hashing import sha256_json
    from ..paths import subdir
    from ..precision import _cpu_flags

    key = sha256_json({"shapes": shapes, "torch": torch.__version__, "cpu_flags": sorted(_cpu_flags()),
                       "min_weights": KERNEL_MIN_WEIGHTS, "v": 1})[:24]
    path = subdir("cache", "offload") / f"packs-{key}.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    got = int(measure() * _PACK_SPREAD)
    write_json_atomic(path, {"bytes": got, "shapes": shapes, "torch": torch.__version__})
    return got


def _pack_bytes(lins: list, large: list, large_groups: list) -> int:
    """The resident set's growth while the `large` Linears (and the fused `large_groups`) among `lins` make their
    packs (every one of `lins` gets random int8 weights first: a fused group may hold small ones)."""
    for m in lins:
        m.weight.copy_(torch.randint(-127, 128, m.weight.shape, dtype=torch.int8))
        m.weight_scale.fill_(0.01)
    trim_heap()
    before = _anon_rss()
    with torch.inference_mode(), int8_kernel():
        for lin in large:
            for rows in (_PROMPT_ROWS, 1):
                lin(torch.zeros(rows, lin.dim_in))
        for group in large_groups:
            fused_forward(group, torch.zeros(1, group[0].dim_in))
        packs = _anon_rss() - before
    for m in lins:
        drop_packs(m)
    trim_heap()
    return max(0, packs)


@dataclass(frozen=True)
class CacheSizes:
    """Bytes the int8 kernel keeps per layer: `full` when every layer is resident (plain QuantLinears, packs kept);
    once something streams, `resident` for a resident layer and `streamed` for the streamed layer computing
    (cpmant.offload.unpacked decides which Linears multiply without a pack)."""

    full: list[int]
    resident: list[int]
    streamed: list[int]


def plan_caches(model: nn.Module, full: bool = True) -> CacheSizes:
    """CacheSizes of a model on the meta device: one measurement per distinct layer shape and kind (with the
    allocator bounded). full=False: every layer resident cannot fit anyway (the weights alone are over the
    budget), and `full` is taken as `resident` without measuring the packs of a layer held whole."""
    from . import unpacked

    bound_allocator()

    def convert_all(layer):
        n = 0
        for m in layer.modules():
            if type(m) is QuantLinear and m.dim_in * m.dim_out >= KERNEL_MIN_WEIGHTS:
                m.__class__ = unpacked.UnpackedQuantLinear
                n += 1
        return n

    seen: dict[tuple, int] = {}

    def measure(layer, convert) -> int:
        key = (tuple((n, tuple(t.shape)) for n, t in layer.state_dict().items()), convert is not None)
        if key not in seen:
            seen[key] = kernel_cache_bytes(layer, convert)
        return seen[key]

    layers = list(model.encoder.layers)
    stream_convert = convert_all if unpacked._OK else None
    # a prompt of several rows on a streamed layer multiplies an aligned copy of each weight it clones (unpacked)
    clone = [max((m.weight.numel() for m in layer.modules() if isinstance(m, QuantLinear)), default=0)
             if stream_convert is not None else 0 for layer in layers]
    resident = [measure(layer, stream_convert if unpacked._BF16 else None) for layer in layers]
    return CacheSizes(
        full=[measure(layer, None) for layer in layers] if full else resident, resident=resident,
        streamed=[measure(layer, stream_convert) + c for layer, c in zip(layers, clone)])
