"""Memory-budget inference (BMInf's idea, on any machine): keep as many transformer layers resident as fit in a
budget and stream the rest, with the next layer prefetched while the current one computes.

    model, tok = load_with_budget(checkpoint_dir, parse_size("64MB"))          # CPU: stream from the mmap'd file
    model, tok = load_with_budget(checkpoint_dir, parse_size("6GB"), device="cuda")  # GPU: pinned RAM -> GPU
    generate(model, tok, ["床前明月光"])                                         # unchanged generation code

The budget holds the always-resident tensors (embeddings, position bias, the final norm), the resident layers
(the first ones) with the int8 kernel's caches, the streaming ring (two layers) and a headroom for activations and the
KV cache computed from the lengths to generate (cpmant.offload.plan says what each part counts).

How a streamed layer reaches its forward: a `forward_pre_hook` on its `TransformerBlock` binds the layer's
parameters to the weights (waiting for the prefetch of that layer if it is still running) and starts the prefetch
of the next streamed layer; a `forward_hook` unbinds them and releases the memory. Generation code never knows.

- CPU: the weights are views into the memory-mapped `model.safetensors` (no copy). The prefetch thread faults the
  next layer's pages in (`MADV_POPULATE_READ`) while the current layer computes; after its forward a layer's pages
  leave the process (`MADV_DONTNEED`; they stay in the kernel's page cache, reclaimable). At most two streamed layers
  are mapped in at once: the ring of two buffers, without the copy.
- CUDA (BMInf's case; unverified here, no GPU): streamed layers sit in pinned CPU memory; two GPU buffers take turns,
  filled on a side stream with events ordering the copy after the previous user of the buffer and before the
  layer's forward.
- int8 (`int8=True`): encoder Linears become int8 with per-row scales (`cpmant.modules.quant.int8_per_row`), for
  the resident layers and the streamed ones: a quarter of the bytes to hold and to stream. The int8 weights are
  written once to a cache file (under CPMANT_HOME/cache/offload) that is then streamed like the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, is_complete
from ..config import ModelConfig
from ..errors import CpmantError
from .bminf_backend import load_with_bminf
from .caches import plan_caches
from .int8 import _int8_cache
from .mapped import _MappedFile, read_safetensors_index, write_safetensors_streaming
from .plan import DEFAULT_TOKENS, RUNTIME_SLACK, OffloadPlan, _layer_of, activation_bytes, make_plan
from .sizes import format_size, parse_size
from .stream import LayerStreamer, _CudaRingSource, _MmapSource, _assign, _owner
from .unpacked import use_unpacked_kernel

__all__ = ["DEFAULT_TOKENS", "RUNTIME_SLACK", "LayerStreamer", "OffloadPlan", "format_size", "load_for_inference",
           "load_with_bminf", "load_with_budget", "make_plan", "parse_size", "read_safetensors_index",
           "write_safetensors_streaming"]


# ---- the entry point ---------------------------------------------------------------------------------------
def load_with_budget(checkpoint_dir: str | Path, budget_bytes: int | None, device: str | torch.device = "cpu",
                     int8: bool = False, rows: int = 1, tokens: int = DEFAULT_TOKENS):
    """(model in eval mode, tokenizer) keeping within `budget_bytes` of weights memory (RAM on the CPU, GPU memory
    on CUDA): the first layers resident, the rest streamed through a ring of two with prefetch. `model.offload` is
    the OffloadPlan; `model.offload_streamer` the LayerStreamer (None when every layer fits). Generation code
    (`cpmant.generate`) runs unchanged on the model. `budget_bytes` None: no budget, every layer resident."""
    from ..factory import build_model
    from ..tokenizer import CPMAntTokenizer

    folder = Path(checkpoint_dir)
    device = torch.device(device)
    if not is_complete(folder):
        raise CpmantError(f"{folder} is not a complete checkpoint folder", "pull the model again (cpmant pull)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CpmantError("device cuda was asked for, and this machine has no CUDA device",
                          "use device cpu: memory-budget streaming runs on the CPU too")
    if budget_bytes is not None and (not isinstance(budget_bytes, int) or budget_bytes <= 0):
        budget_bytes = parse_size(budget_bytes)
    config = ModelConfig.load(folder / CONFIG_FILE)
    vocab = folder / VOCAB_FILE
    if not vocab.is_file():
        raise CpmantError(f"{folder} has no {VOCAB_FILE}", "copy the vocab the model was trained with into the folder")
    mf = _MappedFile(folder / WEIGHTS_FILE)
    if int8 and config.quantization is None:
        if config.moe_experts is not None:
            raise CpmantError("int8 streaming of MoE models is not supported", "drop --int8")
        path = _int8_cache(folder / WEIGHTS_FILE, mf, build_model(config, meta=True))
        mf.close()
        mf = _MappedFile(path)
        config = config.replace(quantization="int8")
    int8 = config.quantization == "int8"
    model = build_model(config, meta=True)
    # the headroom: activations and KV cache of `rows` rows of `tokens` positions, and the allocator's slack; the
    # int8 kernel's caches (packs, float copies) measured per layer shape (cpmant.offload.plan, .caches)
    fits = budget_bytes is None or mf.path.stat().st_size <= budget_bytes  # else never every layer resident: no need to measure that case
    caches = plan_caches(model, full=fits) if int8 and device.type == "cpu" else None
    plan = make_plan(mf.index, len(config.mask_modules or [0] * config.num_layers), budget_bytes, int8=int8,
                     device=str(device), headroom_bytes=activation_bytes(config, rows, tokens) + RUNTIME_SLACK,
                     caches=caches)
    plan.source = str(mf.path)
    expected = set(model.state_dict())
    if set(mf.index) != expected:
        missing, extra = sorted(expected - set(mf.index))[:3], sorted(set(mf.index) - expected)[:3]
        raise CpmantError(f"the weights in {mf.path} do not match {CONFIG_FILE} (missing {missing}, unexpected "
                          f"{extra})", "use the config.json saved with these weights")
    names: dict[int, list[str]] = {i: [] for i in plan.streamed}
    for name in mf.index:
        i = _layer_of(name)
        if i is not None and i in names:
            names[i].append(name)
            continue
        mod, attr = _owner(model, name)
        t = mf.copy(name)
        _assign(mod, attr, t.to(device) if device.type != "cpu" else t)
    if device.type == "cuda" and plan.streamed:
        source = _CudaRingSource(mf, names, device)
    else:
        source = _MmapSource(mf, names)
    model.eval()
    streamer = LayerStreamer(model, plan, names, source, device) if plan.streamed else None
    if int8 and device.type == "cpu":  # streamed int8 layers multiply without fbgemm's per-step packs
        plan.extra["unpacked_linears"] = use_unpacked_kernel(model, plan)
    model.offload = plan
    model.offload_streamer = streamer
    return model, CPMAntTokenizer(vocab)


def load_for_inference(checkpoint_dir: str | Path, budget_bytes: Optional[int] = None, *, backend: str = "torch",
                       device: str | torch.device | None = None, int8: bool = False, rows: int = 1,
                       tokens: int = DEFAULT_TOKENS):
    """The one loader behind `cpmant generate`: (model, tokenizer). rows, tokens: what will be generated (texts x
    beams; prompt + new tokens), for the budget's headroom.

    backend torch: the whole model (`cpmant.checkpoint.load_pretrained`) when budget_bytes is None, else
    `load_with_budget`, on `device` (default cpu).
    backend bminf: `load_with_bminf` (CUDA only; a clear CpmantError elsewhere).
    """
    from ..backends import get_backend

    get_backend("infer", backend)
    device = torch.device(device or "cpu")
    if backend == "bminf":
        return load_with_bminf(checkpoint_dir, budget_bytes, int8=int8)
    if budget_bytes is None:
        from ..checkpoint import load_pretrained

        if int8:  # every layer resident, in int8
            return load_with_budget(checkpoint_dir, None, device=device, int8=True)
        return load_pretrained(checkpoint_dir, device=device)
    return load_with_budget(checkpoint_dir, budget_bytes, device=device, int8=int8, rows=rows, tokens=tokens)
