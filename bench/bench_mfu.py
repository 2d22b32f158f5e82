"""MFU of the pretraining loop: model FLOPs per second of the tracked tiny loop over the machine's matmul peak.

Run from the repository root:  .venv/bin/python bench/bench_mfu.py [--quick]
Writes bench/results/mfu.json and prints a table; bench/README.md ("MFU") explains it.

MFU = flops_per_token x tokens/s / peak, the peak of the dtype the loop multiplies in (bf16 where `precision: auto`
resolves to it: a CPU with avx512_bf16 or amx_bf16; fp32 elsewhere). tokens/s is the tracked loop's (pretrain()
with MlflowCallbacks, as tasks/pretrain.py runs it; tiny preset, default corpus) over its steady steps, each timed
from the loop's on_step callback in its own spawned process (bench/_loops.py); the peak is the best of several
measure_matmul_peak() samples taken through the run (a sample taken in a busy moment is low and would inflate the MFU).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the environment must be isolated before cpmant modules are used)
    Peak, markdown_table, median, prepare_default_corpus, pretrain_stream, recording_load, run_benchmark,
    vocab_size_of,
)
from _loops import STEADY_SKIP, loop_configs, take_turns  # noqa: E402

MODES = {"full": dict(rounds=2, steps=80), "quick": dict(rounds=1, steps=55)}
NAME = "ours+mlflow"


def target_share(prepared, cfg, mcfg) -> float:
    """Share of the B x seq_len positions of the loop's rows that have a target (only those are projected)."""
    stream = pretrain_stream(prepared.train_docs, mcfg, cfg.seq_len, cfg)
    B, targets = cfg.micro_batch_size, 0
    for step in range(cfg.max_steps):
        targets += stream.batch(range(step * B, (step + 1) * B)).num_targets
    return targets / (cfg.max_steps * B * cfg.seq_len)


def measure(args, mode: dict, home: Path, report: dict) -> None:
    import os

    import torch

    from cpmant.flops import flops_per_token
    from cpmant.precision import resolve_precision
    from cpmant.training.loop import build_model_config
    from registry.tracking import setup_tracking
    from tasks.config import TrackingConfig

    torch.set_num_threads(os.cpu_count() or 1)
    prepared = prepare_default_corpus()
    setup_tracking("cpmant-bench")
    flush_steps = TrackingConfig().metric_flush_steps
    # the peak of the dtype the loop multiplies in: `precision: auto` trains in bf16 where the CPU has it natively
    dtype = resolve_precision(loop_configs([NAME], 1, home)[NAME].precision)
    peak = Peak(dtype)
    print(f"   matmul peak {peak.sample() / 1e9:,.1f} GFLOP/s {dtype}", flush=True)
    steps, seconds, runs, rounds_load = mode["steps"], [], [], []
    for r in range(mode["rounds"]):
        print(f"   round {r + 1}/{mode['rounds']}: {steps} steps of the tracked loop", flush=True)
        out = home / "bench-runs" / f"round-{r}"
        cfg = loop_configs([NAME], steps, out)[NAME]
        with recording_load(entry := {}):
            t = take_turns({NAME: ("tracked", cfg)}, prepared, flush_steps)[NAME]
        rounds_load.append(entry["load_average"])
        shutil.rmtree(out, ignore_errors=True)
        seconds += t["seconds"][STEADY_SKIP + 1:]  # the first turn also holds the set-up
        runs.append(t["result"])
        peak.samples.append(t["result"].peak_flops)  # the loop's own sample at its start
        peak.sample()

    mcfg = build_model_config(cfg, vocab_size_of(prepared))
    share = target_share(prepared, cfg, mcfg)
    tokens_per_step = median(x.tokens_seen / steps for x in runs)
    tokens_per_s = tokens_per_step / (sum(seconds) / len(seconds))  # from the mean: every steady second counts
    fpt = flops_per_token(mcfg, cfg.seq_len, vocab_share=share)
    fpt_all = flops_per_token(mcfg, cfg.seq_len)
    loop_tps = median(x.tokens_per_second for x in runs)
    report["meta"].update(peak_flops=peak.best, peak_flops_samples=peak.samples, precision=dtype)
    report["mfu"] = {
        "config": {"preset": "tiny", "micro_batch_size": cfg.micro_batch_size, "seq_len": cfg.seq_len,
                   "steps": steps, "rounds": mode["rounds"], "steady_steps": len(seconds)},
        "load_average_per_round": rounds_load,
        "positions_with_target_share": share,
        # the vocabulary projection counted only for the positions with a target (what the loop projects)
        "flops_per_token": fpt,
        # ... and at every position (flops_per_token's default)
        "flops_per_token_all_positions": fpt_all,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_s,
        "loop_reported_tokens_per_s": loop_tps,
        "peak_flops": peak.best,
        "mfu": fpt * tokens_per_s / peak.best,
        "loop_reported_mfu": fpt * loop_tps / peak.best,
        "mfu_vocab_at_all_positions": fpt_all * tokens_per_s / peak.best,
        # TrainResult.mfu as the loop computes it, against its own 0.3 s peak sample taken at run start (and from
        # its own tokens/s, whose clock stops before the callbacks)
        "loop_result_mfu": median(x.mfu for x in runs),
    }


def table(r: dict) -> str:
    m = r["mfu"]
    rows = [
        ("MFU of our loop (tracked, tiny)", f"{m['mfu']:.1%}"),
        (f"  tokens/s / {r['meta'].get('precision', 'fp32')} peak GFLOP/s",
         f"{m['tokens_per_s']:,.0f} / {m['peak_flops'] / 1e9:,.1f}"),
        ("  CPU flags", " ".join(r["meta"].get("cpu_flags", []))),
        ("  as TrainResult.mfu reports it", f"{m['loop_result_mfu']:.1%}"),
        ("  counting the vocab projection at every position", f"{m['mfu_vocab_at_all_positions']:.1%}"),
        ("positions with a target in loop rows", f"{m['positions_with_target_share']:.1%}"),
    ]
    return markdown_table(("measurement", "value"), rows)


if __name__ == "__main__":
    sys.exit(run_benchmark("mfu", __doc__, MODES, measure, table,
                           quick_help="one round of 55 steps (a smoke run)"))
