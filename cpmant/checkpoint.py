"""Checkpoints: self-describing folders, written atomically, metadata last.

A model folder holds `model.safetensors`, `config.json`, `vocab.txt` and `cpmant_meta.json`. The metadata file is
written last, inside a temporary folder that is then renamed into place, so a folder that has it is complete.
A training checkpoint (`step-NNNNNNNN/`) is a model folder plus `training_state.pt` (optimizer, scheduler, RNG,
data position) saved with `torch.save` of tensors and plain containers only, and read back with
`torch.load(weights_only=True)`, which refuses any pickled code.

Integrity: the metadata records every file's sha256 and size, computed once while saving. `verify_checkpoint`
checks them (a folder saved before hashes were recorded is checked by reading its files); loading always checks the
sizes, and any damaged file gives one CpmantError naming it and the fix. `latest_intact_checkpoint` finds the newest
step folder that passes, with the reasons the newer ones were skipped. Models are built by `cpmant.factory`.
"""

from __future__ import annotations

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
from .factory import build_model
from .fsutil import atomic_write_text, check_free_space, disk_full_as_error, fsync_dir, write_json_atomic
from .hashing import BLOCK, Sha256, sha256_file

META_FILE = "cpmant_meta.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"
TRAINING_STATE_FILE = "training_state.pt"
LATEST_FILE = "latest"
FORMAT_VERSION = 1


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


def _durable_sha256(path: Path, chunk: int = BLOCK) -> str:
    """fsync a just-written file and hash it in the same pass (the only time a save reads it back)."""
    h = Sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
        os.fsync(f.fileno())
    return h.hexdigest()


def staging_dir(out_dir: Path) -> Path:
    """A fresh hidden sibling of `out_dir` to write a checkpoint into, renamed into place once complete (model and
    delta checkpoints alike); a folder that already holds a complete checkpoint is refused."""
    if (out_dir / META_FILE).exists():
        raise CpmantError(f"{out_dir} already holds a complete checkpoint", "choose another folder or delete it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def checkpoint_bytes(tensors: dict[str, torch.Tensor], extra_files: dict | None = None) -> int:
    """About the bytes a checkpoint folder takes: its weights, twice more for a training state (AdamW's two
    moments), 1 MiB for the small files."""
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    return weights * (3 if TRAINING_STATE_FILE in (extra_files or {}) else 1) + (1 << 20)


def _write_files(tmp: Path, tensors: dict, config: ModelConfig, vocab_path, extra_files: dict | None) -> None:
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save(tmp / CONFIG_FILE)
    if vocab_path is not None:
        shutil.copyfile(vocab_path, tmp / VOCAB_FILE)
    for name, src in (extra_files or {}).items():
        if callable(src):
            src(tmp / name)
        else:
            shutil.copyfile(src, tmp / name)


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
    The metadata (each file's sha256 and size, code version, package versions, `meta`) is written last. A disk
    without room for it (checked first) or one that fills while writing is one CpmantError naming the folder and
    the space needed; the half-written staging folder is removed.
    """
    out_dir = Path(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    need = checkpoint_bytes(tensors, extra_files)
    check_free_space(out_dir.parent, need)  # a full disk is refused before writing, not half-way
    tmp = staging_dir(out_dir)
    with disk_full_as_error(out_dir.parent, need, cleanup=tmp):  # and a disk that fills meanwhile: one error
        _write_files(tmp, tensors, config, vocab_path, extra_files)
        # durable before the metadata says "complete"; hashed once, here, so that nothing needs to hash it again
        written = [p for p in sorted(tmp.iterdir()) if p.is_file()]
        files = {p.name: _durable_sha256(p) for p in written}
        full_meta = {
            "format": "cpmant",
            "format_version": FORMAT_VERSION,
            "created_unix": time.time(),
            "git_sha": git_sha(),
            "packages": package_versions(),
            "num_parameters": int(sum(t.numel() for t in tensors.values())),
            "files_sha256": files,
            "files_bytes": {p.name: p.stat().st_size for p in written},
            **(meta or {}),
        }
        write_json_atomic(tmp / META_FILE, full_meta)
        fsync_dir(tmp)
    if out_dir.exists():  # an incomplete leftover (no metadata): replace it
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    return out_dir


def is_complete(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not is_complete(path):
        if not path.exists():
            raise CpmantError(f"checkpoint folder {path} does not exist", "check the path")
        raise CpmantError(
            f"{path} is not a complete cpmant checkpoint (no {META_FILE})",
            "point at a folder written by cpmant (a model folder or a step-N checkpoint); an interrupted save "
            "leaves no metadata and is ignored by --resume auto",
        )
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, META_FILE, f"it cannot be read: {_reason(e)}") from None
    if not isinstance(meta, dict):
        raise _damaged(path, META_FILE, "it does not hold a JSON object")
    return meta


def update_meta(path: str | Path, changes: dict) -> dict:
    """Add or replace metadata keys of a complete folder (atomically; file hashes kept). Returns the new metadata."""
    meta = {**read_meta(path), **changes}
    write_json_atomic(Path(path) / META_FILE, meta)
    return meta


def recorded_sha256(path: str | Path, name: str = WEIGHTS_FILE) -> str:
    """The sha256 of file `name` recorded when the folder was saved (computed now for a folder that has none)."""
    got = read_meta(path).get("files_sha256", {}).get(name)
    return got if got else sha256_file(Path(path) / name)


# ---- integrity: damaged files give one clear error ---------------------------------------------------
def _reason(e: BaseException) -> str:
    """One short line for an exception (never the advice some loaders append, such as unpickling code)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _damaged(folder: Path, name: str, why: str) -> CpmantError:
    step = folder.name.startswith("step-")
    fix = (f"delete {folder}: `--resume auto` then resumes from the newest intact checkpoint" if step else
           f"restore {name} from a good copy (pull, convert or save the model again), or delete {folder}")
    return CpmantError(f"{name} in {folder} is damaged ({why})", fix)


def _check_sizes(folder: Path, meta: dict) -> None:
    """Cheap: every recorded file is present with its recorded size (catches truncation without reading)."""
    for name, size in (meta.get("files_bytes") or {}).items():
        f = folder / name
        if not f.is_file():
            raise _damaged(folder, name, "the file is missing")
        got = f.stat().st_size
        if got != size:
            raise _damaged(folder, name, f"truncated? {got} bytes, {size} when saved" if got < size
                           else f"{got} bytes, {size} when saved")


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    f = folder / WEIGHTS_FILE
    if not f.is_file():
        raise _damaged(folder, WEIGHTS_FILE, "the file is missing")
    try:
        return load_file(str(f))
    except Exception as e:  # SafetensorError, OSError, ...: one message whatever the reader says
        raise _damaged(folder, WEIGHTS_FILE, f"truncated? it cannot be read: {_reason(e)}") from None


def _load_config(folder: Path) -> ModelConfig:
    f = folder / CONFIG_FILE
    if not f.is_file():
        raise _damaged(folder, CONFIG_FILE, "the file is missing")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(folder, CONFIG_FILE, f"truncated? it cannot be read: {_reason(e)}") from None
    if not isinstance(d, dict):
        raise _damaged(folder, CONFIG_FILE, "it does not hold a JSON object")
    return ModelConfig.from_dict(d)


def _load_state(folder: Path) -> dict:
    f = folder / TRAINING_STATE_FILE
    if not f.is_file():
        raise _damaged(folder, TRAINING_STATE_FILE, "the file is missing")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError (bad zip), UnpicklingError, EOFError, OSError
        raise _damaged(folder, TRAINING_STATE_FILE, "truncated? it cannot be read as a training state "
                       f"({type(e).__name__})") from None


DELTA_WEIGHTS_FILE = "delta.safetensors"  # cpmant.delta.checkpoint's weights file


def _refuse_delta(folder: Path) -> None:
    """A delta folder holds only delta weights: it is not a model on its own (saying "model.safetensors is
    missing" would send the user looking for a lost file)."""
    if (folder / DELTA_WEIGHTS_FILE).is_file() and not (folder / WEIGHTS_FILE).is_file():
        raise CpmantError(f"{folder} is a delta checkpoint (only delta weights; its base is named in "
                          "delta_config.json), not a model on its own",
                          "load it with registry.pulling.load_model(folder) (it composes the base and the delta), "
                          "or pull it with `cpmant pull URI --merge` for a plain checkpoint")


def verify_checkpoint(path: str | Path) -> None:
    """Raise CpmantError naming the first damaged or missing file of a complete checkpoint folder; else return.

    Folders saved with hashes are checked against them (sizes first, then sha256 of every recorded file). A folder
    from before hashes were recorded is checked by reading every file instead.
    """
    folder = Path(path)
    _refuse_delta(folder)
    meta = read_meta(folder)
    hashes = meta.get("files_sha256") or {}
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise _damaged(folder, name, "the file is missing")
    if not hashes:
        _load_config(folder)
        _load_weights(folder)
        if (folder / TRAINING_STATE_FILE).exists():
            _load_state(folder)
        if (folder / VOCAB_FILE).exists():
            try:
                (folder / VOCAB_FILE).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise _damaged(folder, VOCAB_FILE, f"it cannot be read: {_reason(e)}") from None
        return
    _check_sizes(folder, meta)
    for name, want in hashes.items():
        f = folder / name
        if not f.is_file():
            raise _damaged(folder, name, "the file is missing")
        if sha256_file(f) != want:
            size = meta.get("files_bytes", {}).get(name)
            why = ("truncated? " if size is not None and f.stat().st_size < size else "") + \
                "its sha256 differs from the one recorded when it was saved (changed or bit-flipped)"
            raise _damaged(folder, name, why)


def load_model_dir(
    path: str | Path, verify: bool = False
) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None, dict]:
    """Read a model folder: (config, state_dict, vocab path or None, metadata). Safetensors only, no pickle.

    File sizes are always checked against the metadata (free); verify=True also checks every sha256 first.
    A damaged file raises one CpmantError naming it.
    """
    path = Path(path)
    _refuse_delta(path)
    meta = read_meta(path)
    if verify:
        verify_checkpoint(path)
    else:
        _check_sizes(path, meta)
    config = _load_config(path)
    state_dict = _load_weights(path)
    vocab = path / VOCAB_FILE
    return config, state_dict, (vocab if vocab.exists() else None), meta


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    verify: bool = False):
    """Build the model and tokenizer of a model folder: (model in eval mode, tokenizer).

    The model comes from `cpmant.factory.build_model` (dense, MoE or int8, as config.json says), built on the meta
    device and given the loaded tensors: no random init that the weights would overwrite.
    """
    from .tokenizer import CPMAntTokenizer

    config, state_dict, vocab, _ = load_model_dir(path, verify=verify)
    if vocab is None:
        raise CpmantError(f"{path} has no {VOCAB_FILE}", "copy the vocab the model was trained with into the folder")
    model = build_model(config, meta=True)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:  # keys or shapes that config.json does not describe
        raise CpmantError(f"the weights in {Path(path) / WEIGHTS_FILE} do not match its {CONFIG_FILE}: "
                          f"{_reason(e)}", "use the config.json saved with these weights") from None
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
    atomic_write_text(root / LATEST_FILE, path.name + "\n")


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
    """Optimizer/scheduler/RNG/data position; weights_only=True loads tensors and containers, never code.

    A damaged file raises one CpmantError naming it (call `verify_checkpoint` first to catch bit flips too).
    """
    return _load_state(Path(path))


def latest_intact_checkpoint(ckpt_root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest step-N folder that is complete and passes `verify_checkpoint`, or None; the newer step folders
    skipped on the way, each with the reason). Only the folders up to the chosen one are hashed."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None, []
    steps = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-"):
            try:
                steps.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                continue
    skipped: list[tuple[Path, str]] = []
    for _, p in sorted(steps, reverse=True):
        if not is_complete(p):
            skipped.append((p, f"incomplete (no {META_FILE}): an interrupted save"))
            continue
        try:
            verify_checkpoint(p)
        except CpmantError as e:
            skipped.append((p, e.problem))
            continue
        return p, skipped
    return None, skipped
