"""Distillation as a recipe method: recovery training of the student from its parent on the parent's train split
(the algorithm: cpmant/compress/distill.py). `qat: true` distills with fake-int8 weights (quantization-aware), for a
`quantize` that follows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import MethodConfig, MethodContext, register_method


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
    seq_len: int = Field(128, ge=16, description="row length of the training rows")
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


@register_method("distill", DistillConfig,
                 description="recovery training from the parent (logit KL, hidden MSE, LM loss)",
                 overrides={"distill_steps": "steps", "distill_batch_size": "micro_batch_size"})
def apply(ctx: MethodContext, cfg: DistillConfig):
    from dataclasses import asdict

    from ..distill import distill
    from ..quantize import disable_qat, enable_qat

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

