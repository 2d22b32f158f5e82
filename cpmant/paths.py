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
