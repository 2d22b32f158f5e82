"""One precision policy for every stage: `auto | fp32 | bf16`.

`auto` chooses bf16 autocast where the device multiplies bf16 natively (AVX-512 BF16 or AMX on the CPU, compute
capability 8.0 or more on CUDA) and fp32 elsewhere. Autocast only changes the compute dtype of matrix products:
master weights, optimizer state and checkpoints stay fp32.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

from .errors import CpmantError

PRECISIONS = ("auto", "fp32", "bf16")


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_native(device: str | torch.device = "cpu") -> bool:
    """Whether `device` multiplies bf16 natively (not by converting to fp32 first)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] >= 8
    if dev.type == "cpu":
        flags = _cpu_flags()
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return False


def resolve_precision(setting: str, device: str | torch.device = "cpu") -> str:
    """`auto` -> bf16 where native on `device`, else fp32; `fp32` and `bf16` stay as they are."""
    if setting not in PRECISIONS:
        raise CpmantError(f"unknown precision {setting!r}", f"use one of: {', '.join(PRECISIONS)}")
    if setting == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return setting


def autocast(precision: str, device: str | torch.device = "cpu"):
    """A context that runs matrix products in `precision` (resolved: fp32 or bf16) on `device`."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise CpmantError(f"precision {precision!r} is not resolved", "pass fp32 or bf16 (resolve_precision first)")
