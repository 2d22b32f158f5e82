"""Pulling a registered model: download (the `cpmant pull` path) vs a plain copy of the stored folder, and
checkpoint_dir on a warm cache.

Run from the repository root:  .venv/bin/python bench/bench_pull.py [--quick] [--sizes 5MB 50MB 300MB]
Writes bench/results/pull.json and prints a table; bench/README.md ("Registry") explains it.

For each checkpoint size (real CPMAnt models, ~5 / ~50 / ~300 MB of safetensors; --quick uses the two smaller),
registered once: `download("models:/NAME/1", fresh)` vs `shutil.copytree(<stored artifact folder>, fresh)`
(target: within 1.5x), `checkpoint_dir(uri)` on a warm cache with and without its sha256 verification, and one
sha256 pass as a floor. Peers alternate round by round; ratios are medians of per-round ratios. Every measured
download is broken into phases by timing wrappers (no registry code changes). A fresh SQLite store under a
temporary CPMANT_HOME, never a real one.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import (  # noqa: E402  (the environment must be isolated before cpmant/registry modules are used)
    MODES, Fresh, arguments, breakdown_table, build_checkpoints, folder_bytes, measure_each, rm, sha256_folder,
    stored_model_dir, summarize,
)
from _common import (  # noqa: E402
    Phases, breakdown, interleave, markdown_table, quiet_mlflow, recording_load, run_benchmark,
    verdict,
)

TARGET_PULL_RATIO = 1.5  # download within 1.5x a copytree of the stored artifact folder
PULL_TREE = [
    ("setup_tracking (store, experiment)", None),
    ("resolve_version (DB read)", None),
    ("download into a temp folder (MLflow copy)", None),
    ("sha256 verification (verify_files)", None),
    ("expected_hashes (DB read)", None),
]


def pull_module():
    """registry's pull code (registry/pulling.py)."""
    return importlib.import_module("registry.pulling")


def pull_phases(ph: Phases) -> None:
    pull = pull_module()
    ph.wrap(pull, "setup_tracking", "setup_tracking (store, experiment)")
    ph.wrap(pull, "resolve_version", "resolve_version (DB read)")
    ph.wrap(pull, "_download_model", "download into a temp folder (MLflow copy)")
    ph.wrap(pull, "verify_files", "sha256 verification (verify_files)")
    ph.wrap(pull, "expected_hashes", "expected_hashes (DB read)")


def bench_pull(ck: dict, rounds: int, fresh: Fresh, ph: Phases) -> dict:
    from registry.register import register_checkpoint

    checkpoint_dir, download = pull_module().checkpoint_dir, pull_module().download

    name = f"bench-pull-{ck['label']}"
    reg = register_checkpoint(Path(ck["path"]), name)
    uri = reg.uri
    stored = stored_model_dir(name, reg.version)
    snaps: list[dict] = []

    def copy():
        d = fresh()
        shutil.copytree(stored, d)
        return d

    def pull():
        ph.reset()
        d = download(uri, fresh())
        snaps.append(ph.snapshot())
        return d

    rm(download(uri, fresh()))  # warm-up
    t0 = time.perf_counter()
    checkpoint_dir(uri)  # fills the cache under CPMANT_HOME/cache/models
    cold_cache_s = time.perf_counter() - t0
    out: dict = {}
    with recording_load(out):
        times = interleave({
            "copy": (copy, rm), "pull": (pull, rm),
            "checkpoint_dir_warm": lambda: checkpoint_dir(uri),
            "checkpoint_dir_warm_noverify": lambda: checkpoint_dir(uri, verify=False),
            "sha256": lambda: sha256_folder(stored / "artifacts"),
        }, rounds)
    out.update(summarize(times, "copy", ["pull", "checkpoint_dir_warm", "checkpoint_dir_warm_noverify", "sha256"]))
    out["meets_target"] = out["ratio"]["pull"] <= TARGET_PULL_RATIO
    out["breakdown"] = breakdown(PULL_TREE, snaps, times["pull"], "download")
    out["checkpoint_dir_cold_s"] = round(cold_cache_s, 4)
    out["uri"] = uri
    out["stored_mb"] = round(folder_bytes(stored) / 1e6, 2)
    return out


def measure(args, mode: dict, home: Path, report: dict) -> None:
    report["meta"]["target_pull_vs_copy"] = TARGET_PULL_RATIO
    with quiet_mlflow(home / "mlflow-output.log"):
        cks = build_checkpoints(args, mode, home, report)
        report["sizes"] = measure_each(cks, home, mode["rounds"], report, "pull", pull_phases, bench_pull)


def table(r: dict) -> str:
    rows = []
    for s in r["sizes"]:
        p = s["pull"]
        rows.append((s["label"], f"{s['safetensors_mb']:.1f}", f"{p['seconds']['copy']:.3f}",
                     f"{p['seconds']['pull']:.3f}", f"{p['ratio']['pull']:.1f}x", verdict(p["meets_target"]),
                     f"{p['floor_ratio_copy_plus_sha256']:.1f}x",
                     f"{p['seconds']['checkpoint_dir_warm']:.3f} / {p['seconds']['checkpoint_dir_warm_noverify']:.3f}",
                     f"{p['seconds']['sha256']:.3f}",
                     " -> ".join(str(x[0]) for x in p["load_average"].values() if x)))
    out = markdown_table(("size", "MB", "copy s", "pull s", "ratio", f"<= {TARGET_PULL_RATIO:g}x", "floor",
                          "checkpoint_dir warm s (verify / not)", "sha256 s", "load"), rows)
    out += "\n(floor: copy + one sha256 pass of the same files, over copy: the least any copy-and-verify design costs)"
    largest = max(r["sizes"], key=lambda x: x["folder_mb"])
    return out + "\n\n" + breakdown_table(f"download of {largest['label']}", largest["pull"]["breakdown"])


if __name__ == "__main__":
    sys.exit(run_benchmark("pull", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="the two smaller sizes, 7 rounds (under a minute)"))
