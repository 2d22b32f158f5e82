"""Delta tuning: LoRA against full fine-tuning on the demo tasks, and our LoRA step against PEFT's.

Run from the repository root:  .venv/bin/python bench/bench_tune.py [--quick] [--parent DIR]
Writes bench/results/tune.json and prints two tables; bench/README.md ("Delta tuning") explains it.

1. A base is pretrained on the default corpus (fortunes-zh, the `tiny` preset), or a finished one is reused
   (--parent: a model folder, or a pretraining run folder holding model/).
2. Speed: one LoRA tuning step (forward, backward, AdamW over the LoRA weights) of our `CPMAnt` with OpenDelta's
   LoRA (`cpmant.delta.methods.apply_delta`) against PEFT's LoRA on transformers' `CpmAntForCausalLM`: the same
   config and weights (cpmant.convert's hf state dict), the same rank, alpha and target modules, the same batch
   (bench_train_step's all-context rows: both models do the same work), timed round after round in alternating
   order; the ratio is the median of per-round ratios. Target: ours >= 1.3x PEFT's tokens/s. The limits beside
   it, timed in the same rounds: the floor any LoRA implementation pays, the frozen model's forward plus backward
   to the inputs (our base with no delta, requires_grad only on the input embeddings' output; target: our step
   <= 1.15x its time), and MFU against the fp32 matmul peak (forward + backward to the activations: 4 FLOPs per
   matmul weight per token, plus attention; the LoRA matrices' own FLOPs are left out).
   PEFT comes from the bench-only extra (`pip install -e .[bench]`); without it this part is skipped and says so.
3. Scores: on each demo task (cpmant.cuge, `is_demo`), the base's zero-shot score (its zero-shot prompt), then
   `lora` (CPM-Ant's recipe: project_q and project_v, r 8, alpha 16) and `full` fine-tuning with the platform's
   own loop (`cpmant.delta.train.tune`, TuneConfig's settings, the best epoch on the valid split kept), each with
   its chosen lr: the method's lr grid (TuneConfig.lr_grid_for) is tried with seed 0 (`sweep_lr`) and the lr with
   the best valid score is kept (the grid and the choice are in the JSON: the lifecycle's per-method defaults come
   from here), then `--seeds` tuning seeds (delta init, example order, dropout) per method. Every model is scored
   on the same test examples; the per-example predictions give 95% paired bootstrap intervals
   (`cpmant.cuge.resampling`, `cpmant.stats`) of the mean over seeds: lora / full (the ratio) and lora - zero-shot
   (points). Targets per task: the ratio's lower bound >= 95% with <= 1% of the parameters trainable (and a delta
   file <= 1% of the base's bytes), and lora - zero-shot's lower bound > 0; met on at least three tasks. The table
   is reported even where a target is missed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the environment must be isolated before cpmant modules are used)
    Peak, interleave, markdown_table, median, our_loss, paired_ratio, prepare_default_corpus, recording_load,
    run_benchmark, spread, verdict,
)

SCORE_RATIO, TRAINABLE_SHARE, DELTA_SHARE, STEP_RATIO = 0.95, 0.01, 0.01, 1.3
FLOOR_RATIO = 1.15  # our LoRA step <= 1.15x the frozen forward + backward to the inputs
LORA = dict(r=8, alpha=16, modules=("project_q", "project_v"))
STEP_BATCH, STEP_SEQ = 8, 128
# parent pretraining steps; tuning epochs and training examples per task (0 = all); timing rounds and steps per round
MODES = {
    "full": dict(parent_steps=300, epochs=3, train_examples=0, eval_examples=0, seeds=3, rounds=12, steps=2,
             quick=False),
    "quick": dict(parent_steps=30, epochs=1, train_examples=64, eval_examples=100, seeds=1, rounds=3, steps=1,
              quick=True),
}
TASKS_MET = 3  # tasks on which both score targets must hold


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
    return task.load(split=split, data_dir=cfg.data, malformed_threshold=cfg.malformed_threshold)


def _result_row(task, parent: Path, res, tok, test, cfg, seconds: float, tmp: Path) -> dict:
    """A tuned model's valid score, test predictions, sizes and time."""
    from cpmant.checkpoint import WEIGHTS_FILE
    from cpmant.delta.checkpoint import save_delta
    from cpmant.delta.evaluation import eval_examples, predict_examples

    rep = res.report
    out = save_delta(tmp / f"{task.name}-{rep['method']}-{cfg.seed}-{rep['lr']:g}", res.handle, parent,
                     task=task.name, state_dict=res.best_state)
    delta_bytes = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return {"seed": cfg.seed, "lr": rep["lr"], "valid": (rep.get("best_metrics") or {}).get(task.primary_metric),
            "best_epoch": rep.get("best_epoch"), "epochs_run": rep.get("epochs_run"), "seconds": round(seconds, 1),
            "trainable_params": rep["trainable_params"], "trainable_ratio": rep["trainable_ratio"],
            "delta_bytes": delta_bytes, "delta_bytes_ratio": delta_bytes / (parent / WEIGHTS_FILE).stat().st_size,
            "predictions": predict_examples(task, res.handle.model, tok, eval_examples(test, cfg), cfg)}


def _method_runs(task, parent: Path, splits, method: str, cfg, seeds: int, tmp: Path) -> dict:
    """The lr sweep on seed 0 (`cpmant.delta.train.sweep_lr`: the method's grid, the best valid score kept), then
    seeds 1.. at the chosen lr."""
    from cpmant.checkpoint import load_pretrained
    from cpmant.delta.train import sweep_lr, tune

    train, valid, test = splits
    cfg = cfg.model_copy(update={"method_params": {**cfg.method_params, "lora": dict(LORA)}})
    tok = load_pretrained(parent)[1]
    t0 = time.perf_counter()
    sw = sweep_lr(lambda: load_pretrained(parent)[0], tok, task, train, valid, method,
                  cfg.model_copy(update={"seed": 0}), progress=False)
    lr = float(sw.best.report["lr"])
    runs = [_result_row(task, parent, sw.best, tok, test, cfg.model_copy(update={"seed": 0}),
                        time.perf_counter() - t0, tmp)]
    for seed in range(1, seeds):
        run_cfg = cfg.model_copy(update={"seed": seed, "lr": {**cfg.lr, method: lr}})
        t0 = time.perf_counter()
        res = tune(load_pretrained(parent)[0], tok, task, train, valid, method, run_cfg, progress=False)
        runs.append(_result_row(task, parent, res, tok, test, run_cfg, time.perf_counter() - t0, tmp))
    for r in runs:
        print(f"   {task.name} {method} seed {r['seed']} lr {r['lr']:g}: valid {task.primary_metric} "
              f"{r['valid']:.2f} ({r['seconds']:.0f} s)", flush=True)
    return {"grid": list(sw.grid), "chosen_lr": lr, "sweep": sw.rows, "runs": runs}


def _iv(interval) -> dict:
    return {"value": interval.value, "low": interval.low, "high": interval.high}


def score_task(name: str, parent: Path, cfg, seeds: int, tmp: Path) -> dict:
    """Zero-shot, lora and full on one demo task: scores with intervals, paired ratio and difference."""
    from cpmant.checkpoint import load_pretrained
    from cpmant.cuge import get_task
    from cpmant.cuge.resampling import metric_statistic, paired, ratio, seed_mean
    from cpmant.delta.evaluation import eval_examples, predict_examples

    task = get_task(name)
    splits = tuple(_load(task, s, cfg) for s in ("train", "valid", "test"))
    test = eval_examples(splits[2], cfg)
    primary = task.primary_metric
    model, tok = load_pretrained(parent)
    zero_pred = predict_examples(task, model, tok, test, cfg, zero_shot=True)
    stat = lambda preds: metric_statistic(task, primary, preds, test)  # noqa: E731
    zero = stat(zero_pred)
    row: dict = {"task": name, "metric": primary, "examples": [len(x) for x in splits[:2]] + [len(test)],
                 "seeds": seeds, "zero_shot": _iv(zero.interval())}
    for method in ("lora", "full"):
        m = _method_runs(task, parent, splits, method, cfg, seeds, tmp)
        m["stat"] = seed_mean([stat(r["predictions"]) for r in m["runs"]])
        m["score"] = _iv(m["stat"].interval())
        m["per_seed"] = [stat(r["predictions"]).interval().value for r in m["runs"]]
        row[method] = m
    lora, full = row.pop("lora"), row.pop("full")
    row["lora_vs_full_ratio"] = _iv(ratio(lora["stat"], full["stat"]))
    row["lora_vs_full"] = _iv(paired(lora["stat"], full["stat"]))
    row["lora_vs_zero_shot"] = _iv(paired(lora["stat"], zero))
    row["full_vs_zero_shot"] = _iv(paired(full["stat"], zero))
    for key, m in (("lora", lora), ("full", full)):
        first = m["runs"][0]
        row[key] = {"score": m["score"], "per_seed": m["per_seed"], "lr_grid": m["grid"], "chosen_lr": m["chosen_lr"],
                    "sweep": m["sweep"], "trainable_params": first["trainable_params"],
                    "trainable_ratio": first["trainable_ratio"], "delta_bytes_ratio": first["delta_bytes_ratio"],
                    "best_epochs": [r["best_epoch"] for r in m["runs"]],
                    "seconds": round(sum(r["seconds"] for r in m["runs"]), 1)}
    row["meets"] = {"ratio": row["lora_vs_full_ratio"]["low"] >= SCORE_RATIO,
                    "trainable": lora["runs"][0]["trainable_ratio"] <= TRAINABLE_SHARE,
                    "delta_bytes": lora["runs"][0]["delta_bytes_ratio"] <= DELTA_SHARE,
                    "above_zero_shot": row["lora_vs_zero_shot"]["low"] > 0}
    print(f"   {name}: zero-shot {row['zero_shot']['value']:.2f}, lora {lora['score']['value']:.2f}, full "
          f"{full['score']['value']:.2f}, lora/full {row['lora_vs_full_ratio']['value']:.2f} "
          f"[{row['lora_vs_full_ratio']['low']:.2f}, {row['lora_vs_full_ratio']['high']:.2f}]", flush=True)
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


def frozen_floor(parent: Path, inputs, target, project):
    """A callable: the frozen base's forward + backward to the input embeddings' output (no weight gradients, no
    optimizer): the work every LoRA step must do whatever its implementation."""
    from cpmant.checkpoint import load_pretrained

    base = load_pretrained(parent)[0].train()
    base.requires_grad_(False)
    embed = base.embed
    base.embed = lambda *a, **k: embed(*a, **k).requires_grad_()  # the only tensor the backward reaches

    def run():
        our_loss(base, inputs, target, project).backward()

    return run


def lora_flops_per_token(config, project) -> float:
    """forward + backward to the activations: 4 FLOPs per matmul weight per token (6 for a training step, whose
    weight gradients LoRA skips) and the attention scores' FLOPs in full (both need their input gradients)."""
    from cpmant.flops import flops_per_token

    att_kept, _ = config.kept()
    attention = 12 * att_kept * config.num_heads * config.dim_head * STEP_SEQ
    full = flops_per_token(config, STEP_SEQ, vocab_share=float(project.float().mean()))
    return (full - attention) * 4 / 6 + attention


def step_speed(parent: Path, mode: dict, force_profile: bool = False) -> dict:
    import torch
    from transformers import CpmAntForCausalLM

    from bench_train_step import TimedStep, all_context_batch, profile_step
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
    floor = frozen_floor(parent, inputs, target, project)
    for s in (step_ours, step_peft, floor):  # warm-up
        for _ in range(2):
            s()
    step_ours.reset()
    step_peft.reset()
    peak = Peak()
    peak.sample()
    k = mode["steps"]
    r: dict = {"peft": version, "trainable_params": {"ours": n_ours, "peft": n_peft},
               "logits_max_rel_diff": parity, "batch": [STEP_BATCH, STEP_SEQ], "lora": dict(LORA)}
    with recording_load(r):
        secs = interleave({"ours": lambda: [step_ours() for _ in range(k)],
                           "peft": lambda: [step_peft() for _ in range(k)],
                           "floor": lambda: [floor() for _ in range(k)]}, mode["rounds"])
    peak.sample()
    tokens = STEP_BATCH * STEP_SEQ * k
    ratio = paired_ratio(secs["peft"], secs["ours"])
    vs_floor = paired_ratio(secs["ours"], secs["floor"])  # time ours / time of the floor
    flops = lora_flops_per_token(config, project)
    r.update({"floor_tokens_per_s": tokens / median(secs["floor"]), "ours_vs_floor": vs_floor,
              "floor_target": FLOOR_RATIO, "meets_floor_target": vs_floor <= FLOOR_RATIO,
              "flops_per_token": flops, "peak_flops": peak.best, "peak_flops_samples": peak.samples,
              "ours_mfu": flops * tokens / median(secs["ours"]) / peak.best,
              "floor_mfu": flops * tokens / median(secs["floor"]) / peak.best,
              "peft_mfu": flops * tokens / median(secs["peft"]) / peak.best,
              # the fastest rounds: what a quiet moment gives (the peak is also the best sample)
              "fastest_round": {"ours_vs_floor": min(secs["ours"]) / min(secs["floor"]),
                                "ours_vs_peft": min(secs["peft"]) / min(secs["ours"]),
                                "ours_mfu": flops * tokens / min(secs["ours"]) / peak.best}})
    r.update({"ours_tokens_per_s": tokens / median(secs["ours"]), "peft_tokens_per_s": tokens / median(secs["peft"]),
              "ratio": ratio, "target": STEP_RATIO, "meets_target": ratio >= STEP_RATIO,
              "round_spread": {"ours": spread(secs["ours"]), "peft": spread(secs["peft"])},
              "seconds_per_step_parts": {"ours": step_ours.part_seconds(), "peft": step_peft.part_seconds()},
              "rounds_seconds": secs})
    if force_profile or not (r["meets_target"] and r["meets_floor_target"]) and not mode["quick"]:
        vocab = {config.vocab_size, config.vocab_size + config.prompt_types * config.prompt_length}
        r["profile"] = {"ours": profile_step(step_ours, vocab), "floor": profile_step(floor, vocab)}
    print(f"   LoRA step: ours {r['ours_tokens_per_s']:,.0f} tok/s, PEFT {r['peft_tokens_per_s']:,.0f} tok/s, "
          f"ratio {ratio:.2f}; {vs_floor:.2f}x the frozen fwd+bwd floor, MFU {r['ours_mfu']:.0%}", flush=True)
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
        report["step"] = step_speed(parent, mode, args.profile)
    if args.part == "speed":
        return
    grids = {m: [float(x) for x in g.split(":")] for m, g in (p.split("=") for p in (args.lr_grid or "").split(",")
                                                              if p)}
    cfg = TuneConfig(epochs=mode["epochs"], max_train_examples=mode["train_examples"] or None,
                     max_eval_examples=mode["eval_examples"] or None, **({"lr_grid": grids} if grids else {}))
    report["meta"]["tune_config"] = cfg.model_dump(mode="json")
    print(f"3. scores: zero-shot, lora and full on each demo task, {mode['seeds']} seed(s)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        for name in (args.tasks.split(",") if args.tasks else demo_tasks()):
            r = {"task": name}
            with recording_load(r):
                r.update(score_task(name, parent, cfg, mode["seeds"], Path(tmp)))
            rows.append(r)
            report["scores"] = rows  # kept as it goes
    report["scores"] = rows
    met = [r["task"] for r in rows if meets_both(r)]
    report["target"] = {"tasks_met": met, "needed": TASKS_MET, "met": len(met) >= TASKS_MET,
                        "chosen_lr": {m: {r["task"]: r[m]["chosen_lr"] for r in rows} for m in ("lora", "full")}}


def all_zero(row: dict) -> bool:
    """Every model scores 0 with no spread: the base is too weak for the task, and the row decides nothing."""
    return max(row["zero_shot"]["high"], row["lora"]["score"]["high"], row["full"]["score"]["high"]) == 0


def meets_both(row: dict) -> bool:
    m = row["meets"]
    return bool(m["ratio"] and m["trainable"] and m["above_zero_shot"]) and not all_zero(row)


def _ci(d: dict, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(d['value'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"


def table(r: dict) -> str:
    rows = []
    for s in r["scores"]:
        lo, fu = s["lora"], s["full"]
        la = s["load_average"]["before"][:1] + s["load_average"]["after"][:1]
        rows.append((s["task"], f"{s['metric']} ({s['examples'][2]})", _ci(s["zero_shot"]), _ci(lo["score"]),
                     _ci(fu["score"]), _ci(s["lora_vs_full_ratio"], "{:.0%}"), f"{lo['trainable_ratio']:.2%}",
                     _ci(s["lora_vs_zero_shot"], "{:+.1f}"), _ci(s["full_vs_zero_shot"], "{:+.1f}"),
                     f"{lo['chosen_lr']:g} / {fu['chosen_lr']:g}",
                     *(("n/a: every model scores 0 (the base is too weak)",) * 2 if all_zero(s) else
                       (verdict(s["meets"]["ratio"] and s["meets"]["trainable"]),
                        verdict(s["meets"]["above_zero_shot"]))),
                     " -> ".join(map(str, la))))
    out = markdown_table(("demo task", "metric (test n)", "zero-shot", "lora", "full", "lora / full (low >= 95%)",
                          "lora trainable (<= 1%)", "lora - zero-shot (low > 0)", "full - zero-shot",
                          "lr lora / full", "lora ~ full", "lora > zero-shot", "load"), rows)
    t = r.get("target")
    if t:
        out += (f"\n\nboth score targets met on {len(t['tasks_met'])} of {len(r['scores'])} tasks "
                f"({', '.join(t['tasks_met']) or 'none'}; needed {t['needed']}): {verdict(t['met'])}")
    st = r["step"]
    if "skipped" in st:
        return out + f"\n\nLoRA step vs PEFT: skipped ({st['skipped']})"
    la = st["load_average"]["before"][:1] + st["load_average"]["after"][:1]
    out += "\n\n" + markdown_table(
        ("LoRA tuning step", "tokens/s ours / PEFT / floor", "ratio", "target", "met", "ours / floor (time)",
         "target", "met", "MFU ours / floor (fp32 peak)", "trainable ours / PEFT", "load"),
        [(f"tiny, {STEP_BATCH}x{STEP_SEQ}, r {LORA['r']}, PEFT {st['peft']}",
          f"{st['ours_tokens_per_s']:,.0f} / {st['peft_tokens_per_s']:,.0f} / {st['floor_tokens_per_s']:,.0f}",
          f"{st['ratio']:.2f}x", f">= {STEP_RATIO}x", verdict(st["meets_target"]), f"{st['ours_vs_floor']:.2f}x",
          f"<= {FLOOR_RATIO}x", verdict(st["meets_floor_target"]), f"{st['ours_mfu']:.1%} / {st['floor_mfu']:.1%}",
          f"{st['trainable_params']['ours']:,} / {st['trainable_params']['peft']:,}", " -> ".join(map(str, la)))])
    return out


def arguments(ap) -> None:
    ap.add_argument("--parent", help="a pretrained model folder (or a run folder holding model/) to tune from")
    ap.add_argument("--tasks", help="comma list of tasks to score (default: every demo task)")
    ap.add_argument("--part", choices=("all", "scores", "speed"), default="all", help="run only one part")
    ap.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    ap.add_argument("--profile", action="store_true",
                    help="profile our LoRA step and the floor (a full run does when a step target is missed)")
    ap.add_argument("--lr-grid", help="override the lr grids, e.g. lora=3e-4:1e-3,full=1e-3:3e-3")


if __name__ == "__main__":
    sys.exit(run_benchmark("tune", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="a short base, 1 epoch on 64 examples per task, 3 timing rounds (a smoke run)"))
