"""Compression ablation: each ladder rung distilled from the pruned parent vs the same shape trained from scratch.

Run from the repository root:  .venv/bin/python bench/bench_compress.py [--quick] [--parent DIR]
Writes bench/results/compress.json and prints a table; bench/README.md ("Compression ablation") explains it.

1. A parent is pretrained on the default corpus (fortunes-zh, the `tiny` preset), or a finished one is reused
   (--parent: a model folder, or a pretraining run folder holding model/).
2. For each ladder recipe (7b, 3b, 1b, 300m), on that parent:
   a. distilled: `compress_checkpoint` with the recipe, its distillation shortened to S steps (the platform's own
      path: importance scoring, structured pruning to `recipe.target_shape(parent)`, then S steps of distillation);
   b. scratch: a freshly initialised `CPMAnt` of exactly the student's config (mask_modules, heads, dim_ff), trained
      S steps with the plain LM loss of pretraining (summed token cross entropy / number of targets) on the same
      `PretrainStream` rows as the distillation (rows step*B .. step*B+B-1), with the distillation's optimizer
      (AdamW, betas 0.9/0.95, no weight decay), gradient clipping (1.0) and schedule shape (linear warmup, cosine
      to 0.1 x peak); the peak learning rate is the distillation's and the pretraining's peak (see --scratch-lr),
      and the better of the two counts (a deliberately generous baseline);
   c. both are scored with the pretraining loop's `evaluate` on the same held-out rows: the evaluation half of the
      held-out split that `compress_checkpoint` uses (the other half scores importance), every row of it.

The numbers are losses, not times, so the load of the shared machine changes only how long it takes. Everything is
seeded; a rerun on the same parent gives the same losses up to floating-point summation order.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the environment must be isolated before cpmant modules are used)
    markdown_table, prepare_default_corpus, recording_load, run_benchmark, verdict,
)

LADDER = ("7b", "3b", "1b", "300m")
# parent pretraining steps, distillation (= scratch) steps, rows per step (each can be set: --parent-steps N,
# --steps N, --batch N); --quick is a smoke run
MODES = {
    "full": dict(parent_steps=400, steps=60, batch=16),
    "quick": dict(parent_steps=100, steps=12, batch=16),
}
EVAL_ROWS = 100_000  # more than the evaluation split has: evaluate() scores every row of it
GEN_TOKENS = 4  # compress_checkpoint measures generation speed; not used here, kept short


def noam_peak(cfg) -> float:
    """The peak learning rate of the parent's Noam schedule: lr / sqrt(warmup) (cpmant.training.schedule.noam)."""
    return cfg.lr / math.sqrt(cfg.warmup_steps)


def encoder_params(model) -> int:
    """Parameters of the transformer layers only (no token/prompt/segment embeddings, no position-bias table)."""
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))


# ================================================================================================================
# 1. The parent
# ================================================================================================================
def get_parent(args, mode: dict, threads: int, home: Path) -> tuple[Path, dict]:
    from cpmant import checkpoint as ckpt

    if args.parent:
        p = Path(args.parent).expanduser().resolve()
        if not ckpt.is_complete(p) and ckpt.is_complete(p / "model"):
            p = p / "model"
        meta = ckpt.read_meta(p)  # raises a clear error when it is not a complete model folder
        return p, {"reused": True, "dir": str(p), "stage": meta.get("stage"), "step": meta.get("step"),
                   "preset": meta.get("preset")}

    from cpmant.training.config import PretrainConfig
    from cpmant.training.loop import pretrain

    prepared = prepare_default_corpus()
    steps = mode["parent_steps"]
    cfg = PretrainConfig(preset="tiny", max_steps=steps, eval_interval=steps, save_interval=steps, keep_last=1,
                         num_threads=threads, output_dir=str(home / "runs" / f"bench-parent-{steps}"))
    print(f"1. pretraining the parent: tiny preset, {steps} steps of {cfg.micro_batch_size} x {cfg.seq_len}",
          flush=True)
    t0 = time.perf_counter()
    r = pretrain(cfg, prepared=prepared, progress=False)
    return r.model_dir, {
        "reused": False, "dir": str(r.model_dir), "preset": "tiny", "steps": steps,
        "micro_batch_size": cfg.micro_batch_size, "seq_len": cfg.seq_len, "schedule": cfg.schedule,
        "peak_lr": noam_peak(cfg), "final_train_loss": r.final_loss, "valid_loss_start": r.valid_loss_start,
        "valid_loss_end": r.valid_loss_end, "tokens_seen": r.tokens_seen, "num_parameters": r.num_parameters,
        "seconds": round(time.perf_counter() - t0, 1), "data": r.data,
    }


# ================================================================================================================
# 2. The scratch baseline
# ================================================================================================================
def train_scratch(config, stream, steps: int, batch: int, dcfg, lr: float) -> tuple:
    """A fresh CPMAnt(config) trained `steps` steps with pretraining's LM loss on stream rows step*batch.., with
    the distillation's optimizer, clipping and schedule shape (warmup + cosine to 0.1) at peak `lr`."""
    import torch

    from cpmant.model import CPMAnt
    from cpmant.training.evaluate import loss_sums  # the pretraining loop's summed token CE (fp32 logits)
    from cpmant.training.schedule import cosine

    torch.manual_seed(dcfg.seed)
    model = CPMAnt(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(max(dcfg.warmup_steps, 1), max(steps, 1), 0.1))
    losses = []
    for step in range(steps):
        b = stream.batch(range(step * batch, (step + 1) * batch))
        s, _ = loss_sums(model, b, "fp32")
        loss = s / max(b.num_targets, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval(), losses


# ================================================================================================================
# 3. One rung: distilled vs scratch
# ================================================================================================================
def distill_of(recipe):
    """The recipe's distillation settings."""
    return recipe.method("distill")


def shortened(recipe, steps: int, batch: int):
    """The recipe with its distillation cut to `steps` steps of `batch` rows; the recipe's warmup (20 of 200
    steps) scaled to the shortened run: 10% of the steps. Everything else of the recipe is kept."""
    update = {"steps": steps, "micro_batch_size": batch, "warmup_steps": max(1, steps // 10)}
    return recipe.with_method("distill", **update)


def compression_data(parent_dir: Path):
    """What compress_checkpoint reads: the parent's corpus and vocab, the held-out split halved."""
    from cpmant.compress import pipeline

    return pipeline.load_data(parent_dir, progress=False)


def compression_streams(parent_cfg, data, seq_len: int):
    """The very (train, importance, evaluation) streams compress_checkpoint builds from the parent's config."""
    from cpmant.compress import pipeline

    return pipeline.build_streams(parent_cfg, data, seq_len)


def run_rung(name: str, parent_dir: Path, parent_cfg, data, ccfg, mode: dict, scratch_lrs: dict, out_root: Path):
    from cpmant import checkpoint as ckpt
    from cpmant.compress.pipeline import compress_checkpoint
    from cpmant.compress.recipe import RECIPES

    from cpmant.training.evaluate import evaluate

    steps, batch = mode["steps"], mode["batch"]
    recipe = shortened(RECIPES[name], steps, batch)
    dist = distill_of(recipe)

    t0 = time.perf_counter()
    rep = compress_checkpoint(parent_dir, recipe, ccfg, out_root / name, data=data, progress=False)
    t_distill = time.perf_counter() - t0
    student, _ = ckpt.load_pretrained(out_root / name / "model")

    # the very streams compress_checkpoint trained and evaluated on (it builds them from the parent's config)
    train_s, _, eval_s = compression_streams(parent_cfg, data, dist.seq_len)
    ev_d = evaluate(student, eval_s, EVAL_ROWS, ccfg.batch_size)
    t1 = time.perf_counter()
    scratch = {}
    for tag, lr in scratch_lrs.items():
        model, losses = train_scratch(student.config, train_s, steps, batch, dist, lr)
        ev = evaluate(model, eval_s, EVAL_ROWS, ccfg.batch_size)
        scratch[tag] = {"peak_lr": lr, "lm_loss": ev["valid_loss"], "perplexity": ev["valid_perplexity"],
                        "train_loss_first": losses[0] if losses else None,
                        "train_loss_last": losses[-1] if losses else None,
                        "train_loss_last10_mean": sum(losses[-10:]) / max(len(losses[-10:]), 1),
                        "num_parameters": model.num_parameters(), "config_equal": model.config == student.config}
        del model
    t_scratch = time.perf_counter() - t1
    best_tag = min(scratch, key=lambda k: scratch[k]["lm_loss"])
    d_loss, s_loss = ev_d["valid_loss"], scratch[best_tag]["lm_loss"]
    parent_loss = rep["parent_lm_loss"]
    return {
        "recipe": name,
        "target_shape": recipe.target_shape(parent_cfg),
        "shape": {"attention_layers": rep["attention_layers"], "ffn_layers": rep["ffn_layers"],
                  "num_heads": rep["num_heads"], "dim_ff": rep["dim_ff"]},
        "mask_modules": [list(p) for p in student.config.mask_modules] if student.config.mask_modules else None,
        "params": student.num_parameters(),
        "encoder_params": encoder_params(student),
        "parent_params": rep["parent_params"],
        "steps": steps, "batch": batch, "warmup_steps": dist.warmup_steps, "distill_peak_lr": dist.lr,
        "distilled_loss": d_loss,
        "distilled_loss_from_report": rep["lm_loss"],  # compress_checkpoint's: the held-out measure (its first rows, fp32)
        "scratch_loss": s_loss, "scratch_best_lr": best_tag,
        "scratch": scratch,
        "difference": s_loss - d_loss,  # > 0: distillation is better
        "distillation_wins": d_loss < s_loss,
        "parent_loss": parent_loss,
        "loss_increase": rep["loss_increase"],  # the held-out measure's (parent and rung on the same rows)
        "published_loss_increase": recipe.published_loss_increase,  # CPM-ANT.md's 10B ladder
        "pruned_loss_before_distill": rep.get("prune", {}).get("loss_after"),  # on the importance rows
        "parent_loss_importance_rows": rep.get("prune", {}).get("loss_before"),
        "distill_train_loss_first_last": [rep.get("distill", {}).get("first_loss"),
                                          rep.get("distill", {}).get("final_loss")],
        "eval_rows": min(EVAL_ROWS, len(eval_s)), "eval_tokens": ev_d["valid_tokens"],
        "seconds": {"compress_checkpoint": round(t_distill, 1), "scratch": round(t_scratch, 1),
                    "distill_loop": round(rep.get("distill", {}).get("seconds", float("nan")), 1)},
        "compress_report": rep,
    }


# ================================================================================================================
def arguments(ap) -> None:
    def rungs(text: str) -> list[str]:
        names = [r.strip() for r in text.split(",") if r.strip()]
        bad = [r for r in names if r not in LADDER]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown rung(s) {bad}; choose from {', '.join(LADDER)}")
        return names

    ap.add_argument("--parent", help="reuse this parent (a model folder, or a pretraining run folder with model/)")
    ap.add_argument("--recipes", type=rungs, default=list(LADDER), help="comma list of ladder rungs")
    ap.add_argument("--scratch-lr", default="distill,pretrain",
                    help="peak lrs tried for scratch, comma list of numbers or distill (the distillation's peak) "
                         "and pretrain (the parent's Noam peak); the best on the held-out rows is reported")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine 2-thread OpenMP slows down badly)")


def measure(args, mode: dict, home: Path, report: dict) -> None:
    import torch

    from cpmant import checkpoint as ckpt
    from cpmant.compress.config import CompressConfig
    from cpmant.compress.recipe import RECIPES
    from cpmant.training.config import PretrainConfig

    report["meta"].update(mode, threads=args.threads, recipes=args.recipes)
    torch.set_num_threads(args.threads)
    parent_dir, report["parent"] = get_parent(args, mode, args.threads, home)
    torch.set_num_threads(args.threads)  # pretrain() sets its own count
    parent_model, _ = ckpt.load_pretrained(parent_dir)
    parent_cfg = parent_model.config
    report["parent"].update(config=parent_cfg.to_dict(), params=parent_model.num_parameters(),
                            encoder_params=encoder_params(parent_model))
    del parent_model

    lrs: dict[str, float] = {}
    for item in [s.strip() for s in args.scratch_lr.split(",") if s.strip()]:
        if item == "distill":
            lrs[item] = distill_of(RECIPES["7b"]).lr
        elif item == "pretrain":
            lrs[item] = noam_peak(PretrainConfig())
        else:
            lrs[f"lr={item}"] = float(item)
    ccfg = CompressConfig(gen_tokens=GEN_TOKENS)
    data = compression_data(parent_dir)
    report["meta"]["scratch_peak_lrs"] = lrs
    print(f"2. ladder on the parent ({parent_dir}): {mode['steps']} steps x {mode['batch']} rows per arm, "
          f"scratch peak lr {', '.join(f'{k} {v:.2e}' for k, v in lrs.items())}", flush=True)

    rows = []
    for name in args.recipes:
        with recording_load(load := {}):
            r = run_rung(name, parent_dir, parent_cfg, data, ccfg, mode, lrs, home / "runs" / "bench-compress")
        rows.append({**r, **load})
        print(f"   {name:>4}: distilled {r['distilled_loss']:.3f}  scratch {r['scratch_loss']:.3f} "
              f"({r['scratch_best_lr']})  parent {r['parent_loss']:.3f}  "
              f"[{r['seconds']['compress_checkpoint']:.0f} s + {r['seconds']['scratch']:.0f} s]", flush=True)
    report["rungs"] = rows
    report["parent"]["lm_loss"] = rows[0]["parent_loss"] if rows else None
    report["summary"] = {"distillation_wins_every_rung": all(r["distillation_wins"] for r in rows),
                         "wins": {r["recipe"]: r["distillation_wins"] for r in rows}}


def published(x: dict) -> str:
    p = x.get("published_loss_increase")
    return "" if p is None else f"{100 * p:+.1f}%"


def table(r: dict) -> str:
    header = ("rung", "att/ffn/heads/dim_ff", "params (enc)", "distilled", "scratch", "scratch-dist",
              "distill wins", "vs parent", "published")
    pc = r["parent"]["config"]
    rows = [("parent", f"{pc['num_layers']}/{pc['num_layers']}/{pc['num_heads']}/{pc['dim_ff']}",
             f"{r['parent']['params']:,} ({r['parent']['encoder_params']:,})",
             f"{r['parent']['lm_loss']:.3f}" if r["parent"]["lm_loss"] is not None else "", "", "", "", "", "")]
    for x in r["rungs"]:
        s = x["shape"]
        rows.append((x["recipe"], f"{s['attention_layers']}/{s['ffn_layers']}/{s['num_heads']}/{s['dim_ff']}",
                     f"{x['params']:,} ({x['encoder_params']:,})", f"{x['distilled_loss']:.3f}",
                     f"{x['scratch_loss']:.3f}", f"{x['difference']:+.3f}", verdict(x["distillation_wins"]),
                     f"{100 * x['loss_increase']:+.1f}%", published(x)))
    return markdown_table(header, rows)


if __name__ == "__main__":
    sys.exit(run_benchmark("compress", __doc__, MODES, measure, table, arguments=arguments,
                           quick_help="a short parent and distillation (a smoke run)"))
