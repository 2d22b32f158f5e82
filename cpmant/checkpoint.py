"""Checkpoints: self-describing folders, written atomically, metadata last.

A model folder holds `model.safetensors`, `config.json`, `vocab.txt` and `cpmant_meta.json`. The metadata file is
written last, inside a temporary folder that is then renamed into place, so a folder that has it is complete.
A training checkpoint (`step-NNNNNNNN/`) is a model folder plus `training_state.pt` (optimizer, scheduler, RNG,
data position) saved with `torch.save` of tensors and plain containers only, and read back with
`torch.load(weights_only=True)`, which refuses any pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import ModelConfig
from .errors import CpmantError

META_FILE = "cpmant_meta.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"
TRAINING_STATE_FILE = "training_state.pt"
LATEST_FILE = "latest"
FORMAT_VERSION = 1


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_sha() -> str:
    """The code version: the git commit of this checkout (with '-dirty' when it has changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"cpmant-{__version__}"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("cpmant", "torch", "transformers", "safetensors", "jieba", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model_dir(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    vocab_path: str | Path | None,
    meta: dict | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a complete model folder atomically and return its path.

    extra_files maps a file name to either a callable(path) that writes it, or a source path to copy.
    The metadata (file hashes, code version, package versions, `meta`) is written last.
    """
    out_dir = Path(out_dir)
    if (out_dir / META_FILE).exists():
        raise CpmantError(f"{out_dir} already holds a complete checkpoint", "choose another folder or delete it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save(tmp / CONFIG_FILE)
    if vocab_path is not None:
        shutil.copyfile(vocab_path, tmp / VOCAB_FILE)
    for name, src in (extra_files or {}).items():
        if callable(src):
            src(tmp / name)
        else:
            shutil.copyfile(src, tmp / name)
    for f in tmp.iterdir():  # durable before the metadata says "complete"
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    full_meta = {
        "format": "cpmant",
        "format_version": FORMAT_VERSION,
        "created_unix": time.time(),
        "git_sha": git_sha(),
        "packages": package_versions(),
        "num_parameters": int(sum(t.numel() for t in tensors.values())),
        "files_sha256": files,
        **(meta or {}),
    }
    write_json_atomic(tmp / META_FILE, full_meta)
    _fsync_dir(tmp)
    if out_dir.exists():  # an incomplete leftover (no metadata): replace it
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    return out_dir


def is_complete(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not is_complete(path):
        raise CpmantError(
            f"{path} is not a complete cpmant checkpoint (no {META_FILE})",
            "point at a folder written by cpmant (a model folder or a step-N checkpoint); an interrupted save "
            "leaves no metadata and is ignored by --resume auto",
        )
    return json.loads((path / META_FILE).read_text(encoding="utf-8"))


def load_model_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None, dict]:
    """Read a model folder: (config, state_dict, vocab path or None, metadata). Safetensors only, no pickle."""
    path = Path(path)
    meta = read_meta(path)
    config = ModelConfig.load(path / CONFIG_FILE)
    state_dict = load_file(str(path / WEIGHTS_FILE))
    vocab = path / VOCAB_FILE
    return config, state_dict, (vocab if vocab.exists() else None), meta


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build the model and tokenizer of a model folder: (model in eval mode, tokenizer)."""
    from .model import CPMAnt
    from .tokenizer import CPMAntTokenizer

    config, state_dict, vocab, _ = load_model_dir(path)
    if vocab is None:
        raise CpmantError(f"{path} has no {VOCAB_FILE}", "copy the vocab the model was trained with into the folder")
    if config.quantization or config.moe_experts:  # int8 weights and/or MoE FFNs
        from .compress.quantize import build_quantized_skeleton

        model = build_quantized_skeleton(config)
        model.load_state_dict(state_dict, strict=True)
    else:
        # built on the meta device and given the loaded tensors: no random init that the weights would overwrite
        with torch.device("meta"):
            model = CPMAnt(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device).eval()
    return model, CPMAntTokenizer(vocab)


# ---- training checkpoints: step-N folders, a `latest` pointer, retention ---------------------------
def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_complete_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and is_complete(p):
            try:
                out.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                continue
    return sorted(out)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer if it names a complete one, else the highest step."""
    root = Path(ckpt_root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        cand = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(cand):
            newest = list_complete_checkpoints(root)
            if not newest or newest[-1][1] == cand:
                return cand
    ckpts = list_complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def save_training_checkpoint(
    ckpt_root: str | Path,
    step: int,
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    vocab_path: str | Path,
    training_state: dict,
    meta: dict | None = None,
    keep_last: int = 2,
    keep_every: int = 0,
) -> Path:
    """Save step-N atomically, move `latest` to it, then prune by the retention policy.

    Retention: the newest `keep_last` checkpoints, plus every step that is a multiple of `keep_every` (when > 0).
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / step_dir_name(step)
    # checkpoints past this step belong to an abandoned history (a resume from an older step, or a restart with
    # --resume never in the same folder): they must not outlive it, or `latest` would jump back to them
    for s_, p in list_complete_checkpoints(root):
        if s_ > step:
            shutil.rmtree(p, ignore_errors=True)
    if is_complete(path):
        old = read_meta(path)
        same = all(old.get(k) == v for k, v in (meta or {}).items() if k in ("config_sha256", "data_sha256"))
        if same:  # the same step of the same run saved twice (a resumed run re-reaching it): keep it
            _point_latest(root, path)
            return path
        shutil.rmtree(path)
    save_model_dir(
        path, state_dict, config, vocab_path, meta={"step": step, **(meta or {})},
        extra_files={TRAINING_STATE_FILE: lambda p: torch.save(training_state, p)},
    )
    _point_latest(root, path)
    prune_checkpoints(root, keep_last=keep_last, keep_every=keep_every)
    return path


def _point_latest(root: Path, path: Path) -> None:
    tmp_pointer = root / f".{LATEST_FILE}.tmp-{os.getpid()}"
    tmp_pointer.write_text(path.name + "\n", encoding="utf-8")
    os.replace(tmp_pointer, root / LATEST_FILE)


def prune_checkpoints(ckpt_root: str | Path, keep_last: int = 2, keep_every: int = 0) -> list[Path]:
    ckpts = list_complete_checkpoints(ckpt_root)
    keep = {p for _, p in ckpts[-max(keep_last, 1):]}
    if keep_every > 0:
        keep |= {p for s, p in ckpts if s % keep_every == 0}
    removed = []
    for _, p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    # leftovers of interrupted saves
    for p in Path(ckpt_root).glob(".step-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    return removed


def load_training_state(path: str | Path) -> dict:
    """Optimizer/scheduler/RNG/data position; weights_only=True loads tensors and containers, never code."""
    return torch.load(Path(path) / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
