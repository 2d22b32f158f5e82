"""Where state lives: one home folder, CPMANT_HOME (default ./.cpmant)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import CpmantError


def cpmant_home(create: bool = True) -> Path:
    """The home folder (CPMANT_HOME, default ./.cpmant), created and checked for writing."""
    home = Path(os.environ.get("CPMANT_HOME", ".cpmant")).expanduser().resolve()
    if create:
        try:
            home.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=home, prefix=".write-test-"):
                pass
        except OSError as e:
            raise CpmantError(
                f"CPMANT_HOME {home} is not writable ({e.strerror or e})",
                "set CPMANT_HOME to a folder you can write, e.g. `export CPMANT_HOME=$HOME/.cpmant`",
            ) from e
    return home


def subdir(*parts: str) -> Path:
    """A folder under CPMANT_HOME, created."""
    p = cpmant_home().joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---- a home that moves ----------------------------------------------------------------------------------------
# $CPMANT_HOME/home.json records where the home was when its store was made or last opened ({"path", "previous"}).
# When it names another path, the home was copied or moved: registry.tracking.relocate_home rewrites the
# absolute locations its stores hold, and `rehome` maps a path of a previous place (a corpus recorded in a
# checkpoint's metadata, say) to the same place in this home.
HOME_RECORD = "home.json"


def home_record(home: Path) -> dict:
    """The home's record ({} when there is none or it is unreadable)."""
    import json

    try:
        d = json.loads((Path(home) / HOME_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def write_home_record(home: Path, previous: list[str] | None = None) -> None:
    """Record `home` as where this home is now, and the places it was before (oldest first)."""
    from .fsutil import write_json_atomic

    write_json_atomic(Path(home) / HOME_RECORD, {"path": str(home), "previous": list(previous or [])})


def rehome(path: str | Path) -> Path:
    """`path` itself when it exists; a path under a previous place of this home (home.json's `previous`) that no
    longer exists maps to the same place under the home now."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    home = cpmant_home(create=False)
    for old in reversed(home_record(home).get("previous") or []):
        try:
            moved = home / p.relative_to(old)
        except ValueError:
            continue
        if moved.exists():
            return moved
    return p
