"""Distillation, the recipe method `distill`: recovery training of a pruned student from its parent (on the parent's
train split), as BMCook configures it. `qat: true` distills with fake-int8 weights (quantization-aware), for a
`quantize` that follows.

loss = ce_weight * LM loss on the corpus targets
     + kl_weight * T^2 * KL(teacher_T || student_T) on the same target positions  (BMCook `ce_scale`, `ce_temp`)
     + hidden_weight * MSE of every layer slot's output, student vs teacher, on valid positions  (`mse_hidn`)
Layer slots line up because pruning masks sub-blocks in place (mask_modules) rather than renumbering layers.
Resumable like pretraining, with the same helper (cpmant.training.state): step-N checkpoints with optimizer, scheduler
and RNG; `resume="auto"` continues from the newest intact one. `precision` (resolved: fp32 / bf16) autocasts the
student's and the teacher's forward passes; the three loss terms are computed in fp32, weights stay fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from ... import checkpoint as ckpt
from ...config import ModelConfig
from ...model import CPMAnt
from ...modules.quant import disable_qat, enable_qat
from ...precision import autocast
from ...training.data import IGNORE, PretrainStream
from ...training.schedule import cosine
from ...training.state import restore_state, save_state, seed_everything
from .base import ROW_LENGTH, MethodConfig, MethodContext, register_method


class DistillConfig(MethodConfig):
    name: Literal["distill"] = "distill"
    steps: int = Field(200, ge=0, description="recovery-training steps (0 = none)")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (cosine after a short warmup)")
    warmup_steps: int = Field(20, ge=0, description="linear warmup")
    temperature: float = Field(2.0, gt=0, description="logit KL temperature (BMCook's `ce_temp`)")
    kl_weight: float = Field(1.0, ge=0, description="weight of the logit KL term")
    ce_weight: float = Field(1.0, ge=0, description="weight of the plain LM loss on the corpus")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the hidden-state MSE (BMCook's `mse_hidn`)")
    micro_batch_size: int = Field(16, ge=1, description="rows per step")
    seq_len: int = Field(ROW_LENGTH, ge=16, description="row length of the training rows")
    save_interval: int = Field(100, ge=1, description="steps between resumable checkpoints")
    seed: int = Field(0, description="student init order and dropout")
    qat: bool = Field(False, description="quantization-aware: fake-int8 weights while distilling (needs a later "
                                         "quantize)")

    def check_order(self, names: list[str], index: int) -> str | None:
        if self.qat and "quantize" not in names[index + 1:]:
            return "distill.qat needs a quantize method after distill"
        return None

    def summary(self) -> str:
        return ""

    def row_length(self) -> int | None:
        return self.seq_len


@register_method("distill", DistillConfig,
                 description="recovery training from the parent (logit KL, hidden MSE, LM loss)",
                 overrides={"distill_steps": "steps", "distill_batch_size": "micro_batch_size"})
def apply(ctx: MethodContext, cfg: DistillConfig):
    student = ctx.student
    if cfg.steps == 0:
        return student
    if cfg.qat:
        enable_qat(student)  # fake-int8 weights (straight-through) while distilling
    r = distill(student, ctx.teacher, ctx.train_stream, cfg, ctx.work_dir / "checkpoints", ctx.vocab_path,
                meta=ctx.identity, callbacks=ctx.callbacks, progress=ctx.progress, precision=ctx.precision)
    if cfg.qat:
        disable_qat(student)
    ctx.report["distill"] = asdict(r) | {"losses": None}
    ctx.step += r.steps
    return student


# ---- the algorithm -------------------------------------------------------------------------------------------------
@dataclass
class DistillReport:
    steps: int
    resumed_from: int
    first_loss: float
    final_loss: float
    seconds: float
    losses: list[float]


def distill_loss(student: CPMAnt, teacher: CPMAnt, batch, cfg: DistillConfig,
                 precision: str = "fp32") -> tuple[torch.Tensor, dict]:
    inputs = batch.model_inputs()
    sel = batch.target != IGNORE  # (B, L) predicted positions; logits only there
    device = next(student.parameters()).device
    with autocast(precision, device):
        with torch.no_grad():
            t_logits, t_hidden = teacher(**inputs, return_hidden=True, logits_at=sel)  # (N, V)
        s_logits, s_hidden = student(**inputs, return_hidden=True, logits_at=sel)
    if precision != "fp32":  # the loss terms in fp32
        t_logits, s_logits = t_logits.float(), s_logits.float()
        t_hidden, s_hidden = [h.float() for h in t_hidden], [h.float() for h in s_hidden]
    ce = F.cross_entropy(s_logits, batch.target[sel])
    T = cfg.temperature
    kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                  reduction="batchmean") * T * T
    L = inputs["input"].size(1)
    valid = (torch.arange(L)[None, :] < inputs["length"][:, None]).unsqueeze(-1).float()  # (B, L, 1)
    denom = valid.sum() * s_hidden[0].size(-1)
    mse = sum(((s - t) ** 2 * valid).sum() / denom for s, t in zip(s_hidden, t_hidden)) / len(s_hidden)
    loss = cfg.ce_weight * ce + cfg.kl_weight * kl + cfg.hidden_weight * mse
    return loss, {"ce": ce.item(), "kl": kl.item(), "hidden_mse": mse.item()}


def distill(student: CPMAnt, teacher: CPMAnt, stream: PretrainStream, cfg: DistillConfig, ckpt_root: Path,
            vocab_path: Path, meta: dict | None = None, callbacks=None, progress: bool = True,
            resume: str = "auto", precision: str = "fp32") -> DistillReport:
    """Train `student` (in place) towards `teacher` for cfg.steps steps; checkpoints under ckpt_root.

    Resumes (resume="auto") from the newest intact step folder whose student has the same config and whose metadata
    matches `meta` (the caller's identity of this student: recipe, parent, data, code); dropout is seeded from
    (cfg.seed, step), so a resumed run draws the masks an uninterrupted one would."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(max(cfg.warmup_steps, 1), max(cfg.steps, 1), 0.1))
    start = 0
    losses: list[float] = []
    latest = ckpt.latest_intact_checkpoint(ckpt_root)[0] if resume == "auto" else None
    if latest is not None:
        saved_cfg, saved_meta = ModelConfig.load(latest / ckpt.CONFIG_FILE), ckpt.read_meta(latest)
        # resume only the same student: same shape, and the same identity when the caller names one
        if saved_cfg == student.config and all(saved_meta.get(k) == v for k, v in (meta or {}).items()):
            st = restore_state(latest, student, opt, sched)
            start, losses = int(st["step"]), list(st.get("losses", []))
    B = cfg.micro_batch_size
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"distill {precision}", unit="step", disable=not progress,
               dynamic_ncols=True)
    for step in range(start, cfg.steps):
        seed_everything(cfg.seed, step)  # dropout masks depend on the step only (exact resume)
        batch = stream.batch(range(step * B, (step + 1) * B))
        loss, parts = distill_loss(student, teacher, batch, cfg, precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callbacks:
            callbacks.on_step(step + 1, {"distill_loss": losses[-1], **{f"distill_{k}": v for k, v in parts.items()}})
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if (step + 1) % cfg.save_interval == 0 or step + 1 == cfg.steps:
            save_state(ckpt_root, step + 1, student, student.config, vocab_path, opt, sched,
                       extra={"losses": losses}, meta=meta, keep_last=1)
    bar.close()
    student.eval()
    return DistillReport(cfg.steps, start, losses[0] if losses else math.nan, losses[-1] if losses else math.nan,
                         time.perf_counter() - t0, losses)
