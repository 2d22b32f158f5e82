"""Run folders: what identifies a pretraining configuration, where it trains, and one process at a time in it.

- `config_sha256(cfg)`: sha256 of the resolved PretrainConfig fields that shape the weights or the reported
  metrics: every field except NOT_HASHED (where to write, how many threads/encoders, checkpoint cadence and
  retention, how to resume). The corpus is taken as its absolute path (None = fortunes-zh), and `precision` as
  the precision it resolves to on the configured device (`auto` on a bf16 machine hashes as `bf16`; a config saved
  with the old `bf16: bool` as bf16 / fp32). This is the run's identity for reuse (registered as
  cpmant.config_sha256).
- `run_key(cfg)`: the same hash without max_steps, so a run that is only extended stays in its folder.
- `reuse_key(cfg, data_sha256, vocab_sha256)`: the pretraining stage's one reuse key (tasks/reuse.py): the hashed
  settings, the data and vocab hashes and the code version (`git_sha()`). It is written beside the result
  (`<run>/inputs.json`, with the finished training's record: `write_finished` / `finished`) and on the registered
  version (tag cpmant.inputs_sha256); a finished training whose registration failed is found by it on disk.
- `resolve_run_dir(cfg)`: output_dir when given, else $CPMANT_HOME/runs/pretrain-<preset>-<run_key[:8]>.
- `RunLock`: an exclusive, non-blocking flock on `<run>/.lock` held while a process trains there.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import yaml

from .. import checkpoint as ckpt
from ..errors import CpmantError
from ..fsutil import write_json_atomic
from ..hashing import sha256_json
from ..paths import subdir
from .config import PretrainConfig, upgrade_bf16

# fields that change neither the weights nor the reported numbers
NOT_HASHED = frozenset({"resume", "output_dir", "num_threads", "encode_workers", "save_interval", "keep_last",
                        "keep_every", "allow_changed_settings", "node_rank", "rdzv_endpoint", "rdzv_id"})
LOCK_FILE = ".lock"
KEY_FILE = "inputs.json"  # the reuse key of the run folder's finished training, and its record


def configured_device(device: str) -> str:
    """The device type a config's `device` names on this machine: auto -> cuda when available, else cpu."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run_precision(cfg: PretrainConfig | dict) -> str:
    """The precision (fp32 / bf16) a config trains in on this machine, on its configured device."""
    from ..precision import resolve_precision

    d = upgrade_bf16(cfg.model_dump(mode="json") if isinstance(cfg, PretrainConfig) else dict(cfg))
    return resolve_precision(d.get("precision", "fp32"), configured_device(d.get("device", "auto")))


def settings(cfg: PretrainConfig | dict, with_max_steps: bool = True) -> dict:
    """The hashed fields of a config (or of a saved config's dict), the corpus as an absolute path, the precision
    resolved (see the module doc)."""
    d = upgrade_bf16(cfg.model_dump(mode="json") if isinstance(cfg, PretrainConfig) else dict(cfg))
    out = {k: v for k, v in d.items() if k not in NOT_HASHED}
    out["precision"] = run_precision(d)
    if out.get("corpus"):
        out["corpus"] = str(Path(out["corpus"]).expanduser().resolve())
    if not with_max_steps:
        out.pop("max_steps", None)
    return out


def config_sha256(cfg: PretrainConfig) -> str:
    """Hash of every setting that affects the weights or the reported metrics (see the module doc)."""
    return sha256_json(settings(cfg))


def run_key(cfg: PretrainConfig) -> str:
    """config_sha256 without max_steps: the run folder's key."""
    return sha256_json(settings(cfg, with_max_steps=False))


def reuse_key(cfg: PretrainConfig, data_sha256: str, vocab_sha256: str) -> str:
    """The pretraining stage's reuse key: every input that shapes the weights or the reported metrics."""
    return sha256_json({"stage": "pretrain", "settings": settings(cfg), "data_sha256": data_sha256,
                        "vocab_sha256": vocab_sha256, "git_sha": ckpt.git_sha()})


def write_finished(run_dir: Path, key: str, record: dict) -> None:
    """Write `key` and the finished training's `record` (what registering it needs) beside the run's model."""
    write_json_atomic(Path(run_dir) / KEY_FILE, {"inputs_sha256": key, **record})


def finished(run_dir: Path, key: str) -> dict | None:
    """The record of the run folder's finished training when it was made with `key` and its model folder is
    complete; None otherwise."""
    try:
        rec = json.loads((Path(run_dir) / KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("inputs_sha256") != key or not ckpt.is_complete(Path(run_dir) / "model"):
        return None
    return rec


def run_dir_name(cfg: PretrainConfig) -> str:
    return f"pretrain-{cfg.preset}-{run_key(cfg)[:8]}"


def resolve_run_dir(cfg: PretrainConfig, create: bool = True) -> Path:
    if cfg.output_dir:
        p = Path(cfg.output_dir).expanduser().resolve()
    else:
        p = subdir("runs") / run_dir_name(cfg)
    if create:
        p.mkdir(parents=True, exist_ok=True)
    return p


def changed_settings(old: dict, new: PretrainConfig | dict) -> list[str]:
    """`field: old -> new` for each training-affecting setting (max_steps aside) that differs."""
    a, b = settings(old, with_max_steps=False), settings(new, with_max_steps=False)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_saved_config(run_dir: Path) -> dict | None:
    """A run folder's saved config.yaml as a dict (None when missing or unreadable)."""
    try:
        d = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return d if isinstance(d, dict) else None


class RunLock:
    """Exclusive lock of a run folder for this process (flock on <run>/.lock, released on exit or death)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.f = None

    def acquire(self) -> "RunLock":
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            run = self.path.parent
            raise CpmantError(
                f"run folder {run} is in use by another process (pid {pid})",
                f"wait for it to finish or stop it (`kill {pid}`), or train elsewhere with "
                "--set pretrain.output_dir=DIR",
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.f = f
        return self

    def release(self) -> None:
        if self.f is not None:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
            self.f.close()
            self.f = None

    @staticmethod
    def is_held(run_dir: Path) -> bool:
        path = Path(run_dir) / LOCK_FILE
        if not path.is_file():
            return False
        with open(path, "a+", encoding="utf-8") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def unfinished_runs(cfg: PretrainConfig, own: Path, data_sha256: str) -> list[tuple[Path, int, dict]]:
    """Other run folders of this preset with checkpoints of an unfinished run on the same data, newest first:
    (folder, latest step, saved config). Folders another process is training in are left out."""
    root = subdir("runs")
    found = []
    for d in root.glob(f"pretrain-{cfg.preset}-*"):
        if d.resolve() == own.resolve() or not d.is_dir():
            continue
        saved = read_saved_config(d)
        ckpts = ckpt.list_complete_checkpoints(d / "checkpoints")
        if saved is None or not ckpts:
            continue
        step, latest = ckpts[-1]
        try:
            meta = ckpt.read_meta(latest)
        except (CpmantError, ValueError, OSError):
            continue
        if step >= int(saved.get("max_steps", 0)) or meta.get("data_sha256") != data_sha256:
            continue
        if RunLock.is_held(d):
            continue
        found.append((latest.stat().st_mtime, d, step, saved))
    return [(d, s, saved) for _, d, s, saved in sorted(found, key=lambda x: x[0], reverse=True)]
