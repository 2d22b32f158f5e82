"""The training loop's tokens/s with glibc's default malloc thresholds and with the ones the loop now sets
(cpmant.training.allocator: mmap threshold 32 MiB, trim threshold ~2 GiB), alternated in one process.

    .venv/bin/python bench/bench_allocator.py [--rounds 3] [--steps 12] [--corpus DIR]

One process builds the tiny preset's pretraining run once (cpmant.training.loop.Pretraining), then times its
optimizer steps in phases: first with glibc untouched (the "default" phase, before any mallopt), then alternating
"small" (mallopt to glibc's initial thresholds, 128 KiB each, which also stops glibc raising them by itself) and
"keep" (the loop's settings). Each phase starts with 2 warm-up steps; tokens/s is the phase's positions over its
timed steps. The load average is printed beside the figures: read them only next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--corpus", default=None, help="corpus folder (default: fortunes-zh, fetched once)")
    ap.add_argument("--home", default=None, help="CPMANT_HOME (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 6 steps")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 6
    home = args.home or tempfile.mkdtemp(prefix="bench-allocator-")
    os.environ["CPMANT_HOME"] = home

    import torch

    from cpmant.training import allocator
    from cpmant.training.config import PretrainConfig
    from cpmant.training.distributed import DistInfo
    from cpmant.training.loop import Pretraining

    allocator._applied = False  # the run's setup must not set the thresholds: the first phase is glibc's default
    cfg = PretrainConfig(preset="tiny", corpus=args.corpus, seq_len=128, micro_batch_size=16, max_steps=10**6,
                         output_dir=str(Path(home) / "run"), resume="never")
    t0 = time.perf_counter()
    run = Pretraining(cfg, DistInfo(), progress=False)
    print(f"setup {time.perf_counter() - t0:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    load_start = os.getloadavg()
    step = 0

    def phase(name: str) -> float:
        nonlocal step
        for _ in range(2):  # warm-up: the first steps after a change fill (or empty) the heap
            run.step(step)
            step += 1
        tokens, seconds = 0, 0.0
        for _ in range(args.steps):
            m = run.step(step)
            step += 1
            tokens += m["tokens_per_second"] * m["time"]
            seconds += m["time"]
        print(f"{name:8s} {tokens / seconds:9,.0f} tokens/s  ({seconds / args.steps:.3f} s/step, load "
              f"{os.getloadavg()[0]:.2f})", flush=True)
        return tokens / seconds

    results: dict[str, list[float]] = {"default": [phase("default")], "small": [], "keep": []}
    for r in range(args.rounds):
        order = ("small", "keep") if r % 2 == 0 else ("keep", "small")
        for name in order:
            if name == "small":
                allocator.set_mallopt(128 * 1024, 128 * 1024)
            else:
                allocator.set_mallopt(allocator.MMAP_THRESHOLD, allocator.TRIM_THRESHOLD)
            results[name].append(phase(name))
    load_end = os.getloadavg()
    med = {k: statistics.median(v) for k, v in results.items()}
    report = {"tokens_per_second": results, "median": med, "keep_over_small": med["keep"] / med["small"],
              "keep_over_default": med["keep"] / med["default"], "threads": torch.get_num_threads(),
              "loadavg_start": load_start, "loadavg_end": load_end, "steps_per_phase": args.steps,
              "preset": "tiny", "seq_len": 128, "micro_batch_size": 16}
    print(json.dumps(report, indent=2))
    print(f"tokens/s (median): default {med['default']:,.0f}  small {med['small']:,.0f}  keep {med['keep']:,.0f}  "
          f"keep/small {report['keep_over_small']:.3f}  keep/default {report['keep_over_default']:.3f}  "
          f"load {load_start[0]:.2f} -> {load_end[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
