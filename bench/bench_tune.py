"""Delta tuning: LoRA against full fine-tuning on the demo tasks, and our LoRA step against PEFT's.

Run from the repository root:  .venv/bin/python bench/bench_tune.py [--quick] [--parent DIR]
Writes bench/results/tune.json and prints two tables; bench/README.md ("Delta tuning") explains it.

1. A base is pretrained on the default corpus (fortunes-zh, the `tiny` preset), or a finished one is reused
   (--parent: a model folder, or a pretraining run folder holding model/).
2. Speed: one LoRA tuning step (forward, backward, AdamW over the LoRA weights) of our `CPMAnt` with OpenDelta's
   LoRA (`cpmant.delta.methods.apply_delta`) against PEFT's LoRA on transformers' `CpmAntForCausalLM`: the same
   config and weights (cpmant.convert's hf state dict), the same rank, alpha and target modules, the same batch
   (bench_train_step's all-context rows: both models do the same work), timed round after round in alternating
   order; the ratio is the median of per-round ratios. Target: ours >= 1.3x PEFT's tokens/s.
   PEFT comes from the bench-only extra (`pip install -e .[bench]`); without it this part is skipped and says so.
3. Scores: on each demo task (cpmant.cuge, `is_demo`), the base's zero-shot score, then `lora` (CPM-Ant's recipe:
   project_q and project_v, r 8, alpha 16) and `full` fine-tuning, each with the platform's own loop
   (`cpmant.delta.train.tune`, TuneConfig's settings, the best epoch on the valid split kept), all scored on the
   test split with the task's primary metric. Targets: lora >= 95% of full's score, with <= 1% of the parameters
   trainable and a delta file <= 1% of the base's bytes. The table is reported even where a target is missed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the environment must be isolated before cpmant modules are used)
    interleave, markdown_table, median, our_loss, paired_ratio, prepare_default_corpus, recording_load,
    run_benchmark, spread, verdict,
)

SCORE_RATIO, TRAINABLE_SHARE, DELTA_SHARE, STEP_RATIO = 0.95, 0.01, 0.01, 1.3
LORA = dict(r=8, alpha=16, modules=("project_q", "project_v"))
STEP_BATCH, STEP_SEQ = 8, 128
# parent pretraining steps; tuning epochs and training examples per task (0 = all); timing rounds and steps per round
MODES = {
    "full": dict(parent_steps=300, epochs=3, train_examples=0, rounds=12, steps=2),
    "quick": dict(parent_steps=30, epochs=1, train_examples=64, rounds=3, steps=1),
}


# ================================================================================================================
# 1. The base
# ================================================================================================================
def get_parent(args, mode: dict, home: Path) -> tuple[Path, dict]:
    from cpmant import checkpoint as ckpt

    if args.parent:
        p = Path(args.parent).expanduser().resolve()
        if not ckpt.is_complete(p) and ckpt.is_complete(p / "model"):
            p = p / "model"
        meta = ckpt.read_meta(p)
        return p, {"reused": True, "dir": str(p), "preset": meta.get("preset"), "step": meta.get("step")}
    from cpmant.training.config import PretrainConfig
    from cpmant.training.loop import pretrain

    prepared = prepare_default_corpus()
    steps = mode["parent_steps"]
    cfg = PretrainConfig(preset="tiny", max_steps=steps, eval_interval=steps, save_interval=steps, keep_last=1,
                         output_dir=str(home / "runs" / f"bench-parent-{steps}"))
    print(f"1. pretraining the base: tiny preset, {steps} steps", flush=True)
    t0 = time.perf_counter()
    r = pretrain(cfg, prepared=prepared, progress=False)
    return r.model_dir, {"reused": False, "dir": str(r.model_dir), "preset": "tiny", "steps": steps,
                         "valid_loss_end": r.valid_loss_end, "seconds": round(time.perf_counter() - t0, 1)}


# ================================================================================================================
# 3. Scores: zero-shot, lora, full on each demo task
# ================================================================================================================
def demo_tasks() -> list[str]:
    from cpmant.cuge import get_task, task_names

    return [n for n in task_names() if getattr(get_task(n), "is_demo", n.startswith("demo-"))]


def _load(task, split: str, cfg):
    import inspect

    kw = dict(split=split, data_dir=cfg.data, malformed_threshold=cfg.malformed_threshold)
    accepted = inspect.signature(task.load).parameters
    return task.load(**{k: v for k, v in kw.items() if k in accepted})


def score_task(name: str, parent: Path, cfg, tmp: Path) -> dict:
    from cpmant.checkpoint import WEIGHTS_FILE, load_pretrained
    from cpmant.cuge import get_task
    from cpmant.delta.checkpoint import save_delta
    from cpmant.delta.train import evaluate_zero_shot, tune

    task = get_task(name)
    train, valid, test = (_load(task, s, cfg) for s in ("train", "valid", "test"))
    primary = task.primary_metric
    model, tok = load_pretrained(parent)
    row: dict = {"task": name, "metric": primary, "examples": [len(train), len(valid), len(test)],
                 "zero_shot": evaluate_zero_shot(task, model, tok, test, cfg)[primary]}
    base_bytes = (parent / WEIGHTS_FILE).stat().st_size
    for method in ("lora", "full"):
        model, tok = load_pretrained(parent)
        t0 = time.perf_counter()
        res = tune(model, tok, task, train, valid, method, cfg, progress=False,
                   params=dict(LORA) if method == "lora" else None)
        seconds = time.perf_counter() - t0
        out = save_delta(tmp / f"{name}-{method}", res.handle, parent, task=name, state_dict=res.best_state)
        files = [f for f in out.iterdir() if f.suffix == ".safetensors"]
        score = evaluate_zero_shot(task, res.handle.model, tok, test, cfg)[primary]
        row[method] = {"score": score, "trainable_params": res.report["trainable_params"],
                       "trainable_ratio": res.report["trainable_ratio"], "best_epoch": res.report["best_epoch"],
                       "epochs_run": res.report["epochs_run"], "seconds": round(seconds, 1),
                       "delta_bytes": sum(f.stat().st_size for f in files), "base_bytes": base_bytes}
        row[method]["delta_bytes_ratio"] = row[method]["delta_bytes"] / base_bytes
        print(f"   {name} {method}: {primary} {score:.2f} ({seconds:.0f} s)", flush=True)
    full = row["full"]["score"]
    lora = row["lora"]
    row["lora_vs_full"] = lora["score"] / full if full else None
    row["meets"] = {"score": None if row["lora_vs_full"] is None else row["lora_vs_full"] >= SCORE_RATIO,
                    "trainable": lora["trainable_ratio"] <= TRAINABLE_SHARE,
                    "delta_bytes": lora["delta_bytes_ratio"] <= DELTA_SHARE}
    return row


# ================================================================================================================
# 2. Speed: our LoRA step against PEFT's
# ================================================================================================================
def peft_version() -> str | None:
    try:
        import peft
    except ImportError:
        return None
    return peft.__version__


def step_speed(parent: Path, mode: dict) -> dict:
    import torch
    from transformers import CpmAntForCausalLM

    from bench_train_step import TimedStep, all_context_batch
    from cpmant.checkpoint import load_pretrained
    from cpmant.convert import to_hf_config, to_hf_state_dict
    from cpmant.delta.methods import apply_delta, trainable_parameters

    version = peft_version()
    if version is None:
        return {"skipped": "PEFT is not installed: pip install -e .[bench] (the bench-only extra pins it)"}
    from peft import LoraConfig, get_peft_model

    ours, _ = load_pretrained(parent)
    config = ours.config
    hf = CpmAntForCausalLM(to_hf_config(config))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=True)
    apply_delta(ours, "lora", dict(LORA))
    peft_model = get_peft_model(hf, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                               target_modules=list(LORA["modules"])))
    ours.train()
    peft_model.train()
    n_ours = trainable_parameters(ours)
    n_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    inputs, target, project, ids, labels = all_context_batch(config, STEP_BATCH, STEP_SEQ)
    with torch.no_grad():  # B = 0 at init on both sides: the logits are the base's, and must agree
        a = ours(**inputs)[:, config.prompt_length:]
        b = peft_model(input_ids=ids, use_cache=False).logits[..., :config.vocab_size]
        parity = float((a - b).abs().max() / b.abs().max())
    step_ours = TimedStep(ours, lambda: our_loss(ours, inputs, target, project))
    step_peft = TimedStep(peft_model, lambda: peft_model(input_ids=ids, labels=labels, use_cache=False).loss)
    for s in (step_ours, step_peft):  # warm-up
        for _ in range(2):
            s()
        s.reset()
    k = mode["steps"]
    r: dict = {"peft": version, "trainable_params": {"ours": n_ours, "peft": n_peft},
               "logits_max_rel_diff": parity, "batch": [STEP_BATCH, STEP_SEQ], "lora": dict(LORA)}
    with recording_load(r):
        secs = interleave({"ours": lambda: [step_ours() for _ in range(k)],
                           "peft": lambda: [step_peft() for _ in range(k)]}, mode["rounds"])
    tokens = STEP_BATCH * STEP_SEQ * k
    ratio = paired_ratio(secs["peft"], secs["ours"])
    r.update({"ours_tokens_per_s": tokens / median(secs["ours"]), "peft_tokens_per_s": tokens / median(secs["peft"]),
              "ratio": ratio, "target": STEP_RATIO, "meets_target": ratio >= STEP_RATIO,
              "round_spread": {"ours": spread(secs["ours"]), "peft": spread(secs["peft"])},
              "seconds_per_step_parts": {"ours": step_ours.part_seconds(), "peft": step_peft.part_seconds()},
              "rounds_seconds": secs})
    print(f"   LoRA step: ours {r['ours_tokens_per_s']:,.0f} tok/s, PEFT {r['peft_tokens_per_s']:,.0f} tok/s, "
          f"ratio {ratio:.2f}", flush=True)
    return r


def measure(args, mode: dict, home: Path, report: dict) -> None:
    import tempfile

    import torch

    from cpmant.delta.config import TuneConfig

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    report["meta"]["torch_threads"] = torch.get_num_threads()
    parent, info = get_parent(args, mode, home)
    report["parent"] = info
    report["scores"], report["step"] = [], {"skipped": "--part scores"}
    if args.part in ("all", "speed"):
        print("2. speed: one LoRA tuning step, ours against PEFT on transformers' CpmAntForCausalLM", flush=True)
        report["step"] = step_speed(parent, mode)
    if args.part == "speed":
        return
    cfg = TuneConfig(epochs=mode["epochs"], max_train_examples=mode["train_examples"] or None)
    report["meta"]["tune_config"] = cfg.model_dump(mode="json")
    print("3. scores: zero-shot, lora and full on each demo task", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        for name in (args.tasks.split(",") if args.tasks else demo_tasks()):
            r = {"task": name}
            with recording_load(r):
                r.update(score_task(name, parent, cfg, Path(tmp)))
            rows.append(r)
    report["scores"] = rows


def table(r: dict) -> str:
    rows = []
    for s in r["scores"]:
        lo, fu = s["lora"], s["full"]
        la = s["load_average"]["before"][:1] + s["load_average"]["after"][:1]
        rows.append((s["task"], s["metric"], f"{s['zero_shot']:.2f}", f"{lo['score']:.2f}", f"{fu['score']:.2f}",
                     "-" if s["lora_vs_full"] is None else f"{s['lora_vs_full']:.0%}",
                     f"{lo['trainable_ratio']:.2%}", f"{lo['delta_bytes_ratio']:.2%}",
                     verdict(all(v for v in s["meets"].values() if v is not None))
                     + (" (score n/a: full scored 0)" if s["meets"]["score"] is None else ""),
                     " -> ".join(map(str, la))))
    out = markdown_table(("demo task", "metric", "zero-shot", "lora", "full", "lora / full (>= 95%)",
                          "trainable (<= 1%)", "delta / base bytes (<= 1%)", "met", "load"), rows)
    st = r["step"]
    if "skipped" in st:
        return out + f"\n\nLoRA step vs PEFT: skipped ({st['skipped']})"
    la = st["load_average"]["before"][:1] + st["load_average"]["after"][:1]
    out += "\n\n" + markdown_table(
        ("LoRA tuning step", "tokens/s ours / PEFT", "ratio", "target", "met", "trainable ours / PEFT", "load"),
        [(f"tiny, {STEP_BATCH}x{STEP_SEQ}, r {LORA['r']}, PEFT {st['peft']}",
          f"{st['ours_tokens_per_s']:,.0f} / {st['peft_tokens_per_s']:,.0f}", f"{st['ratio']:.2f}x",
          f">= {STEP_RATIO}x", verdict(st["meets_target"]),
          f"{st['trainable_params']['ours']:,} / {st['trainable_params']['peft']:,}", " -> ".join(map(str, la)))])
    return out


def arguments(ap) -> None:
    ap.add_argument("--parent", help="a pretrained model folder (or a run folder holding model/) to tune from")
    ap.add_argument("--tasks", help="comma list of tasks to score (default: every demo task)")
    ap.add_argument("--part", choices=("all", "scores", "speed"), default="all", help="run only one part")
    ap.add_argument("--threads", type=int, help="torch threads (default: one per core)")


if __name__ == "__main__":
    sys.exit(run_benchmark("tune", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="a short base, 1 epoch on 64 examples per task, 3 timing rounds (a smoke run)"))
