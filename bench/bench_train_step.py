"""One training step: ours vs transformers' CpmAntForCausalLM on the same weights, in tokens/s and MFU.

Run from the repository root:  .venv/bin/python bench/bench_train_step.py [--quick] [--profile]
Writes bench/results/train_step.json and prints a table; bench/README.md ("Training step") explains it.

For two model configs (tiny, d256-l4) and two batches (all-context: the same work on both sides; pretrain-rows:
real PretrainStream rows, as each implementation trains), one fp32 step (forward, backward, AdamW) of each model
runs in turn, round after round; the ratio is the median of per-round ratios. Both logits are compared first.
When the ratio misses its target (or with --profile) both steps are profiled by category.
The limit beside the peer (bench/_limits.py): MFU against the fp32 matmul peak sampled through the run, target
>= 60% on d256 and larger; on a CPU that multiplies bf16 natively also ours under bf16 autocast (as `precision:
auto` trains there), its MFU against the bf16 peak.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the environment must be isolated before cpmant modules are used)
    Peak, interleave, markdown_table, median, our_loss, paired_ratio, prepare_default_corpus, pretrain_stream,
    recording_load, run_benchmark, spread, verdict,
)

TARGET_STEP_RATIO = 1.5  # ours >= 1.5x transformers' tokens/s
TARGET_MFU = 0.60  # issue 19: MFU >= 60% of the peak of the dtype in use, on d256 and larger
# rounds, and steps per round (short rounds pair the peers closely in time)
MODES = {"full": dict(rounds=18, steps=2, quick=False), "quick": dict(rounds=6, steps=1, quick=True)}
STEP_BATCH, STEP_SEQ = 8, 128  # 8 rows x 128 positions


def step_configs():
    from cpmant.config import get_preset

    tiny = get_preset("tiny")  # vocab 8000, dim 128, 4 layers: the CPU default
    return {"tiny": tiny, "d256-l4": tiny.replace(dim_model=256, dim_ff=768, num_heads=8, dim_head=32)}


def all_context_batch(config, batch: int, seq_len: int, seed: int = 0):
    """The same rows in our format and in transformers', so both models do exactly the same work.

    transformers' CpmAntModel.forward takes n token ids and builds the row itself: it puts the task-2 prompt
    (prompt_length positions, segment 0) in front, gives the text segment 2, marks every position as context (one
    bidirectional span) and numbers positions 0..P+n-1. Our model takes that whole row explicitly, so ours gets
    input = [2P..3P-1 prompt ids, n tokens] with the same segments, context, positions and span, and HF gets the n
    tokens. Both encoders then process seq_len = P + n positions per row, and tokens/s counts batch x seq_len for
    both. Both project the n text positions onto the vocabulary (ours through `logits_at`; HF's tied head has
    vocab + prompt rows outputs, 0.4% more columns for tiny). The loss is the mean next-token cross entropy over
    the text positions; HF's CpmAntForCausalLM does not shift labels, so they are passed already shifted.
    Returns (our inputs, our targets, the positions we project, HF input_ids, HF labels).
    """
    import torch

    from cpmant.tokenizer import SENTINELS, SPECIAL_TOKENS
    from cpmant.training.data import IGNORE, TASK_LM

    P = config.prompt_length
    n = seq_len - P
    g = torch.Generator().manual_seed(seed)
    # ids that are neither specials nor sentinels (HF also treats id 0 as left padding)
    ids = torch.randint(len(SPECIAL_TOKENS), config.vocab_size - len(SENTINELS), (batch, n), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    ours = dict(
        input=torch.cat([torch.arange(TASK_LM * P, (TASK_LM + 1) * P).repeat(batch, 1), ids], dim=1),
        length=torch.full((batch,), seq_len),
        context=torch.ones(batch, seq_len, dtype=torch.bool),
        position=torch.arange(seq_len).repeat(batch, 1),
        segment=torch.cat([torch.zeros(batch, P, dtype=torch.long), torch.full((batch, n), TASK_LM)], dim=1),
        span=torch.zeros(batch, seq_len, dtype=torch.long),
    )
    target = torch.cat([torch.full((batch, P), IGNORE), labels], dim=1)
    project = torch.zeros(batch, seq_len, dtype=torch.bool)
    project[:, P:] = True
    return ours, target, project, ids, labels


def pretrain_rows_batch(config, prepared, batch: int, seq_len: int):
    """Real training rows from PretrainStream (both objectives, packed pieces, about a third of the positions
    with a target), and the nearest thing transformers can run: the same token ids after the prompt (padding
    replaced by </s>, since HF would take id 0 for left padding) with our targets as labels. HF cannot express
    our context/span masks, so its attention differs, but its cost does not (attention is dense either way), and
    the loss covers the same positions. This is the step as each implementation trains: ours projects only the
    positions with a target, transformers' head projects them all.
    Returns (our inputs, our targets, None, HF input_ids, HF labels)."""
    from cpmant.tokenizer import EOS_ID, PAD_ID

    b = pretrain_stream(prepared.train_docs, config, seq_len, seed=0).batch(range(batch))
    P = config.prompt_length
    ids = b.input[:, P:].clone()
    ids[ids == PAD_ID] = EOS_ID
    return b.model_inputs(), b.target, None, ids, b.target[:, P:].clone()


class TimedStep:
    """forward + backward + AdamW step of one model on one fixed batch; accumulates the time of each part."""

    def __init__(self, model, loss_fn):
        import torch

        self.model, self.loss_fn = model, loss_fn
        # one optimizer setting for both models (the default for-each-parameter AdamW on CPU)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
        self.reset()

    def reset(self):
        self.parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.steps = 0

    def __call__(self):
        t0 = time.perf_counter()
        loss = self.loss_fn()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        self.parts["forward"] += t1 - t0
        self.parts["backward"] += t2 - t1
        self.parts["optimizer"] += t3 - t2
        self.steps += 1

    def part_seconds(self) -> dict:
        return {k: v / max(self.steps, 1) for k, v in self.parts.items()}


def _in_bf16(autocast, loss, *args):
    with autocast("bf16"):
        return loss(*args)


def profile_step(step: TimedStep, vocab_sizes: set[int], steps: int = 3) -> dict:
    """Self CPU time of one training step by category, and the top operators (with shapes).

    Categories: ops with a vocab-sized tensor (output projection, its loss, the embedding gradient), the other
    matmuls (the transformer layers), and everything else (norms, softmax, elementwise, AdamW's updates).
    """
    from torch.profiler import ProfilerActivity, profile

    def run():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            for _ in range(steps):
                step()
        return p

    # two tries, keep the faster: a single profile is easily inflated by other load on the machine
    prof = min((run() for _ in range(2)), key=lambda p: sum(e.self_cpu_time_total for e in p.key_averages()))
    cats = {"vocab-sized ops": 0.0, "layer matmuls": 0.0, "other": 0.0}
    top = []
    for ev in prof.key_averages(group_by_input_shape=True):
        us = ev.self_cpu_time_total
        if us <= 0:
            continue
        shapes = [s for s in (ev.input_shapes or []) if isinstance(s, list)]
        if any(d in vocab_sizes for s in shapes for d in s):
            cats["vocab-sized ops"] += us
        elif ev.key in ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::matmul"):
            cats["layer matmuls"] += us
        else:
            cats["other"] += us
        top.append((us, ev.key, shapes, ev.count))
    total = sum(cats.values()) or 1.0
    top.sort(reverse=True)
    return {
        "self_cpu_ms_per_step": total / 1e3 / steps,
        "share": {k: round(v / total, 3) for k, v in cats.items()},
        "top_ops": [{"op": k, "shapes": str(s), "calls_per_step": c / steps,
                     "ms_per_step": round(us / 1e3 / steps, 2), "share": round(us / total, 3)}
                    for us, k, s, c in top[:10]],
    }


def measure_one(name, config, kind, make, ours, hf, mode: dict, force_profile: bool, bf16: bool) -> dict:
    from cpmant.flops import flops_per_token
    from cpmant.precision import autocast
    from cpmant.training.data import IGNORE

    inputs, target, project, ids, labels = make()
    step_ours = TimedStep(ours, lambda: our_loss(ours, inputs, target, project))
    step_hf = TimedStep(hf, lambda: hf(input_ids=ids, labels=labels, use_cache=False).loss)
    steps = {"ours": step_ours, "hf": step_hf}
    if bf16:  # ours as `precision: auto` trains on this CPU (its own AdamW state: the fp32 step's stays as it was)
        steps["ours_bf16"] = TimedStep(ours, lambda: _in_bf16(autocast, our_loss, ours, inputs, target, project))
    for s in steps.values():  # warm-up: AdamW state, allocator, oneDNN primitives
        for _ in range(2):
            s()
        s.reset()
    k = mode["steps"]

    def run(s):
        return lambda: [s() for _ in range(k)]

    r: dict = {"config": name, "batch_kind": kind}
    with recording_load(r):
        secs = interleave({k: run(s) for k, s in steps.items()}, mode["rounds"])
    tokens = STEP_BATCH * STEP_SEQ * k
    ratio = paired_ratio(secs["hf"], secs["ours"])  # time_hf / time_ours = tokens/s ours / tokens/s hf
    share = float((target != IGNORE).float().mean())
    r.update({
        "model": {k2: v for k2, v in config.to_dict().items() if k2 != "mask_modules"},
        "parameters": ours.num_parameters(),
        "batch": [STEP_BATCH, STEP_SEQ],
        "positions_with_target_share": share,
        "ours_tokens_per_s": tokens / median(secs["ours"]),
        "hf_tokens_per_s": tokens / median(secs["hf"]),
        "ratio": ratio,
        "target": TARGET_STEP_RATIO,
        "meets_target": ratio >= TARGET_STEP_RATIO,
        # the same model FLOPs for both (what the loss needs); MFUs are added at the end (best peak)
        "flops_per_token": flops_per_token(config, STEP_SEQ, vocab_share=share),
        "round_spread": {"ours": spread(secs["ours"]), "hf": spread(secs["hf"])},
        "seconds_per_step_parts": {"ours": step_ours.part_seconds(), "hf": step_hf.part_seconds()},
        "rounds_seconds": secs,
    })
    r["fastest_round_tokens_per_s"] = {n: tokens / min(v) for n, v in secs.items()}  # what a quiet moment gives
    if bf16:
        r["ours_bf16_tokens_per_s"] = tokens / median(secs["ours_bf16"])
    if force_profile or (ratio < TARGET_STEP_RATIO and not mode["quick"]):  # short of the target: what dominates
        vocab_sizes = {config.vocab_size, config.vocab_size + config.prompt_types * config.prompt_length}
        r["profile"] = {k: profile_step(s, vocab_sizes) for k, s in steps.items()}
    print(f"   {name}, {kind}: ours {r['ours_tokens_per_s']:,.0f} tok/s, transformers {r['hf_tokens_per_s']:,.0f} "
          f"tok/s, ratio {ratio:.2f}", flush=True)
    return r


def measure(args, mode: dict, home: Path, report: dict) -> None:
    import torch
    from transformers import CpmAntForCausalLM

    from cpmant.convert import to_hf_config, to_hf_state_dict
    from cpmant.model import CPMAnt
    from cpmant.precision import bf16_native

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    report["meta"]["torch_threads"] = torch.get_num_threads()
    peak, peak_bf16, bf16 = Peak(), Peak("bf16"), bf16_native("cpu")
    print(f"   matmul peak {peak.sample() / 1e9:,.1f} GFLOP/s fp32"
          + (f", {peak_bf16.sample() / 1e9:,.1f} bf16" if bf16 else " (no native bf16)"), flush=True)
    prepared = prepare_default_corpus()
    results = []
    for name, config in step_configs().items():
        torch.manual_seed(0)
        ours = CPMAnt(config).train()
        hf = CpmAntForCausalLM(to_hf_config(config)).train()
        hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=True)
        # the comparison is only meaningful if both compute the same function: check the logits first
        inputs, _, _, ids, _ = all_context_batch(config, STEP_BATCH, STEP_SEQ)
        with torch.no_grad():
            a = ours(**inputs)[:, config.prompt_length:]
            b = hf(input_ids=ids, use_cache=False).logits[..., :config.vocab_size]
            parity = float((a - b).abs().max() / b.abs().max())
        print(f"   ({name}: logits rel. diff to transformers {parity:.1e})", flush=True)
        for kind, make in (("all-context", lambda: all_context_batch(config, STEP_BATCH, STEP_SEQ)),
                           ("pretrain-rows", lambda: pretrain_rows_batch(config, prepared, STEP_BATCH, STEP_SEQ))):
            r = measure_one(name, config, kind, make, ours, hf, mode, args.profile, bf16)
            r["logits_max_rel_diff_vs_hf"] = parity
            results.append(r)
            peak.sample()
            if bf16:
                peak_bf16.sample()
        del ours, hf
    # MFU = flops_per_token x tokens/s / peak, for both, against the best peak sample of the dtype in use
    for s in results:
        s["ours_mfu"] = s["flops_per_token"] * s["ours_tokens_per_s"] / peak.best
        s["hf_mfu"] = s["flops_per_token"] * s["hf_tokens_per_s"] / peak.best
        s["ours_mfu_fastest_round"] = s["flops_per_token"] * s["fastest_round_tokens_per_s"]["ours"] / peak.best
        if bf16:
            s["ours_bf16_mfu"] = s["flops_per_token"] * s["ours_bf16_tokens_per_s"] / peak_bf16.best
            s["ours_bf16_mfu_fastest_round"] = (s["flops_per_token"] * s["fastest_round_tokens_per_s"]["ours_bf16"]
                                                / peak_bf16.best)
        s["mfu_target"] = TARGET_MFU if s["config"] != "tiny" else None
        s["meets_mfu_target"] = None if s["mfu_target"] is None else s["ours_mfu"] >= TARGET_MFU
    report["meta"].update(peak_flops=peak.best, peak_flops_samples=peak.samples,
                          peak_flops_bf16=peak_bf16.best if bf16 else None)
    report["train_step"] = results


def table(r: dict) -> str:
    rows = []
    for s in r["train_step"]:
        la = s["load_average"]["before"][:1] + s["load_average"]["after"][:1]
        rows.append((f"{s['config']}, {s['batch_kind']}",
                     f"{s['ours_tokens_per_s']:,.0f} / {s['hf_tokens_per_s']:,.0f}", f"{s['ratio']:.2f}x",
                     f">= {TARGET_STEP_RATIO}x", verdict(s["meets_target"]),
                     f"{s['ours_mfu']:.1%} / {s['hf_mfu']:.1%}",
                     "-" if s["mfu_target"] is None else f">= {s['mfu_target']:.0%}: {verdict(s['meets_mfu_target'])}",
                     f"{s['ours_bf16_mfu']:.1%}" if "ours_bf16_mfu" in s else "-", " -> ".join(map(str, la))))
    m = r["meta"]
    bf16 = f"{m['peak_flops_bf16'] / 1e9:,.0f}" if m.get("peak_flops_bf16") else "none (no native bf16)"
    return markdown_table(("train step", "tokens/s ours / transformers", "ratio", "target", "met",
                           "MFU ours / transformers (fp32 peak)", "MFU target", "MFU ours bf16 (bf16 peak)", "load"),
                          rows) + (f"\n\npeak GFLOP/s fp32 {m['peak_flops'] / 1e9:,.0f}, bf16 {bf16}; "
                                   f"CPU flags {' '.join(m.get('cpu_flags', []))}")


def arguments(ap) -> None:
    ap.add_argument("--profile", action="store_true",
                    help="profile both steps even when the ratio meets its target (and in --quick runs, which "
                         "otherwise skip the profile)")
    ap.add_argument("--threads", type=int, help="torch threads (default: one per core)")


if __name__ == "__main__":
    sys.exit(run_benchmark("train_step", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="6 rounds of 1 step, no profile (a smoke run)"))
