"""Tracking overhead: the pretraining loop with MLflow tracking vs the same loop without it vs a bare PyTorch loop.

Run from the repository root:  .venv/bin/python bench/bench_tracking_overhead.py [--quick]
Writes bench/results/tracking_overhead.json and prints a table; bench/README.md ("Tracking overhead") explains it.

Three loops (bare, ours = pretrain() without callbacks, ours+mlflow = pretrain() with MlflowCallbacks as
tasks/pretrain.py runs it) on the tiny preset and the default corpus, each in its own process, take turns step by
step (bench/_loops.py); overheads are medians of per-step paired ratios. MLflow's cost is also timed directly.
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the environment must be isolated before cpmant modules are used)
    markdown_table, median, pct, prepare_default_corpus, recording_load, run_benchmark, verdict,
)
from _loops import STEADY_SKIP, loop_configs, take_turns  # noqa: E402

TARGET_TRACKING_OVERHEAD = 0.01  # tracking costs under 1% of step time
MODES = {"full": dict(rounds=2, steps=80), "quick": dict(rounds=1, steps=55)}
NAMES = ["bare", "ours", "ours+mlflow"]
KINDS = {"bare": "bare", "ours": "ours", "ours+mlflow": "tracked"}
PAIRS = {"tracked/bare": ("ours+mlflow", "bare"), "ours/bare": ("ours", "bare"),
         "tracked/ours": ("ours+mlflow", "ours")}


def measure(args, mode: dict, home: Path, report: dict) -> None:
    from registry.tracking import setup_tracking
    from tasks.config import TrackingConfig

    prepared = prepare_default_corpus()
    setup_tracking("cpmant-bench")  # creates the SQLite store and its schema now, before any loop starts
    flush_steps = TrackingConfig().metric_flush_steps
    steps = mode["steps"]
    pairs: dict[str, list[float]] = {k: [] for k in PAIRS}
    own: dict[str, list[float]] = {n: [] for n in NAMES}  # steady per-step seconds, all rounds
    tracked_runs, bare_runs, attributed, rounds_load = [], [], [], []
    for r in range(mode["rounds"]):
        print(f"   round {r + 1}/{mode['rounds']}: {steps} steps of each loop, taking turns", flush=True)
        out = home / "bench-runs" / f"round-{r}"
        cfgs = loop_configs(NAMES, steps, out)
        order = NAMES[r % 3:] + NAMES[:r % 3]  # who goes first rotates with the rounds
        with recording_load(entry := {}):
            res = take_turns({n: (KINDS[n], cfgs[n]) for n in order}, prepared, flush_steps)
        rounds_load.append(entry["load_average"])
        shutil.rmtree(out, ignore_errors=True)
        sec = {n: res[n]["seconds"][STEADY_SKIP + 1:] for n in NAMES}  # the first turn also holds the set-up
        for n in NAMES:
            own[n] += sec[n]
        for key, (a, b) in PAIRS.items():
            pairs[key] += [x / y for x, y in zip(sec[a], sec[b])]
        # MLflow's cost timed directly: its callbacks on the loop's thread, plus the CPU its background thread
        # spent on flushes that began during the steady steps (that thread competes with torch for the cores)
        t = res["ours+mlflow"]
        w0, w1 = t["ends"][STEADY_SKIP], t["ends"][-1]
        flush_cpu = sum(f["cpu"] for f in t["flushes"] if w0 <= f["start"] < w1)
        attributed.append((sum(t["callback_seconds"][STEADY_SKIP + 1:]) + flush_cpu) / sum(sec["ours+mlflow"]))
        tracked_runs.append(t)
        bare_runs.append(res["bare"])

    cfg = cfgs["bare"]
    over = {k: median(v) - 1 for k, v in pairs.items()}
    mean_step = {n: sum(v) / len(v) for n, v in own.items()}
    report["tracking"] = {
        "config": {"preset": "tiny", "micro_batch_size": cfg.micro_batch_size, "seq_len": cfg.seq_len,
                   "steps": steps, "steady_steps_per_round": len(own["bare"]) // mode["rounds"],
                   "flush_steps": flush_steps, "rounds": mode["rounds"]},
        "load_average_per_round": rounds_load,
        "step_seconds_median": {n: median(v) for n, v in own.items()},
        "step_seconds_mean": mean_step,
        # medians of per-step paired ratios, minus 1
        "overhead_tracked_vs_bare": over["tracked/bare"],
        "overhead_loop_vs_bare": over["ours/bare"],
        "overhead_mlflow_only": over["tracked/ours"],
        # the same from mean step times: rare costs count, but so does every burst of other load
        "mean_based": {"overhead_tracked_vs_bare": mean_step["ours+mlflow"] / mean_step["bare"] - 1,
                       "overhead_loop_vs_bare": mean_step["ours"] / mean_step["bare"] - 1,
                       "overhead_mlflow_only": mean_step["ours+mlflow"] / mean_step["ours"] - 1},
        "paired_ratio_quartiles": {k: statistics.quantiles(v, n=4) if len(v) > 1 else v for k, v in pairs.items()},
        "mlflow_attributed_share": median(attributed),
        "mlflow_callback_us_per_step": 1e6 * median(
            x for t in tracked_runs for x in t["callback_seconds"][STEADY_SKIP + 1:]),
        "mlflow_fixed_seconds_per_run": median(t["fixed_s"] for t in tracked_runs),
        "mlflow_flushes": [{k: v for k, v in f.items() if k != "start"} for f in tracked_runs[-1]["flushes"]],
        "target": TARGET_TRACKING_OVERHEAD,
        "meets_target": over["tracked/bare"] < TARGET_TRACKING_OVERHEAD,
        "loop_reported_seconds_per_step": median(t["result"].train_seconds / steps for t in tracked_runs),
        # share of the B x seq_len positions whose logits the loss uses (the rest are computed and discarded)
        "positions_with_target_share": median(b["target_share"] for b in bare_runs),
    }


def table(r: dict) -> str:
    t = r["tracking"]
    ok = t["target"]
    rows = [
        ("loop step s (median): bare / ours / ours+mlflow",
         " / ".join(f"{t['step_seconds_median'][k]:.3f}" for k in NAMES), "", ""),
        ("tracking overhead: ours+mlflow vs bare loop", pct(t["overhead_tracked_vs_bare"]), f"< {ok:.0%}",
         verdict(t["overhead_tracked_vs_bare"] < ok)),
        ("  loop alone: ours vs bare", pct(t["overhead_loop_vs_bare"]), "", ""),
        ("  MLflow alone: ours+mlflow vs ours", pct(t["overhead_mlflow_only"]), f"< {ok:.0%}",
         verdict(t["overhead_mlflow_only"] < ok)),
        ("  MLflow code timed directly (share of step)", f"{t['mlflow_attributed_share']:.3%}", f"< {ok:.0%}",
         verdict(t["mlflow_attributed_share"] < ok)),
        ("  MLflow fixed cost per run (s)", f"{t['mlflow_fixed_seconds_per_run']:.2f}", "", ""),
        ("positions with a target in loop rows", f"{t['positions_with_target_share']:.1%}", "", ""),
    ]
    return markdown_table(("measurement", "value", "target", "met"), rows)


if __name__ == "__main__":
    sys.exit(run_benchmark("tracking_overhead", __doc__, MODES, measure, table,
                           quick_help="one round of 55 steps per loop (a smoke run)"))
