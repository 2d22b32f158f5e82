"""Memory sizes: `parse_size("64MB")` (binary units) and how plans print them."""

from __future__ import annotations

import math
import re

from ..errors import CpmantError

_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
          "G": 1024**3, "GB": 1024**3, "GIB": 1024**3, "T": 1024**4, "TB": 1024**4, "TIB": 1024**4}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as `64MB`, `1.5GB`, `512KiB` or `1048576` (units are binary: 1 MB = 1 MiB = 2**20,
    matching the MiB that peak memory is reported in). Raises CpmantError for anything else or a size <= 0."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _SIZE_RE.match(str(text))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise CpmantError(f"cannot read the memory size {text!r}",
                              "write a number with a unit: 64MB, 1.5GB, 512KB (binary units) or bytes")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise CpmantError(f"the memory size {text!r} is not positive", "give a budget such as 64MB")
    return n


def _round_up_size(n: float) -> str:
    return f"{math.ceil(n / 2**10)}KB" if n < 10 * 2**20 else f"{math.ceil(n / 2**20)}MB"


def format_size(n: int) -> str:
    """Bytes in MiB (KiB below one MiB, so that a tiny budget never reads 0.0 MiB)."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
