"""The pretraining config: one frozen schema; YAML files are saved instances of it."""

from __future__ import annotations

import typing
from typing import Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from ..configio import FrozenModel
from ..precision import Precision


class PretrainConfig(FrozenModel):
    preset: str = Field("tiny", description="model preset (cpmant.config.PRESETS)")
    model_overrides: dict = Field(default_factory=dict, description="ModelConfig fields that replace the preset's")
    corpus: str | None = Field(None, description="folder of .txt/.jsonl files; None = Debian fortunes-zh")
    valid_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of documents held out")
    vocab_size: int | None = Field(None, description="vocab to build from the corpus; None = the preset's")
    seq_len: int = Field(128, ge=16, description="row length in positions, prompt included")
    min_piece_tokens: int = Field(8, ge=2, description="pieces shorter than this are dropped (CPM-Ant: 32)")
    max_piece_tokens: int = Field(990, ge=4, description="longest piece <s>..</s> (CPM-Ant: 990)")
    lm_share: float = Field(0.5, ge=0, le=1, description="share of pieces with the left-to-right LM objective")
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
    precision: Precision = Field(
        "auto", description="matmul precision: auto = bf16 autocast where the device multiplies bf16 natively "
                            "(AVX-512 BF16/AMX, CUDA 8.0+), else fp32; weights, optimizer, checkpoints stay fp32")
    seed: int = Field(0, description="seeds model init, data order and objectives")
    eval_interval: int = Field(100, ge=1, description="steps between validation passes")
    eval_rows: int = Field(64, ge=1, description="held-out rows per evaluation; recorded as the lineage's held-out "
                                                 "measure (cpmant/heldout.py), which later stages reuse")
    save_interval: int = Field(100, ge=1, description="steps between checkpoints")
    keep_last: int = Field(2, ge=1, description="newest checkpoints kept")
    keep_every: int = Field(0, ge=0, description="also keep every step that is a multiple of this (0 = off)")
    resume: str = Field("auto", description="auto (continue the run folder's newest intact checkpoint), never, or a "
                        "step folder")
    allow_changed_settings: bool = Field(False, description="resume a checkpoint trained with other settings (the "
                                         "new lr/schedule apply from the resumed step on)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu")
    nproc: int = Field(1, ge=1, description="processes (torchrun; gloo on CPU, NCCL on CUDA)")
    # several machines (torchrun multi-node): the same config on every node, each with its own node_rank
    nnodes: int = Field(1, ge=1, description="nodes (torchrun --nnodes); more than 1 needs rdzv_endpoint")
    node_rank: int = Field(0, ge=0, description="this node's rank (torchrun --node-rank)")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of the c10d rendezvous on node 0")
    rdzv_id: str | None = Field(None, description="rendezvous id; None = cpmant-<config hash>")
    backend: str = Field("torch", description="training backend (cpmant.backends.backend_names('train'))")
    num_threads: int | None = Field(None, description="torch intra-op threads per process (None = cores/procs)")
    output_dir: str | None = Field(None, description="run folder; None = $CPMANT_HOME/runs/pretrain-<preset>-<key8>")
    encode_workers: int | None = Field(None, description="processes that encode the corpus (None = all cores)")

    @model_validator(mode="before")
    @classmethod
    def _old_bf16(cls, data):
        """A config saved before `precision` existed: `bf16: true` -> bf16, `bf16: false` -> fp32."""
        return upgrade_bf16(data)

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        from ..backends import check_backend_name

        return check_backend_name("train", v)

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        from ..config import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return v

    @field_validator("model_overrides")
    @classmethod
    def _model_overrides(cls, v: dict) -> dict:
        return check_model_overrides(v)

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
        from ..config import get_preset
        from ..errors import CpmantError

        try:  # the overrides must make a valid model of this preset (e.g. mask_modules per layer)
            get_preset(self.preset).replace(**self.model_overrides)
        except CpmantError as e:
            raise ValueError(f"model_overrides: {e.problem}") from None
        return self


_SCALARS = (int, float, bool, str)


def upgrade_bf16(data):
    """A saved config's dict with the old `bf16: bool` replaced by `precision` (bf16 / fp32); other input as is."""
    if isinstance(data, dict) and "bf16" in data:
        data = dict(data)
        old = data.pop("bf16")
        if "precision" not in data:
            data["precision"] = "bf16" if old in (True, "true", "True", 1) else "fp32"
    return data


def check_model_overrides(overrides: dict) -> dict:
    """Keys must be ModelConfig fields and values of their types (no strings for numbers, no bools for ints);
    sizes positive, dropout_p in [0, 1), eps > 0. Raises ValueError listing every problem."""
    from ..config import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    problems = []
    unknown = sorted(set(overrides) - set(hints))
    if unknown:
        problems.append(f"unknown ModelConfig field(s) {unknown}; valid fields: {', '.join(sorted(hints))}")
    for k, v in overrides.items():
        if k not in hints:
            continue
        hint = hints[k]
        strict = all(a in _SCALARS or a is type(None) for a in (typing.get_args(hint) or (hint,)))
        try:
            TypeAdapter(hint).validate_python(v, strict=strict)
        except ValidationError:
            problems.append(f"{k}={v!r} is not of type {getattr(hint, '__name__', hint)}")
            continue
        if hint is int and v < 1:
            problems.append(f"{k}={v} must be at least 1")
        if k == "dropout_p" and not 0 <= v < 1:
            problems.append(f"dropout_p={v} must be in [0, 1)")
        if k == "eps" and not v > 0:
            problems.append(f"eps={v} must be positive")
    if problems:
        raise ValueError("; ".join(problems))
    return overrides
