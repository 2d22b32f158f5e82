"""One training step with our default precision vs transformers' CpmAntForCausalLM in bf16 autocast and in fp32.

Run from the repository root:  .venv/bin/python bench/bench_precision.py [--quick] [--threads N]
Writes bench/results/precision.json and prints a table; bench/README.md ("Precision") explains it.

Our step runs with `precision: auto` resolved on this CPU (bf16 autocast where the processor multiplies bf16
natively, else fp32) through cpmant.precision.autocast; transformers' runs once under torch.autocast(bf16) (like
for like) and once in fp32 (what its users get by default). Same weights, the all-context batch of
bench_train_step.py (the same work on both sides), forward + backward + AdamW; the three steps take turns round
after round and every ratio is the median of per-round ratios.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    interleave, markdown_table, median, our_loss, paired_ratio, recording_load, run_benchmark, spread, verdict,
)
from bench_train_step import STEP_BATCH, STEP_SEQ, TimedStep, all_context_batch, step_configs  # noqa: E402

TARGET_LIKE = 1.5  # ours (default precision) >= 1.5x transformers with bf16 autocast
TARGET_FP32 = 2.5  # ours (default precision) >= 2.5x transformers in fp32
MODES = {"full": dict(rounds=18, steps=2, quick=False), "quick": dict(rounds=4, steps=1, quick=True)}


def measure_config(name, config, precision: str, mode: dict) -> dict:
    import torch
    from transformers import CpmAntForCausalLM

    from cpmant.convert import to_hf_config, to_hf_state_dict
    from cpmant.model import CPMAnt
    from cpmant.precision import autocast

    torch.manual_seed(0)
    ours = CPMAnt(config).train()
    sd = to_hf_state_dict(ours.state_dict(), config)
    hf16 = CpmAntForCausalLM(to_hf_config(config)).train()
    hf16.load_state_dict(sd, strict=True)
    hf32 = CpmAntForCausalLM(to_hf_config(config)).train()
    hf32.load_state_dict(sd, strict=True)
    inputs, target, project, ids, labels = all_context_batch(config, STEP_BATCH, STEP_SEQ)

    def ours_loss():
        with autocast(precision, "cpu"):
            return our_loss(ours, inputs, target, project)

    def hf16_loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return hf16(input_ids=ids, labels=labels, use_cache=False).loss

    steps = {"ours": TimedStep(ours, ours_loss), "hf_bf16": TimedStep(hf16, hf16_loss),
             "hf_fp32": TimedStep(hf32, lambda: hf32(input_ids=ids, labels=labels, use_cache=False).loss)}
    with torch.no_grad():  # the losses agree (bf16 rounding apart): the three compute the same function
        losses = {k: float(s.loss_fn()) for k, s in steps.items()}
    for s in steps.values():  # warm-up: AdamW state, allocator, oneDNN primitives
        for _ in range(2):
            s()
        s.reset()
    k = mode["steps"]
    r: dict = {"config": name, "precision": precision, "losses_before": losses}
    with recording_load(r):
        secs = interleave({n: (lambda s=s: [s() for _ in range(k)]) for n, s in steps.items()}, mode["rounds"])
    tokens = STEP_BATCH * STEP_SEQ * k
    like, vs32 = paired_ratio(secs["hf_bf16"], secs["ours"]), paired_ratio(secs["hf_fp32"], secs["ours"])
    r.update({
        "batch": [STEP_BATCH, STEP_SEQ],
        **{f"{n}_tokens_per_s": tokens / median(v) for n, v in secs.items()},
        "ratio_vs_hf_bf16": like, "ratio_vs_hf_fp32": vs32,
        "hf_bf16_vs_hf_fp32": paired_ratio(secs["hf_fp32"], secs["hf_bf16"]),
        "targets": {"vs_hf_bf16": TARGET_LIKE, "vs_hf_fp32": TARGET_FP32},
        "meets_targets": {"vs_hf_bf16": like >= TARGET_LIKE, "vs_hf_fp32": vs32 >= TARGET_FP32},
        "round_spread": {n: spread(v) for n, v in secs.items()},
        "seconds_per_step_parts": {n: s.part_seconds() for n, s in steps.items()},
        "rounds_seconds": secs,
    })
    print(f"   {name}: ours ({precision}) {r['ours_tokens_per_s']:,.0f} tok/s, transformers bf16 "
          f"{r['hf_bf16_tokens_per_s']:,.0f}, fp32 {r['hf_fp32_tokens_per_s']:,.0f}: {like:.2f}x / {vs32:.2f}x "
          f"(load {r['load_average']['after'][:1]})", flush=True)
    return r


def measure(args, mode: dict, home: Path, report: dict) -> None:
    import torch

    from cpmant.precision import bf16_native, resolve_precision

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    precision = resolve_precision(args.precision, "cpu")
    report["meta"].update(torch_threads=torch.get_num_threads(), precision_setting=args.precision,
                          precision=precision, bf16_native=bf16_native("cpu"))
    print(f"   precision {args.precision} -> {precision} (bf16 native: {bf16_native('cpu')})", flush=True)
    report["precision"] = [measure_config(n, c, precision, mode) for n, c in step_configs().items()]


def table(r: dict) -> str:
    rows = []
    for s in r["precision"]:
        la = s["load_average"]["before"][:1] + s["load_average"]["after"][:1]
        rows.append((s["config"], s["precision"],
                     f"{s['ours_tokens_per_s']:,.0f} / {s['hf_bf16_tokens_per_s']:,.0f} / "
                     f"{s['hf_fp32_tokens_per_s']:,.0f}",
                     f"{s['ratio_vs_hf_bf16']:.2f}x (>= {TARGET_LIKE}x: {verdict(s['meets_targets']['vs_hf_bf16'])})",
                     f"{s['ratio_vs_hf_fp32']:.2f}x (>= {TARGET_FP32}x: {verdict(s['meets_targets']['vs_hf_fp32'])})",
                     " -> ".join(map(str, la))))
    return markdown_table(("train step", "ours", "tokens/s ours / transformers bf16 / fp32", "vs transformers bf16",
                           "vs transformers fp32", "load"), rows)


def arguments(ap) -> None:
    ap.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    ap.add_argument("--precision", default="auto", help="our step's precision: auto (default), fp32 or bf16")


if __name__ == "__main__":
    sys.exit(run_benchmark("precision", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="4 rounds of 1 step (a smoke run)"))
