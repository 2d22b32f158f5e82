"""The harness every benchmark runs on: its command line, an isolated CPMANT_HOME, the load average beside every
figure, interleaved timing with warm-ups, medians of paired ratios, a results JSON and a markdown table.

Everything here is about measuring fairly on a small shared machine: peers are timed in the same process, in
alternating order, round after round, and compared by the median of per-round ratios, so that a burst of load
from other work hits one round of both peers rather than one peer's whole measurement.

A benchmark file holds its own measurement and nothing else:

    def measure(args, mode, home, report): ...          # fills report (report["meta"] is already there)
    def table(report) -> str: ...                       # markdown, made with markdown_table()
    if __name__ == "__main__":
        sys.exit(run_benchmark("name", __doc__, MODES, measure, table))

and `run_benchmark` does the rest: --quick / --home / --out, SIGTERM cleanup, the temporary home, the load average
at the start and end, the timing of the whole run, bench/results/<name>.json and the printed table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


# ================================================================================================================
# the run: command line, environment, report, JSON, table
# ================================================================================================================
def run_benchmark(name: str, doc: str, modes: dict[str, dict], measure: Callable, table: Callable[[dict], str], *,
                  arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                  quick_help: str = "a smoke run: fewer rounds and steps", argv=None) -> int:
    """Parse the command line, run `measure(args, mode, home, report)` in an isolated home, write the JSON to
    bench/results/<name>.json (or --out), print `table(report)` and the load average; 0 on success.

    modes: "full" and "quick" -> the settings `measure` reads (recorded in the JSON's meta).
    arguments: adds the benchmark's own options to the parser.
    """
    ap = argparse.ArgumentParser(prog=f"bench_{name}.py", description=doc.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--home", help="CPMANT_HOME to use (kept; default: a temporary folder, removed at the end)")
    ap.add_argument("--out", default=str(RESULTS_DIR / f"{name}.json"), help="where the JSON goes")
    counts = [k for k, v in modes["full"].items() if isinstance(v, int) and not isinstance(v, bool)]
    for k in counts:  # every count of a mode can be set on its own: --rounds 3, --steps 10, ...
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, metavar="N",
                        help=f"override the mode's {k} (full {modes['full'][k]}, quick {modes['quick'][k]})")
    if arguments is not None:
        arguments(ap)
    args = ap.parse_args(argv)

    with sigterm_exits():
        return _run(name, args, modes, counts, measure, table)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within it a plain `kill` (SIGTERM) raises SystemExit, so that `finally` blocks run (the temporary home is
    removed); the previous handler is put back after."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(name: str, args, modes: dict[str, dict], counts: list[str], measure: Callable,
         table: Callable[[dict], str]) -> int:
    home, made = isolate_environment(args.home)
    mode_name = "quick" if args.quick else "full"
    mode = dict(modes[mode_name])
    mode.update({k: getattr(args, k) for k in counts if getattr(args, k) is not None})
    t_start = time.perf_counter()
    try:
        report: dict = {"meta": {"benchmark": name, "mode": mode_name, **mode, **environment_info(),
                                 "cpmant_home": str(home), "load_average_start": load_average(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}}
        warn_if_busy()
        measure(args, mode, home, report)
        meta = report["meta"]
        meta["load_average_end"] = load_average()
        meta["seconds"] = round(time.perf_counter() - t_start, 1)
        path = write_json(Path(args.out), report)
        print()
        print(table(report))
        print(f"\nload average {meta['load_average_start']} -> {meta['load_average_end']} on {os.cpu_count()} "
              f"cores; {meta['seconds']} s; wrote {path}")
    finally:
        cleanup_home(home, made)
    return 0


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
    quiet = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    for k, v in quiet.items():
        os.environ.setdefault(k, v)
    # the OpenMP defaults the CLI sets (GOMP_SPINCOUNT=100000 unless the environment tunes it): effective only
    # if torch is not imported yet, so benchmark files import torch inside measure()
    from cpmant.threads import apply_thread_env_defaults

    if "torch" not in sys.modules:
        apply_thread_env_defaults()
    return path, made


def cleanup_home(path: Path, made: bool) -> None:
    if made:
        shutil.rmtree(path, ignore_errors=True)


def environment_info() -> dict:
    import torch
    from _limits import cpu_flags
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                    if k in os.environ},
        "transformers": transformers.__version__,
        "cpu_flags": cpu_flags(),  # every figure names the CPU flags it ran with (bench/_limits.py)
    }


def write_json(path: Path, data: dict) -> Path:
    from cpmant.fsutil import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


# ================================================================================================================
# load average: recorded beside every figure
# ================================================================================================================
def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def warn_if_busy() -> None:
    la = load_average()
    print(f"load average {la} on {os.cpu_count()} cores", flush=True)
    if la and la[0] > (os.cpu_count() or 1):
        print("   note: the machine is busier than its core count; expect noisy numbers (ratios are still "
              "paired, but multi-thread OpenMP slows down badly when a core is taken)", flush=True)


@contextlib.contextmanager
def recording_load(entry: dict) -> Iterator[dict]:
    """Record the load average before and after the figures measured inside, as entry["load_average"]."""
    before = load_average()
    try:
        yield entry
    finally:
        entry["load_average"] = {"before": before, "after": load_average()}


# ================================================================================================================
# timing
# ================================================================================================================
Peer = Callable[[], object] | tuple[Callable[[], object], Callable[[object], None]]


def interleave(peers: dict[str, Peer], rounds: int, warmup: int = 0) -> dict[str, list[float]]:
    """Wall seconds of each peer, once per round; the order rotates every round so no peer always goes first.

    A peer is a function, or (function, cleanup): cleanup(result) runs untimed after each call (fresh
    destinations, freed disk). `warmup` untimed rounds come first (caches, allocators, lazy imports).
    """
    names = list(peers)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(-warmup, rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            run, cleanup = peers[n] if isinstance(peers[n], tuple) else (peers[n], None)
            t0 = time.perf_counter()
            res = run()
            if r >= 0:
                out[n].append(time.perf_counter() - t0)
            if cleanup is not None:
                cleanup(res)
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


class Peak:
    """The machine's matmul peak, sampled at several moments of the run; the best sample wins.

    measure_matmul_peak already keeps the best matmul of its window, but on a shared machine a whole window can
    fall in a busy moment; a low peak would inflate every MFU (we saw > 100%), so MFUs use the best of all samples.
    """

    def __init__(self, dtype: str = "fp32"):
        self.dtype = dtype  # "fp32" or "bf16": the peak of the dtype the measured step computes in
        self.samples: list[float] = []

    def sample(self) -> float:
        from _limits import matmul_peak

        self.samples.append(matmul_peak(self.dtype, seconds=1.0) or float("nan"))
        return self.samples[-1]

    @property
    def best(self) -> float:  # nan only when no sample could be taken (bf16 on a CPU without it)
        return max((x for x in self.samples if x == x), default=float("nan"))


class Phases:
    """Timing wrappers patched around (owner, attribute) pairs; inclusive seconds and calls per label.

    Nothing in the measured code changes: the wrappers go in at run time and `restore` takes them out.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.bytes_seen = 0  # sum of os.path.getsize(first argument) over calls wrapped with count_bytes
        self._undo: list[tuple[object, str, object]] = []
        self.missing: list[str] = []  # wrapped names the code does not have (any more)

    def wrap(self, owner, attr: str, label: str, count_bytes: bool = False) -> bool:
        """Time owner.attr under `label`; False (and the name in `missing`) when the code no longer has it."""
        orig = getattr(owner, attr, None)
        if orig is None:
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return False
        phases = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                phases.seconds[label] = phases.seconds.get(label, 0.0) + time.perf_counter() - t0
                phases.calls[label] = phases.calls.get(label, 0) + 1
                if count_bytes and args:
                    with contextlib.suppress(OSError, TypeError):
                        phases.bytes_seen += os.path.getsize(args[0])

        self._undo.append((owner, attr, orig))
        setattr(owner, attr, timed)
        return True

    def restore(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes_seen = {}, {}, 0

    def snapshot(self) -> dict:
        return {"seconds": dict(self.seconds), "calls": dict(self.calls), "bytes_seen": self.bytes_seen}


def _tree_rows(tree, seconds: dict[str, float], total: float, top: str) -> list[dict]:
    """Rows in tree order with depth, seconds and share of total, plus an 'other' line under every parent."""
    children: dict[str | None, list[str]] = {}
    for label, parent in tree:
        children.setdefault(parent, []).append(label)
    rows: list[dict] = []

    def emit(parent: str | None, depth: int) -> None:
        parent_s = total if parent is None else seconds.get(parent, 0.0)
        acc = 0.0
        for label in children.get(parent, []):
            s = seconds.get(label, 0.0)
            acc += s
            rows.append({"phase": label, "depth": depth, "seconds": round(s, 4), "share": round(s / total, 4)})
            emit(label, depth + 1)
        if children.get(parent):
            other = parent_s - acc
            name = f"other in {top}" if parent is None else f"other in {parent}"
            rows.append({"phase": name, "depth": depth, "seconds": round(other, 4), "share": round(other / total, 4)})

    emit(None, 1)
    return rows


def breakdown(tree, snaps: list[dict], totals: list[float], top: str) -> dict:
    """Typical phases over the measured rounds. tree: (label, parent label or None) in display order; snaps: one
    Phases.snapshot() per round; totals: each round's wall seconds.

    Every leaf phase and every 'other' line is the median of its per-round seconds, and every parent is the sum
    of its rows, so the rows add up; their sum (`sum_of_medians_s`) is close to, but not exactly, the median total.
    A median is robust to a load burst hitting one phase in one round. Every round's seconds are in `all_rounds`.
    """
    per_round = [_tree_rows(tree, snap["seconds"], total, top) for snap, total in zip(snaps, totals)]
    parents = {parent for _, parent in tree if parent is not None}
    rows = [dict(row) for row in per_round[0]]
    for i, row in enumerate(rows):
        row["seconds"] = median(r[i]["seconds"] for r in per_round)
    for i in sorted(range(len(rows)), key=lambda i: -rows[i]["depth"]):  # parents as sums, deepest first
        if rows[i]["phase"] in parents:
            j, acc = i + 1, 0.0
            while j < len(rows) and rows[j]["depth"] > rows[i]["depth"]:
                if rows[j]["depth"] == rows[i]["depth"] + 1:
                    acc += rows[j]["seconds"]
                j += 1
            rows[i]["seconds"] = acc
    total = sum(r["seconds"] for r in rows if r["depth"] == 1)
    for row in rows:
        row["seconds"] = round(row["seconds"], 4)
        row["share"] = round(row["seconds"] / total, 4) if total else float("nan")
    return {"sum_of_medians_s": round(total, 4), "median_total_s": round(median(totals), 4), "rounds": len(snaps),
            "phases": rows,
            "all_rounds": [{"total_s": round(t, 4), **{k: round(v, 4) for k, v in snap["seconds"].items()}}
                           for snap, t in zip(snaps, totals)]}


# ================================================================================================================
# output
# ================================================================================================================
def markdown_table(header, rows) -> str:
    """A markdown table, columns padded so that it also reads as plain text."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


@contextlib.contextmanager
def quiet_mlflow(log_path: Path):
    """MLflow's progress bars, INFO lines, "Created version" notes and warnings go to a log file, not the terminal
    (its last lines are shown if the run fails)."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    import mlflow  # noqa: F401  (configures its loggers on import; lower them afterwards)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    with open(log_path, "a", encoding="utf-8") as log, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with contextlib.redirect_stderr(log):
                yield
        except BaseException:
            log.flush()
            tail = Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
            print("\n".join(["--- last lines of " + str(log_path), *tail]), file=sys.stderr)
            raise


def pretrain_stream(docs, model_config, seq_len: int, cfg=None, seed: int | None = None, **overrides):
    """A PretrainStream built as the pretraining loop builds its own (its <s>/</s> ids and cfg's packing settings;
    cfg=None: PretrainConfig's defaults)."""
    from cpmant.tokenizer import BOS_ID, EOS_ID
    from cpmant.training.config import PretrainConfig
    from cpmant.training.data import PretrainStream

    cfg = cfg or PretrainConfig()
    kw = dict(bos=BOS_ID, eos=EOS_ID, min_piece_tokens=cfg.min_piece_tokens, max_piece_tokens=cfg.max_piece_tokens,
              lm_share=cfg.lm_share, mask_ratio=(cfg.mask_ratio_min, cfg.mask_ratio_max),
              seed=cfg.seed if seed is None else seed, **overrides)
    return PretrainStream(docs, model_config, seq_len, **kw)


def fixture_texts() -> list[str]:
    """The lines of the test fixture corpus (tests/fixtures/corpus): a vocabulary for benchmarks' random models."""
    corpus = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "corpus"
    return [ln for f in sorted(corpus.glob("*.txt")) for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]


def prepare_default_corpus():
    """The default corpus (fortunes-zh, fetched with apt-get download unless the home has it) with the tiny
    preset's 8000-token vocab, encoded: cpmant.training.prepare.prepare_data(None, "tiny")."""
    from cpmant.training.prepare import prepare_data

    print("   preparing the default corpus (fortunes-zh) and its 8000-token vocab", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # build_vocab's note about rare characters
        return prepare_data(None, "tiny", progress=False)


def vocab_size_of(prepared) -> int:
    return sum(1 for _ in open(prepared.vocab_path, encoding="utf-8"))


def our_loss(model, inputs: dict, target, project=None):
    """Mean next-token cross entropy, computed as our training loop does: only the positions in `project`
    (default: those with a target) go through the vocabulary projection (`logits_at`)."""
    import torch.nn.functional as F

    from cpmant.training.data import IGNORE

    sel = target != IGNORE if project is None else project
    return F.cross_entropy(model(**inputs, logits_at=sel), target[sel], ignore_index=IGNORE)
