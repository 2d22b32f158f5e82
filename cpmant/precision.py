"""One precision policy for every stage: `auto | fp32 | bf16`, the one `Precision` type every config uses and the one
resolver of it.

`auto` chooses bf16 autocast where the device multiplies bf16 natively (AVX-512 BF16 or AMX on the CPU, compute
capability 8.0 or more on CUDA) and fp32 elsewhere; for decoding (`decoding=True`) `auto` is fp32 on the CPU, where
one-token steps run faster in fp32 (figures in cpmant/generate.py). Autocast only changes the compute dtype of matrix
products: master weights, optimizer state and checkpoints stay fp32.

This module imports torch only inside the functions that need it: the configs and the CLI read `Precision` and
`PRECISIONS` without loading torch.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from .errors import CpmantError

Precision = Literal["auto", "fp32", "bf16"]  # a setting, as configs and flags take it
PRECISIONS: tuple[str, ...] = get_args(Precision)
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of a CPU that multiplies bf16


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """This CPU's /proc/cpuinfo flags (empty where the file is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_native(device="cpu", *, flags: frozenset[str] | None = None) -> bool:
    """Whether `device` multiplies bf16 natively (not by converting to fp32 first). `flags`: the CPU's flags (this
    machine's /proc/cpuinfo when None)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] >= 8
    if dev.type == "cpu":
        return bool(BF16_CPU_FLAGS & (_cpu_flags() if flags is None else frozenset(flags)))
    return False


def resolve_precision(setting: str, device="cpu", *, decoding: bool = False,
                      flags: frozenset[str] | None = None) -> str:
    """The precision (fp32 or bf16) that `setting` runs in on `device`: `auto` -> bf16 where native, else fp32 (with
    `decoding`, fp32 on the CPU); `fp32` and `bf16` stay as they are. `flags`: the CPU's flags (see bf16_native)."""
    if setting not in PRECISIONS:
        raise CpmantError(f"unknown precision {setting!r}", f"use one of: {', '.join(PRECISIONS)}")
    if setting != "auto":
        return setting
    import torch

    if decoding and torch.device(device).type == "cpu":
        return "fp32"
    return "bf16" if bf16_native(device, flags=flags) else "fp32"


def autocast(precision: str, device="cpu"):
    """A context that runs matrix products in `precision` (resolved: fp32 or bf16) on `device`."""
    import torch

    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise CpmantError(f"precision {precision!r} is not resolved", "pass fp32 or bf16 (resolve_precision first)")
