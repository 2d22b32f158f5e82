"""Helpers shared by the benchmarks: an isolated CPMANT_HOME, interleaved timing, medians, the table and JSON.

Everything here is about measuring fairly on a small shared machine: peers are timed in the same process, in
alternating order, round after round, and compared by the median of per-round ratios, so that a burst of load
from other work hits one round of both peers rather than one peer's whole measurement.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def isolate_environment(home: str | None) -> tuple[Path, bool]:
    """Point CPMANT_HOME at `home` or at a fresh temporary folder; return (home, whether we made it).

    Must run before cpmant/registry modules are used: they read CPMANT_HOME and MLFLOW_TRACKING_URI when called.
    An exported CPMANT_HOME is deliberately ignored (only --home counts), so a benchmark never writes its runs into
    a user's real MLflow store; MLFLOW_TRACKING_URI is dropped so MLflow uses a SQLite file under that home.
    """
    made = home is None
    path = Path(tempfile.mkdtemp(prefix="cpmant-bench-")) if made else Path(home).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["CPMANT_HOME"] = str(path)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    quiet = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false"}
    for k, v in quiet.items():
        os.environ.setdefault(k, v)
    return path, made


def cleanup_home(path: Path, made: bool) -> None:
    if made:
        shutil.rmtree(path, ignore_errors=True)


def interleave(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each fn, once per round; the order rotates every round so no peer always goes first."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t0)
    return out


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]: each ratio compares two measurements taken moments apart."""
    return median(a / b for a, b in zip(num, den) if b > 0)


def spread(xs: list[float]) -> float:
    """(max - min) / median: how much the rounds disagreed, as a hint of the noise behind a number."""
    m = median(xs)
    return (max(xs) - min(xs)) / m if xs and m else float("nan")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment_info() -> dict:
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
    }


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def print_table(rows: list[tuple[str, str, str, str]], header=("measurement", "value", "target", "ok")) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*r))


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")
