"""Registering a checkpoint: register_checkpoint vs a plain copy of the same folder, and where its time goes.

Run from the repository root:  .venv/bin/python bench/bench_register.py [--quick] [--sizes 5MB 50MB 300MB]
Writes bench/results/register.json and prints a table; bench/README.md ("Registry") explains it.

For each checkpoint size (real CPMAnt models, ~5 / ~50 / ~300 MB of safetensors; --quick uses the two smaller):
`register_checkpoint(dir, name)` vs `shutil.copytree(dir, fresh)` on the same filesystem (target: within 2x), and
one sha256 pass over the same files as a floor. Peers alternate round by round; ratios are medians of per-round
ratios. Every measured registration is broken into phases by timing wrappers put around the functions that do
the work at run time (no registry code changes). A fresh SQLite store under a temporary CPMANT_HOME, never a
real one.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import (  # noqa: E402  (the environment must be isolated before cpmant/registry modules are used)
    MODES, Fresh, arguments, breakdown_table, build_checkpoints, measure_each, rm, sha256_folder, stored_model_dir,
    summarize,
)
from _common import (  # noqa: E402
    Phases, breakdown, interleave, load_average, markdown_table, quiet_mlflow, recording_load,
    run_benchmark, verdict,
)

TARGET_REGISTER_RATIO = 2.0  # register_checkpoint within 2x a copytree of the folder
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
    from cpmant.model import CPMAnt

    register = importlib.import_module("registry.register")  # the module (the package exports a function `register`)
    lineage = importlib.import_module("registry.ancestry")
    ph.wrap(register, "setup_tracking", "setup_tracking (store, experiment)")
    ph.wrap(register, "version_tags", "sha256 tags (version_tags)")
    ph.wrap(register, "sha256_file", HASH_CALLS, count_bytes=True)
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
    ph.wrap(register, "_register_with_retry", "register_model (DB, retried on races)")
    ph.wrap(lineage, "lineage_text", "lineage tag (lineage_text: DB reads)")
    for m in ("set_model_version_tag", "update_model_version", "set_registered_model_alias"):
        ph.wrap(MlflowClient, m, "version tag/description/alias (DB writes)")


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
        rm(stored_model_dir(r.name, r.version))

    def copy():
        d = fresh()
        shutil.copytree(src, d)
        return d

    drop_version(register_checkpoint(src, name))  # warm-up: first use of this name, code paths, caches
    out: dict = {}
    with recording_load(out):
        times = interleave({"copy": (copy, rm), "register": (reg, drop_version),
                            "sha256": (lambda: sha256_folder(src), None)}, rounds)
    out.update(summarize(times, "copy", ["register", "sha256"]))
    out["meets_target"] = out["ratio"]["register"] <= TARGET_REGISTER_RATIO
    out["breakdown"] = breakdown(REGISTER_TREE, snaps, times["register"], "register_checkpoint")
    out["breakdown"]["sha256_file_calls"] = snaps[-1]["calls"].get(HASH_CALLS, 0)
    out["breakdown"]["mb_hashed"] = round(snaps[-1]["bytes_seen"] / 1e6, 1)
    out["breakdown"]["checkpoint_mb"] = ck["folder_mb"]
    return out


def measure(args, mode: dict, home: Path, report: dict) -> None:
    report["meta"]["target_register_vs_copy"] = TARGET_REGISTER_RATIO
    with quiet_mlflow(home / "mlflow-output.log"):
        cks = build_checkpoints(args, mode, home, report)
        from registry.register import register_checkpoint

        t0 = time.perf_counter()
        first = register_checkpoint(Path(cks[0]["path"]), "bench-cold")
        report["meta"]["first_register_in_process_s"] = round(time.perf_counter() - t0, 3)
        rm(stored_model_dir(first.name, first.version))
        print(f"   first registration in this process ({cks[0]['label']}; imports, new store): "
              f"{report['meta']['first_register_in_process_s']:.2f} s; load average {load_average()}", flush=True)
        report["sizes"] = measure_each(cks, home, mode["rounds"], report, "register", register_phases,
                                       bench_register)


def table(r: dict) -> str:
    rows = []
    for s in r["sizes"]:
        g = s["register"]
        rows.append((s["label"], f"{s['safetensors_mb']:.1f}", f"{g['seconds']['copy']:.3f}",
                     f"{g['seconds']['register']:.3f}", f"{g['ratio']['register']:.1f}x", verdict(g["meets_target"]),
                     f"{g['floor_ratio_copy_plus_sha256']:.1f}x", f"{g['seconds']['sha256']:.3f}",
                     " -> ".join(str(x[0]) for x in g["load_average"].values() if x)))
    out = markdown_table(("size", "MB", "copy s", "register s", "ratio", f"<= {TARGET_REGISTER_RATIO:g}x", "floor",
                          "sha256 s", "load"), rows)
    out += "\n(floor: copy + one sha256 pass of the same files, over copy: the least any copy-and-verify design costs)"
    largest = max(r["sizes"], key=lambda x: x["folder_mb"])
    x = largest["register"]["breakdown"]
    extra = (f"; {x['sha256_file_calls']} sha256_file calls hash {x['mb_hashed']} MB of a {x['checkpoint_mb']} MB "
             "checkpoint")
    return out + "\n\n" + breakdown_table(f"register_checkpoint of {largest['label']}", x, extra)


if __name__ == "__main__":
    sys.exit(run_benchmark("register", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="the two smaller sizes, 7 rounds (under a minute)"))
