"""Benchmark of the model registry: registering and pulling real checkpoints vs a plain copy of the same folder.

Run from the repository root:  .venv/bin/python bench/bench_registry.py [--quick]
Writes bench/results/registry.json and prints a table; bench/README.md ("Registry") explains every number.

For each checkpoint size (real CPMAnt models, ~5 / ~50 / ~300 MB of safetensors; --quick uses the two smaller):
1. `register_checkpoint(dir, name)` vs `shutil.copytree(dir, fresh)` on the same filesystem. Target: within 2x.
2. `download("models:/NAME/VERSION", fresh)` vs `shutil.copytree(<stored artifact folder>, fresh)`. Target: within
   1.5x. Also `checkpoint_dir(uri)` on a warm cache (with and without its sha256 verification).
Peers run in the same process, alternating order round by round, and the median of per-round ratios is reported.
sha256 of the same files is timed alongside as a floor: any design that verifies every byte costs copy + hash.
Every measured registration and pull is also broken into phases (timing wrappers put around the functions that do
the work at run time; no registry code is changed): per-phase medians for the largest size are printed, all sizes and
every round are in the JSON.

The run uses a fresh SQLite store under a temporary CPMANT_HOME (MLFLOW_TRACKING_URI is dropped), never a real one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the environment must be isolated before cpmant/registry modules are used)
    RESULTS_DIR, cleanup_home, environment_info, isolate_environment, load_average, median, paired_ratio,
    print_table, spread, verdict, write_json,
)

TARGET_REGISTER_RATIO = 2.0  # register_checkpoint within 2x a copytree of the folder
TARGET_PULL_RATIO = 1.5  # download within 1.5x a copytree of the stored artifact folder

# Model shapes (on the tiny preset: vocab 8000, prompt 4x8, segments 4) and their safetensors size (fp32)
SIZES = {
    "5MB": dict(dim_model=96, dim_ff=256, num_layers=4, num_heads=4, dim_head=24),  # 1.2 M params, 4.9 MB
    "50MB": dict(dim_model=384, dim_ff=1024, num_layers=6, num_heads=6, dim_head=64),  # 13.7 M params, 55 MB
    "300MB": dict(dim_model=1024, dim_ff=2560, num_layers=6, num_heads=16, dim_head=64),  # 80.6 M params, 322 MB
}
MODES = {
    "full": dict(sizes=["5MB", "50MB", "300MB"], reg_rounds=11, pull_rounds=11),
    "quick": dict(sizes=["5MB", "50MB"], reg_rounds=7, pull_rounds=7),
}
VOCAB_SIZE = 8000  # 10 specials + 7931 CJK characters (U+4E00.., covers 床前明月光) + <s0>..<s58>


# ================================================================================================================
# checkpoints
# ================================================================================================================
def write_vocab(path: Path) -> Path:
    """A synthetic vocab.txt the tokenizer accepts: the 10 specials at ids 0..9, CJK characters, <s0>..<s58>."""
    from cpmant.tokenizer import SENTINELS, SPECIAL_TOKENS

    n_chars = VOCAB_SIZE - len(SPECIAL_TOKENS) - len(SENTINELS)
    tokens = [*SPECIAL_TOKENS, *(chr(0x4E00 + i) for i in range(n_chars)), *SENTINELS]
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def build_checkpoint(out_dir: Path, label: str, vocab: Path) -> dict:
    """A complete checkpoint folder (model.safetensors, config.json, vocab.txt, cpmant_meta.json) of a real model."""
    import torch

    from cpmant.checkpoint import WEIGHTS_FILE, is_complete, save_model_dir
    from cpmant.config import get_preset
    from cpmant.model import CPMAnt
    from cpmant.tokenizer import CPMAntTokenizer

    config = get_preset("tiny").replace(vocab_size=VOCAB_SIZE, **SIZES[label])
    torch.manual_seed(0)
    model = CPMAnt(config)
    n_params = model.num_parameters()
    if not is_complete(out_dir):  # (a --home from an earlier run already has it)
        save_model_dir(out_dir, model.state_dict(), config, vocab,
                       meta={"config_sha256": "c" * 64, "data_sha256": "d" * 64, "bench": "registry"})
    del model
    CPMAntTokenizer(out_dir / "vocab.txt")  # the vocab passes the tokenizer's checks
    return {"label": label, "path": str(out_dir), "params": n_params,
            "safetensors_mb": round((out_dir / WEIGHTS_FILE).stat().st_size / 1e6, 2),
            "folder_mb": round(folder_bytes(out_dir) / 1e6, 2), "config": SIZES[label]}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def sha256_folder(path: Path) -> None:
    """Every file of the folder hashed once: the least any byte-for-byte verification can cost."""
    from cpmant.checkpoint import sha256_file

    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            sha256_file(p)


def stored_model_dir(name: str, version: int) -> Path:
    """The artifact store's folder of a registered version (MLmodel, ..., artifacts/<checkpoint>/)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.utils.file_utils import local_file_uri_to_path

    mv = MlflowClient().get_model_version(name, str(version))
    model_id = mv.model_id or mv.source.removeprefix("models:/")
    return Path(local_file_uri_to_path(mlflow.get_logged_model(model_id).artifact_location))


# ================================================================================================================
# timing: peers alternate round by round; each call has an untimed cleanup (fresh destinations, freed disk)
# ================================================================================================================
Peer = tuple[Callable[[], object], Callable[[object], None]]


def interleave_cleaned(peers: dict[str, Peer], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each peer's run, once per round, in rotating order; its cleanup runs untimed after it."""
    names = list(peers)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            run, cleanup = peers[n]
            t0 = time.perf_counter()
            res = run()
            out[n].append(time.perf_counter() - t0)
            cleanup(res)
    return out


class Fresh:
    """Fresh destination folders under one scratch folder (same filesystem as the store)."""

    def __init__(self, root: Path):
        self.root, self.n = root, 0
        root.mkdir(parents=True, exist_ok=True)

    def __call__(self) -> Path:
        self.n += 1
        return self.root / f"d{self.n:04d}"


def _rm(path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def summarize(times: dict[str, list[float]], peer: str, ours: list[str]) -> dict:
    """Median seconds of every peer, spread, and each of `ours` as a paired ratio to `peer`."""
    out = {"seconds": {k: round(median(v), 4) for k, v in times.items()},
           "spread": {k: round(spread(v), 3) for k, v in times.items()},
           "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()}}
    out["ratio"] = {k: round(paired_ratio(times[k], times[peer]), 2) for k in ours}
    # copy + one sha256 pass over the same bytes: the least a design that copies and hashes every byte can cost
    out["floor_ratio_copy_plus_sha256"] = round(paired_ratio([c + h for c, h in zip(times[peer], times["sha256"])],
                                                             times[peer]), 2)
    return out


# ================================================================================================================
# 1. register vs copytree; 2. pull vs copytree
# ================================================================================================================
def bench_register(ck: dict, rounds: int, fresh: Fresh, ph: Phases) -> dict:
    from registry.register import register_checkpoint

    src = Path(ck["path"])
    name = f"bench-reg-{ck['label']}"
    snaps: list[dict] = []

    def reg():
        ph.reset()
        r = register_checkpoint(src, name)
        snaps.append(ph.snapshot())
        return r

    def drop_version(r) -> None:  # free the stored copy (not timed) so the disk and page cache stay small
        _rm(stored_model_dir(r.name, r.version))

    def copy():
        d = fresh()
        shutil.copytree(src, d)
        return d

    reg_version = register_checkpoint(src, name)  # warm-up: first use of this name, code paths, caches
    drop_version(reg_version)
    times = interleave_cleaned({"copy": (copy, _rm), "register": (reg, drop_version),
                                "sha256": (lambda: sha256_folder(src), lambda _: None)}, rounds)
    out = summarize(times, "copy", ["register", "sha256"])
    out["meets_target"] = out["ratio"]["register"] <= TARGET_REGISTER_RATIO
    out["breakdown"] = breakdown(REGISTER_TREE, snaps, times["register"], "register_checkpoint")
    out["breakdown"]["sha256_file_calls"] = snaps[-1]["calls"].get(HASH_CALLS, 0)
    out["breakdown"]["mb_hashed"] = round(snaps[-1]["bytes_hashed"] / 1e6, 1)
    out["breakdown"]["checkpoint_mb"] = ck["folder_mb"]
    return out


def bench_pull(ck: dict, rounds: int, fresh: Fresh, ph: Phases) -> dict:
    from registry.pull import checkpoint_dir, download
    from registry.register import register_checkpoint

    name = f"bench-pull-{ck['label']}"
    reg = register_checkpoint(Path(ck["path"]), name)
    uri = reg.uri
    stored = stored_model_dir(name, reg.version)

    def copy():
        d = fresh()
        shutil.copytree(stored, d)
        return d

    snaps: list[dict] = []

    def pull():
        ph.reset()
        d = download(uri, fresh())
        snaps.append(ph.snapshot())
        return d

    _rm(download(uri, fresh()))  # warm-up
    t0 = time.perf_counter()
    checkpoint_dir(uri)  # fills the cache under CPMANT_HOME/cache/models
    cold_cache_s = time.perf_counter() - t0
    times = interleave_cleaned({
        "copy": (copy, _rm), "pull": (pull, _rm),
        "checkpoint_dir_warm": (lambda: checkpoint_dir(uri), lambda _: None),
        "checkpoint_dir_warm_noverify": (lambda: checkpoint_dir(uri, verify=False), lambda _: None),
        "sha256": (lambda: sha256_folder(stored / "artifacts"), lambda _: None),
    }, rounds)
    out = summarize(times, "copy", ["pull", "checkpoint_dir_warm", "checkpoint_dir_warm_noverify", "sha256"])
    out["meets_target"] = out["ratio"]["pull"] <= TARGET_PULL_RATIO
    out["breakdown"] = breakdown(PULL_TREE, snaps, times["pull"], "download")
    out["checkpoint_dir_cold_s"] = round(cold_cache_s, 4)
    out["uri"] = uri
    out["stored_mb"] = round(folder_bytes(stored) / 1e6, 2)
    return out


# ================================================================================================================
# where the time goes: wrappers around the functions that do the work (inclusive seconds per call)
# ================================================================================================================
class Phases:
    """Patch (owner, attribute) pairs with timing wrappers; accumulate inclusive seconds per label."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.bytes_hashed = 0
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, label: str, count_bytes: bool = False) -> None:
        orig = getattr(owner, attr)
        phases = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                phases.seconds[label] = phases.seconds.get(label, 0.0) + time.perf_counter() - t0
                phases.calls[label] = phases.calls.get(label, 0) + 1
                if count_bytes and args:
                    with contextlib.suppress(OSError):
                        phases.bytes_hashed += os.path.getsize(args[0])

        self._undo.append((owner, attr, orig))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes_hashed = {}, {}, 0

    def snapshot(self) -> dict:
        return {"seconds": dict(self.seconds), "calls": dict(self.calls), "bytes_hashed": self.bytes_hashed}


HASH_CALLS = "sha256_file calls in register"


# (label, parent label or None for the top level); "other" lines are computed as parent minus its children
REGISTER_TREE = [
    ("setup_tracking (store, experiment)", None),
    ("sha256 tags (version_tags)", None),
    ("mlflow.start_run + end_run", None),
    ("mlflow.pyfunc.log_model", None),
    ("copy checkpoint into MLflow's temp model folder", "mlflow.pyfunc.log_model"),
    ("serving-input validation", "mlflow.pyfunc.log_model"),
    ("mlflow.pyfunc.load_model", "serving-input validation"),
    ("load_pretrained", "mlflow.pyfunc.load_model"),
    ("CPMAnt random init (reset_parameters, then overwritten)", "load_pretrained"),
    ("safetensors load_file", "load_pretrained"),
    ("generate 4 tokens", "serving-input validation"),
    ("copy temp model folder into the artifact store", "mlflow.pyfunc.log_model"),
    ("register_model (DB, retried on races)", None),
    ("lineage tag (lineage_text: DB reads)", None),
    ("version tag/description/alias (DB writes)", None),
]


def register_phases(ph: Phases) -> None:
    import mlflow
    import mlflow.models.utils
    import mlflow.pyfunc
    import mlflow.pyfunc.model
    from mlflow.tracking import MlflowClient

    import cpmant.checkpoint
    import cpmant.generate
    import registry.register
    from cpmant.model import CPMAnt

    lineage_module = importlib.import_module("registry.lineage")  # `registry.lineage` is also a function's name

    ph.wrap(registry.register, "setup_tracking", "setup_tracking (store, experiment)")
    ph.wrap(registry.register, "version_tags", "sha256 tags (version_tags)")
    ph.wrap(registry.register, "sha256_file", HASH_CALLS, count_bytes=True)
    ph.wrap(mlflow, "start_run", "mlflow.start_run + end_run")
    ph.wrap(mlflow, "end_run", "mlflow.start_run + end_run")
    ph.wrap(mlflow.pyfunc, "log_model", "mlflow.pyfunc.log_model")
    ph.wrap(mlflow.pyfunc.model, "_download_artifact_from_uri", "copy checkpoint into MLflow's temp model folder")
    ph.wrap(mlflow.models.utils, "_validate_serving_input", "serving-input validation")
    ph.wrap(mlflow.pyfunc, "load_model", "mlflow.pyfunc.load_model")
    ph.wrap(cpmant.checkpoint, "load_pretrained", "load_pretrained")
    ph.wrap(CPMAnt, "reset_parameters", "CPMAnt random init (reset_parameters, then overwritten)")
    ph.wrap(cpmant.checkpoint, "load_file", "safetensors load_file")
    ph.wrap(cpmant.generate, "generate", "generate 4 tokens")
    ph.wrap(MlflowClient, "log_model_artifacts", "copy temp model folder into the artifact store")
    ph.wrap(registry.register, "_register_with_retry", "register_model (DB, retried on races)")
    ph.wrap(lineage_module, "lineage_text", "lineage tag (lineage_text: DB reads)")
    for m in ("set_model_version_tag", "update_model_version", "set_registered_model_alias"):
        ph.wrap(MlflowClient, m, "version tag/description/alias (DB writes)")


PULL_TREE = [
    ("setup_tracking (store, experiment)", None),
    ("resolve_version (DB read)", None),
    ("download into a temp folder (MLflow copy)", None),
    ("sha256 verification (verify_files)", None),
    ("expected_hashes (DB read)", None),
]


def pull_phases(ph: Phases) -> None:
    pull_module = importlib.import_module("registry.pull")  # `registry.pull` is also a function's name

    ph.wrap(pull_module, "setup_tracking", "setup_tracking (store, experiment)")
    ph.wrap(pull_module, "resolve_version", "resolve_version (DB read)")
    ph.wrap(pull_module, "_download_model", "download into a temp folder (MLflow copy)")
    ph.wrap(pull_module, "verify_files", "sha256 verification (verify_files)")
    ph.wrap(pull_module, "expected_hashes", "expected_hashes (DB read)")


def tree_rows(tree, seconds: dict[str, float], total: float, top: str) -> list[dict]:
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
    """Typical phases over the measured rounds: every leaf phase and every 'other' line is the median of its
    per-round seconds, and every parent is the sum of its rows, so the rows add up; their sum (`sum_of_medians_s`)
    is close to, but not exactly, the median total. A median is robust to a load burst hitting one phase in one
    round (a single round's picture is not). Every round's seconds are kept in `all_rounds`."""
    per_round = [tree_rows(tree, snap["seconds"], total, top) for snap, total in zip(snaps, totals)]
    parents = {parent for _, parent in tree if parent is not None}
    rows = [dict(row) for row in per_round[0]]
    for i, row in enumerate(rows):
        row["seconds"] = median(r[i]["seconds"] for r in per_round)
    # parents (and the top) as sums of their direct rows, deepest first
    for i in sorted(range(len(rows)), key=lambda i: -rows[i]["depth"]):
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
@contextlib.contextmanager
def quiet(log_path: Path):
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the two smaller sizes and fewer rounds (1-2 minutes)")
    ap.add_argument("--home", help="CPMANT_HOME to use (kept; default: a temporary folder, removed at the end)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "registry.json"), help="where the JSON goes")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), help="override the mode's sizes")
    ap.add_argument("--torch-threads", type=int, help="torch.set_num_threads for the run (default: torch's own, "
                    "one per core); the smoke generation inside register_checkpoint is sensitive to it under load")
    args = ap.parse_args(argv)

    home, made = isolate_environment(args.home)
    mode_name = "quick" if args.quick else "full"
    mode = dict(MODES[mode_name])
    if args.sizes:
        mode["sizes"] = args.sizes
    t_start = time.perf_counter()
    try:
        with quiet(home / "mlflow-output.log"):
            report = run_all(mode_name, mode, home, args.torch_threads)
        report["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
        path = write_json(Path(args.out), report)
        print()
        print_report(report)
        print(f"\nload average {report['meta']['load_average_start']} -> {report['meta']['load_average_end']} "
              f"on {os.cpu_count()} cores; {report['meta']['seconds']} s; wrote {path}")
    finally:
        cleanup_home(home, made)
    return 0


def run_all(mode_name: str, mode: dict, home: Path, torch_threads: int | None = None) -> dict:
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)

    report: dict = {"meta": {"mode": mode_name, **mode, **environment_info(), "cpmant_home": str(home),
                             "load_average_start": load_average(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                             "targets": {"register_vs_copy": TARGET_REGISTER_RATIO, "pull_vs_copy": TARGET_PULL_RATIO}}}
    vocab = write_vocab(home / "vocab.txt")
    fresh = Fresh(home / "scratch")
    cks = []
    for label in mode["sizes"]:
        t0 = time.perf_counter()
        cks.append(build_checkpoint(home / "checkpoints" / label, label, vocab))
        print(f"built {label}: {cks[-1]['params'] / 1e6:.1f} M params, {cks[-1]['safetensors_mb']} MB safetensors "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)

    from registry.register import register_checkpoint

    t0 = time.perf_counter()
    first = register_checkpoint(Path(cks[0]["path"]), "bench-cold")
    report["meta"]["first_register_in_process_s"] = round(time.perf_counter() - t0, 3)
    _rm(stored_model_dir(first.name, first.version))
    print(f"first registration in this process ({cks[0]['label']}; imports, new store): "
          f"{report['meta']['first_register_in_process_s']:.2f} s; load average {load_average()}", flush=True)

    results = []
    ph = Phases()  # timing wrappers on the functions that do the work, for the breakdown of every measured call
    register_phases(ph)
    pull_phases(ph)
    try:
        for ck in cks:
            print(f"{ck['label']}: register vs copy ({mode['reg_rounds']} rounds) ...", flush=True)
            reg = bench_register(ck, mode["reg_rounds"], fresh, ph)
            print(f"{ck['label']}: pull vs copy ({mode['pull_rounds']} rounds) ...", flush=True)
            pul = bench_pull(ck, mode["pull_rounds"], fresh, ph)
            results.append({**ck, "register": reg, "pull": pul})
    finally:
        ph.restore()
    report["sizes"] = results
    report["meta"]["torch_threads"] = torch.get_num_threads()
    report["meta"]["load_average_end"] = load_average()
    return report


def print_report(r: dict) -> None:
    rows = []
    for s in r["sizes"]:
        g, p = s["register"], s["pull"]
        rows.append((
            s["label"], f"{s['safetensors_mb']:.1f}",
            f"{g['seconds']['copy']:.3f}", f"{g['seconds']['register']:.3f}", f"{g['ratio']['register']:.1f}x",
            verdict(g["meets_target"]), f"{g['floor_ratio_copy_plus_sha256']:.1f}x",
            f"{p['seconds']['copy']:.3f}", f"{p['seconds']['pull']:.3f}", f"{p['ratio']['pull']:.1f}x",
            verdict(p["meets_target"]), f"{p['floor_ratio_copy_plus_sha256']:.1f}x",
            f"{p['seconds']['checkpoint_dir_warm']:.3f} / {p['seconds']['checkpoint_dir_warm_noverify']:.3f}",
            f"{g['seconds']['sha256']:.3f}",
        ))
    print_table(rows, header=("size", "MB", "copy s", "register s", "ratio", f"<={TARGET_REGISTER_RATIO:g}x", "floor",
                              "copy s", "pull s", "ratio", f"<={TARGET_PULL_RATIO:g}x", "floor",
                              "ckpt_dir warm s (verify/no)", "sha256 s"))
    print("(floor: copy + one sha256 pass of the same files, over copy: the least any copy-and-verify design costs)")
    largest = max(r["sizes"], key=lambda x: x["folder_mb"])
    for kind, title in (("register", "register_checkpoint"), ("pull", "download")):
        x = largest[kind]["breakdown"]
        extra = (f"; {x['sha256_file_calls']} sha256_file calls hash {x['mb_hashed']} MB of a {x['checkpoint_mb']} MB "
                 "checkpoint") if kind == "register" else ""
        print(f"\n{title} of {largest['label']}: median {x['median_total_s']:.3f} s over {x['rounds']} measured "
              f"rounds; phases are per-phase medians (sum {x['sum_of_medians_s']:.3f} s){extra}")
        print_table([("  " * (row["depth"] - 1) + row["phase"], f"{row['seconds']:.3f}", f"{row['share']:.0%}")
                     for row in x["phases"]], header=("phase", "s", "share"))


if __name__ == "__main__":
    sys.exit(main())
