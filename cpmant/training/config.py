"""The pretraining config: one frozen schema; YAML files are saved instances of it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..configio import FrozenModel


class PretrainConfig(FrozenModel):
    preset: str = Field("tiny", description="model preset (cpmant.config.PRESETS)")
    model_overrides: dict = Field(default_factory=dict, description="ModelConfig fields that replace the preset's")
    corpus: str | None = Field(None, description="folder of .txt/.jsonl files; None = Debian fortunes-zh")
    valid_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of documents held out")
    vocab_size: int | None = Field(None, description="vocab to build from the corpus; None = the preset's")
    seq_len: int = Field(128, ge=16, description="row length in positions, prompt included")
    min_piece_tokens: int = Field(8, ge=2, description="pieces shorter than this are dropped (CPM-Ant: 32)")
    max_piece_tokens: int = Field(990, ge=4, description="longest piece <s>..</s> (CPM-Ant: 990)")
    lm_share: float = Field(0.5, ge=0, le=1, description="share of rows with the left-to-right LM objective")
    mask_ratio_min: float = Field(0.15, gt=0, le=1, description="mask-and-predict: least share of tokens predicted")
    mask_ratio_max: float = Field(0.5, gt=0, le=1, description="mask-and-predict: most share of tokens predicted")
    micro_batch_size: int = Field(16, ge=1, description="rows per forward pass per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step per process")
    max_steps: int = Field(400, ge=1, description="optimizer steps")
    schedule: Literal["noam", "cosine"] = Field("noam", description="Noam as CPM-Ant (lr/sqrt(step)) or cosine")
    lr: float = Field(0.1, gt=0, description="noam: start lr (peak = lr/sqrt(warmup)); cosine: peak lr")
    warmup_steps: int = Field(40, ge=1, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a share of the peak")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (CPM-Ant: 0.01)")
    clip_grad: float = Field(1.0, gt=0, description="gradient norm clip (CPM-Ant: 1.0)")
    bf16: bool = Field(False, description="bf16 autocast for the forward pass")
    seed: int = Field(0, description="seeds model init, data order and objectives")
    eval_interval: int = Field(100, ge=1, description="steps between validation passes")
    eval_rows: int = Field(64, ge=1, description="validation rows per pass")
    save_interval: int = Field(100, ge=1, description="steps between checkpoints")
    keep_last: int = Field(2, ge=1, description="newest checkpoints kept")
    keep_every: int = Field(0, ge=0, description="also keep every step that is a multiple of this (0 = off)")
    resume: str = Field("auto", description="auto (continue the latest complete checkpoint), never, or a step folder")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu")
    nproc: int = Field(1, ge=1, description="processes (torchrun; gloo on CPU, NCCL on CUDA)")
    backend: Literal["torch", "bmtrain"] = Field("torch", description="training backend")
    num_threads: int | None = Field(None, description="torch intra-op threads per process (None = cores/procs)")
    output_dir: str | None = Field(None, description="run folder; None = $CPMANT_HOME/runs/pretrain-<preset>")
    encode_workers: int | None = Field(None, description="processes that encode the corpus (None = all cores)")

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        from ..config import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return v

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str) -> str:
        if v not in ("auto", "never") and not v.strip():
            raise ValueError("resume must be auto, never, or a checkpoint folder")
        return v

    @model_validator(mode="after")
    def _ranges(self):
        if self.mask_ratio_min > self.mask_ratio_max:
            raise ValueError("mask_ratio_min must not exceed mask_ratio_max")
        return self
