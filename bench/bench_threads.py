"""OpenMP thread settings for the training step, quiet and with another process busy on the same cores.

Run from the repository root:  .venv/bin/python bench/bench_threads.py [--quick] [--seconds N]
Writes bench/results/threads.json and prints a table; bench/README.md ("Threads") explains it.

Each setting (torch threads, OMP_WAIT_POLICY, GOMP_SPINCOUNT) runs in a fresh subprocess, since libgomp reads its
environment when torch is imported. The subprocess builds the tiny preset and times training steps (forward with
the default precision, backward, AdamW) on 16 x 128 random rows for a bounded time. Every setting runs twice:
quiet, and under contention (one busy-looping process per core, started with the step and stopped after it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, markdown_table, median, run_benchmark  # noqa: E402

# settings: name -> environment for the subprocess (threads through OMP_NUM_THREADS, as torch reads it at start)
SETTINGS = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads, spin (libgomp default)": {"OMP_NUM_THREADS": "2"},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "2 threads, GOMP_SPINCOUNT=1000": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "1000"},
    "2 threads, GOMP_SPINCOUNT=10000": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"},
    "2 threads, GOMP_SPINCOUNT=100000": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "100000"},
}
OMP_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "KMP_BLOCKTIME")
# steps: at most this many timed steps; seconds: and at most this long (a spinning step under contention is slow)
MODES = {"full": dict(steps=30, seconds=20, warmup=3, quick=False),
         "quick": dict(steps=10, seconds=4, warmup=1, quick=True)}
BATCH, SEQ = 16, 128  # the tiny preset's PretrainConfig: 16 rows x 128 positions


def worker(steps: int, seconds: float, warmup: int, precision: str) -> dict:
    """In the subprocess: the tiny preset's training step on random rows; tokens/s over the timed steps."""
    import torch

    from bench_train_step import all_context_batch
    from _common import our_loss
    from cpmant.config import get_preset
    from cpmant.model import CPMAnt
    from cpmant.precision import autocast, resolve_precision

    prec = resolve_precision(precision, "cpu")
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = CPMAnt(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    inputs, target, project, _, _ = all_context_batch(config, BATCH, SEQ)

    def step():
        with autocast(prec, "cpu"):
            loss = our_loss(model, inputs, target, project)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_warm = time.perf_counter() + seconds / 2  # a spinning step on a busy machine can take seconds
    for _ in range(warmup):
        step()
        if time.perf_counter() > t_warm:
            break
    times, t_end = [], time.perf_counter() + seconds
    cpu0 = time.process_time()
    while len(times) < steps and time.perf_counter() < t_end:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"precision": prec, "torch_threads": torch.get_num_threads(), "steps": len(times),
            "tokens_per_s": BATCH * SEQ / median(times), "step_seconds": times,
            "cpu_per_wall": (time.process_time() - cpu0) / max(sum(times), 1e-9)}


BUSY = "import time\nt = time.time() + {s}\nwhile time.time() < t:\n    pass\n"


def run_setting(env_extra: dict, mode: dict, contended: bool, precision: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    env.update(env_extra)
    busy = []
    limit = mode["seconds"] + 90  # the busy loops end on their own even if this process dies
    entry: dict = {"load_average": {"before": load_average()}}
    try:
        if contended:
            busy = [subprocess.Popen([sys.executable, "-c", BUSY.format(s=limit)]) for _ in range(os.cpu_count() or 1)]
        cmd = [sys.executable, __file__, "--worker", str(mode["steps"]), str(mode["seconds"]), str(mode["warmup"]),
               precision]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit + 60)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    entry["load_average"]["after"] = load_average()
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({env_extra}):\n{out.stderr[-3000:]}")
    entry.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return entry


def measure(args, mode: dict, home: Path, report: dict) -> None:
    results = []
    for name, env_extra in SETTINGS.items():
        if mode["quick"] and env_extra.get("GOMP_SPINCOUNT") == "100000":  # the longer spin: full runs only
            continue
        row = {"setting": name, "env": env_extra}
        for contended in (False, True):
            r = run_setting(env_extra, mode, contended, args.precision)
            row["contended" if contended else "quiet"] = r
            print(f"   {name}, {'contended' if contended else 'quiet'}: {r['tokens_per_s']:,.0f} tok/s "
                  f"({r['steps']} steps, {r['precision']}, load {r['load_average']['before'][:1]})", flush=True)
        results.append(row)
    report["meta"]["batch"] = [BATCH, SEQ]
    report["threads"] = results


def table(r: dict) -> str:
    rows = []
    for s in r["threads"]:
        q, c = s["quiet"], s["contended"]
        rows.append((s["setting"], f"{q['tokens_per_s']:,.0f}", f"{q['load_average']['before'][0]}",
                     f"{c['tokens_per_s']:,.0f}", f"{c['load_average']['before'][0]}",
                     f"{c['tokens_per_s'] / q['tokens_per_s']:.2f}"))
    return markdown_table(("setting", "tokens/s quiet", "load", "tokens/s contended", "load", "contended/quiet"),
                          rows)


def arguments(ap) -> None:
    ap.add_argument("--precision", default="auto", help="the step's precision: auto (default), fp32 or bf16")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        steps, seconds, warmup, precision = sys.argv[2:6]
        print(json.dumps(worker(int(steps), float(seconds), int(warmup), precision)))
        sys.exit(0)
    sys.exit(run_benchmark("threads", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="at most 10 steps or 4 s per setting, no GOMP_SPINCOUNT=100000 (a smoke run)"))
