"""Execution backends behind one interface per stage: `torch` everywhere, the OpenBMB tools on CUDA.

A backend registers itself by name; `get_backend(stage, name)` checks that it can run here and says why not.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import CpmantError

# stage -> backend name -> check(); the check raises CpmantError when the backend cannot run on this machine
_BACKENDS: dict[str, dict[str, Callable[[], None]]] = {}


def register_backend(stage: str, name: str):
    def deco(check: Callable[[], None]):
        _BACKENDS.setdefault(stage, {})[name] = check
        return check

    return deco


def _require_cuda(tool: str, flag: str, package: str) -> None:
    if not torch.cuda.is_available():
        raise CpmantError(
            f"{flag} {tool} needs CUDA (and NCCL), and this machine has no CUDA device",
            f"use {flag} torch here, or run on a GPU machine after `pip install '.[cuda]'` (installs {package})",
        )
    try:
        __import__(tool)
    except ImportError as e:
        raise CpmantError(f"{tool} is not installed ({e})", f"`pip install '.[cuda]'` on the GPU machine") from e


@register_backend("train", "torch")
def _torch_train() -> None:
    return None


@register_backend("train", "bmtrain")
def _bmtrain_train() -> None:
    _require_cuda("bmtrain", "--backend", "bmtrain==1.0.1")
    raise CpmantError("the bmtrain training path is not built yet (it arrives with the CUDA issue)",
                      "use --backend torch, which also runs on GPUs (torchrun for several processes)")


@register_backend("compress", "torch")
def _torch_compress() -> None:
    return None


@register_backend("compress", "bmcook")
def _bmcook_compress() -> None:
    _require_cuda("bmcook", "--backend", "bmcook==0.1.2 (with bmtrain, model_center, cpm_kernels)")
    raise CpmantError("the BMCook compression path is not built yet (it arrives with the CUDA issue)",
                      "use --backend torch: the same recipes run on CPU or GPU")


def get_backend(stage: str, name: str) -> str:
    choices = _BACKENDS.get(stage, {})
    if name not in choices:
        raise CpmantError(f"unknown {stage} backend {name!r}", f"choose one of: {', '.join(sorted(choices))}")
    choices[name]()
    return name
