"""The peak memory of generating under a memory budget, measured one way for `cpmant generate` and for
bench/bench_memory_budget.py: `budget_peak(folder, int8)` warms torch up at the model's shapes, gives the freed heap
back, then measures (cpmant.memory.PeakMemory) the resident set above that baseline while the block loads and
generates; `peak_line` says what the number counts.

What is the baseline's: the interpreter, imports, jieba's dictionary, the model files' fetch, and torch's first use
(its kernels, thread pools and code pages, about 15-25 MiB the first time a process generates, at any budget):
`warm_up` generates 2 tokens with a one-layer model of the same widths (random weights, capped at 1024 / 4096 wide:
the kernels are the same beyond) and drops it. What is the peak's: the weights held, the streaming ring, the int8
kernel's packs and float copies, activations and the KV cache, and the allocator's slack (glibc arenas and torch's
per-call buffers, which nothing here controls: the plan holds RUNTIME_SLACK for them, measured once).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from ..memory import PeakMemory
from .caches import bound_allocator, trim_heap

_WARM_PROMPT = "床前明月光"


def warm_up(folder: str | Path, int8: bool = False) -> None:
    """Torch's first use at the shapes of the model in `folder` (see the module docstring); nothing stays."""
    import torch

    from ..checkpoint import CONFIG_FILE, VOCAB_FILE
    from ..config import ModelConfig
    from ..factory import build_model
    from ..generate import generate_ids
    from ..modules.quant import swap_in_quant_linears
    from ..tokenizer import CPMAntTokenizer

    folder = Path(folder)
    config = ModelConfig.load(folder / CONFIG_FILE)
    heads = max(1, min(config.num_heads, 1024 // config.dim_head))
    small = config.replace(num_layers=1, mask_modules=None, quantization=None, moe_experts=None,
                           dim_model=min(config.dim_model, 1024), dim_ff=min(config.dim_ff, 4096), num_heads=heads)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(small).eval()
    if int8 or config.quantization == "int8":
        swap_in_quant_linears(model, from_weights=True)
    generate_ids(model, CPMAntTokenizer(folder / VOCAB_FILE), [_WARM_PROMPT], max_new_tokens=2)
    del model
    trim_heap()


@contextlib.contextmanager
def budget_peak(folder: str | Path, int8: bool = False) -> Iterator[PeakMemory]:
    """bound_allocator, warm_up, then a PeakMemory over the block (the baseline taken after the warm-up and a heap
    trim)."""
    bound_allocator()
    warm_up(folder, int8)
    with PeakMemory() as pm:
        yield pm


def peak_line(pm: PeakMemory, budget_text: str, budget_bytes: int) -> str:
    """The one line `cpmant generate --memory-budget` prints: the peak, of what budget, and what it counts."""
    cuda = "" if pm.cuda_peak_mb is None else f"; CUDA peak {pm.cuda_peak_mb:.1f} MiB"
    return (f"peak resident memory {pm.peak_mb:.1f} MiB of the {budget_bytes / 2**20:.1f} MiB budget "
            f"({budget_text}) above the baseline taken after the model files are fetched and torch's first use: "
            f"weights, streaming ring, int8 packs, activations, KV cache and the allocator's slack (glibc arenas, "
            f"not controlled: planned as a measured constant){cuda}")
