"""Save and restore a training run's state in step-N checkpoints: one helper for pretraining and distillation.

    save_state(ckpt_root, step, model, config, vocab_path, optimizer, scheduler, extra=None, meta=None,
               keep_last=2, keep_every=0) -> Path
    restore_state(path, model, optimizer=None, scheduler=None, restore_rng=True) -> dict   # `extra`, plus "step"
    find_resume_checkpoint(ckpt_root) -> (newest intact step folder or None, [(skipped folder, reason), ...])

A checkpoint is a model folder (weights, config, vocab, metadata with each file's sha256, written last) plus
`training_state.pt`: optimizer, scheduler, the CPU and CUDA random states, the step and the caller's `extra`
(plain values and tensors only: it is read back with weights_only=True). Resuming checks the files' hashes and falls
back past damaged checkpoints (a truncated file, a bit flip), moving them aside as `damaged-step-N` so that a later
save of the same step writes a fresh one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import ModelConfig
from ..errors import CpmantError

_RESERVED = ("optimizer", "scheduler", "rng")


def rng_state() -> dict:
    """The global random states: torch's CPU generator and every CUDA device's."""
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, step, the global index of a micro-batch's first row)."""
    # randomness from integers, not an identity: stays a blake2b (cpmant.hashing is for identities)
    h = hashlib.blake2b(json.dumps([int(p) for p in parts]).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def seed_everything(*parts: int) -> None:
    """Seed torch's global generators (CPU and every CUDA device) from `parts`: dropout masks drawn after this
    depend only on them, so any split of a batch over processes, or a resumed run, draws the same masks."""
    torch.manual_seed(seed_for(*parts))  # also seeds every CUDA device


def save_state(ckpt_root: str | Path, step: int, model: torch.nn.Module, config: ModelConfig,
               vocab_path: str | Path, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None, extra: dict | None = None,
               meta: dict | None = None, keep_last: int = 2, keep_every: int = 0) -> Path:
    """Write step-N under ckpt_root (atomically, metadata last), point `latest` at it, prune by retention."""
    clash = sorted(set(extra or {}) & {*_RESERVED, "step"})
    if clash:
        raise ValueError(f"extra must not use the reserved keys {clash}")
    state = {"optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": rng_state(), "step": int(step), **(extra or {})}
    return ckpt.save_training_checkpoint(ckpt_root, step, model.state_dict(), config, vocab_path, state,
                                         meta=meta, keep_last=keep_last, keep_every=keep_every)


def restore_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                  restore_rng: bool = True) -> dict:
    """Load a step folder's weights into `model` (same ModelConfig required) and its optimizer, scheduler and
    random states; returns the saved `extra` with "step"."""
    path = Path(path)
    saved_cfg, sd, _, _ = ckpt.load_model_dir(path)
    own = getattr(model, "config", None)
    if own is not None and saved_cfg != own:
        raise CpmantError(f"checkpoint {path} holds a model with another config than the one being trained",
                          "resume with the model config it was trained with, or start over (--resume never)")
    model.load_state_dict(sd)
    st = ckpt.load_training_state(path)
    if optimizer is not None:
        optimizer.load_state_dict(st["optimizer"])
    if scheduler is not None and st.get("scheduler") is not None:
        scheduler.load_state_dict(st["scheduler"])
    if restore_rng and st.get("rng"):
        set_rng_state(st["rng"])
    return {k: v for k, v in st.items() if k not in _RESERVED}


def check_files(path: str | Path) -> str | None:
    """Why a checkpoint folder cannot be used (missing metadata or file, a file whose sha256 differs), or None."""
    path = Path(path)
    try:
        meta = ckpt.read_meta(path)
    except (CpmantError, ValueError, OSError) as e:
        return f"unreadable metadata ({str(e).splitlines()[0]})"
    files = meta.get("files_sha256") or {}
    if not files:
        return "its metadata lists no file hashes"
    for name, sha in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if ckpt.sha256_file(f) != sha:
            return f"{name} does not match the sha256 in its metadata (truncated or damaged)"
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged step folder to damaged-step-N (kept for inspection, never resumed from)."""
    dest = path.with_name(f"damaged-{path.name}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"damaged-{path.name}.{n}")
    path.rename(dest)
    return dest
