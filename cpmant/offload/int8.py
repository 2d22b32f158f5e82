"""int8 streaming: the checkpoint with its encoder Linears as int8 + per-row scales, written once under CPMANT_HOME."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..hashing import sha256_json
from .mapped import _MappedFile, write_safetensors_streaming

QUANTIZER = "int8_per_row symmetric, scale = max|row| / 127 (cpmant.modules.quant), float tensors fp32, v2"
# v2: the other float tensors (embeddings, norms, position bias) are written in fp32 whatever the source holds: a
# CPM-Live checkpoint is fp16 (the published 10B, after `cpmant convert`), and a fp16 norm weight would turn the
# activations fp16 against the int8 kernel's fp32 outputs (the decode step then fails on mixed dtypes)


# ---- int8 cache -------------------------------------------------------------------------------------------
def _int8_names(model: nn.Module) -> set[str]:
    """State-dict names of the encoder Linear weights (the tensors int8 turns into weight + weight_scale)."""
    from ..layers import Linear

    out = set()
    for name, mod in model.encoder.named_modules():
        if isinstance(mod, Linear):
            out.add(f"encoder.{name}.weight")
    return out


def _int8_cache(src: Path, mf: _MappedFile, float_model: nn.Module) -> Path:
    """The int8 version of `src` (encoder Linears as int8 + per-row fp32 scale), written once under CPMANT_HOME."""
    from ..modules.quant import int8_per_row
    from ..paths import subdir

    from ..checkpoint import read_meta
    from ..fsutil import write_json_atomic

    # keyed by what the int8 file is made of: the weights (their recorded sha256, else path, size and mtime: hashing
    # a large file at every load would cost more than the cache saves) and the quantizer's version
    st = src.stat()
    recorded = read_meta(src.parent).get("files_sha256", {}).get(src.name)
    inputs = {"weights_sha256": recorded} if recorded else {"weights": str(src.resolve()), "bytes": st.st_size,
                                                             "mtime_ns": st.st_mtime_ns}
    inputs["quantizer"] = QUANTIZER
    key = sha256_json(inputs)[:24]
    out = subdir("cache", "offload") / f"{key}.safetensors"
    if out.is_file():
        return out
    lin = _int8_names(float_model)
    items, scale_of = [], {}
    for name, e in mf.index.items():
        if name in lin:
            items.append((name, torch.int8, e.shape))
            sname = name[: -len("weight")] + "weight_scale"
            items.append((sname, torch.float32, (e.shape[0],)))
            scale_of[sname] = name
        else:
            items.append((name, torch.float32 if e.dtype.is_floating_point else e.dtype, e.shape))
    def produce(name: str) -> torch.Tensor:
        if name in scale_of:  # scales (fp32) are written before the int8 weights: quantize twice, hold nothing
            return int8_per_row(mf.view(scale_of[name]))[1]
        if name in lin:
            return int8_per_row(mf.view(name))[0]
        t = mf.view(name)
        return t.float() if t.dtype.is_floating_point else t

    write_json_atomic(out.with_suffix(".json"), inputs)  # why this file is reused: the inputs of its key
    write_safetensors_streaming(out, items, produce, after=lambda n: mf.release([scale_of.get(n, n)]))
    return out
