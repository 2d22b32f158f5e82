"""One home for atomic file writes: write a temporary file beside the target, fsync it, rename it into place, fsync
the folder. A reader sees the old file or the new one, never a half-written one (a killed process leaves at most a
`.NAME.tmp-PID` file, which nothing reads). `check_writable` checks an output path before the work that fills it;
`check_free_space` and `disk_full_as_error` turn a full disk into one CpmantError naming the folder and the space."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Pretty, sorted, UTF-8 JSON (stable bytes for the same object), written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def check_writable(path: str | Path, flag: str, folder: bool = False) -> Path:
    """Check, before any work, that `path` (a file to write, or with `folder` a folder to fill) can be written: no
    ancestor is a file, a file path is not a folder, and the nearest existing folder takes a new file (tried with a
    temporary file: permission bits alone miss read-only mounts, /proc, and root's rights). A CpmantError naming
    `flag` otherwise; the resolved path when it can."""
    import tempfile

    from .errors import CpmantError

    path = Path(path).expanduser().absolute()
    fix = f"pass {flag} a path in a folder you can write"
    if not folder and path.is_dir():
        raise CpmantError(f"{flag} {path} is a folder, not a file", f"pass {flag} a file name inside it")
    start = path if folder else path.parent
    existing = next((p for p in (start, *start.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CpmantError(f"{flag} {path} cannot be made: {existing} is a file", fix)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise CpmantError(f"{flag} {path} cannot be written: {existing} does not take new files "
                          f"({e.strerror or e})", fix) from None
    return path


def is_disk_full(exc: BaseException) -> bool:
    """An OSError ENOSPC (or EDQUOT), or a library's error that wraps one only in its text (safetensors'
    SafetensorError, MLflow's MlflowException `[Errno 28]`)."""
    import errno

    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = str(exc)
    return "No space left on device" in text or "[Errno 28]" in text or "Disk quota exceeded" in text


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def disk_full_error(folder: str | Path, need_bytes: int, free_bytes: int | None = None):
    """The CpmantError for a full disk: the folder, the space the write needs and the space free."""
    import shutil

    from .errors import CpmantError

    folder = Path(folder)
    if free_bytes is None:
        existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
        free_bytes = shutil.disk_usage(existing).free
    return CpmantError(f"no space left on the disk of {folder}: writing there needs about {_mb(need_bytes)}, "
                       f"{_mb(free_bytes)} is free",
                       "free space on that disk (old runs under $CPMANT_HOME/runs, checkpoints you no longer need), "
                       "or set CPMANT_HOME to a folder on a bigger disk; then run the same command again")


def check_free_space(folder: str | Path, need_bytes: int, usage=None) -> None:
    """Refuse, before writing, when the disk of `folder` (or its nearest existing parent) has less than
    `need_bytes` free. `usage` is shutil.disk_usage (a parameter for tests)."""
    import shutil

    usage = usage or shutil.disk_usage
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:
        return
    free = usage(existing).free
    if free < need_bytes:
        raise disk_full_error(folder, need_bytes, free)


@contextlib.contextmanager
def disk_full_as_error(folder: str | Path, need_bytes: int, cleanup: Path | None = None):
    """Writes inside turn a full disk (is_disk_full) into one CpmantError naming `folder` and the space needed,
    after removing `cleanup` (a half-written staging folder), so nothing partial is left behind."""
    import shutil

    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise disk_full_error(folder, need_bytes) from e
