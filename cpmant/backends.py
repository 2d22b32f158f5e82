"""Execution backends behind one interface per stage: `torch` everywhere, the OpenBMB tools on CUDA.

Each backend that is built registers itself under (stage, name) with a one-line description and an availability
check; `backend_names(stage)` gives the built backends of a stage (a config's allowed values and a CLI's choices),
`get_backend(stage, name)` checks that the backend can run on this machine and says why not (a CpmantError with the
fix). A backend that is not built is not registered: the OpenBMB paths for training (BMTrain), compression (BMCook)
and generation (BMInf) come back when they run on a GPU.

    stage      backends
    train      torch (CPU/GPU, torchrun for several processes)
    compress   torch (CPU/GPU)
    generate   torch (CPU/GPU)
    infer      torch (memory-budget streaming, CPU or CUDA: cpmant.offload), bminf (BMInf's wrapper, CUDA)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import CpmantError


@dataclass(frozen=True)
class Backend:
    stage: str
    name: str
    description: str
    check: Callable[[], None]  # raises CpmantError when the backend cannot run here

    def available(self) -> str | None:
        """None when it can run here, else the reason."""
        try:
            self.check()
        except CpmantError as e:
            return e.problem
        return None


# stage -> backend name -> Backend
BACKENDS: dict[str, dict[str, Backend]] = {}


def register_backend(stage: str, name: str, description: str = ""):
    """Decorator: register `check` (raises CpmantError when the backend cannot run here) as backend `name`."""

    def deco(check: Callable[[], None]):
        BACKENDS.setdefault(stage, {})[name] = Backend(stage, name, description or (check.__doc__ or "").strip(),
                                                       check)
        return check

    return deco


def stages() -> tuple[str, ...]:
    return tuple(BACKENDS)


def backend_names(stage: str) -> tuple[str, ...]:
    """The built (registered) backend names of `stage`, in registration order (`torch` first): a config's allowed
    values and a CLI's choices."""
    if stage not in BACKENDS:
        raise CpmantError(f"unknown stage {stage!r} for backends", f"use one of: {', '.join(BACKENDS)}")
    return tuple(BACKENDS[stage])


def check_backend_name(stage: str, name: str) -> str:
    """`name` if registered for `stage` (for pydantic validators: raises ValueError, not CpmantError)."""
    names = backend_names(stage)
    if name not in names:
        raise ValueError(f"unknown {stage} backend {name!r}; choose one of: {', '.join(names)}")
    return name


def get_backend(stage: str, name: str) -> str:
    """Check that backend `name` of `stage` exists and can run here; returns the name."""
    choices = BACKENDS.get(stage, {})
    if name not in choices:
        raise CpmantError(f"unknown {stage} backend {name!r}", f"choose one of: {', '.join(choices) or '(none)'}")
    choices[name].check()
    return name


def _require_cuda(tool: str, flag: str, package: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise CpmantError(
            f"{flag} {tool} needs CUDA (and NCCL), and this machine has no CUDA device",
            f"use {flag} torch here, or run on a GPU machine after `pip install '.[cuda]'` (installs {package})",
        )
    try:
        __import__(tool)
    except ImportError as e:
        raise CpmantError(f"{tool} is not installed ({e})", f"`pip install '.[cuda]'` on the GPU machine") from e


@register_backend("train", "torch", "PyTorch on CPU or GPU; torchrun for several processes")
def _torch_train() -> None:
    return None


@register_backend("compress", "torch", "PyTorch on CPU or GPU")
def _torch_compress() -> None:
    return None


@register_backend("generate", "torch", "PyTorch on CPU or GPU, KV cache")
def _torch_generate() -> None:
    return None


@register_backend("infer", "torch", "PyTorch on CPU or CUDA; --memory-budget streams layers (cpmant.offload)")
def _torch_infer() -> None:
    return None


@register_backend("infer", "bminf", "BMInf 2.0 (CUDA: int8 kernels, layers streamed from pinned CPU memory)")
def _bminf_infer() -> None:
    _require_cuda("bminf", "--backend", "bminf==2.0.1")
