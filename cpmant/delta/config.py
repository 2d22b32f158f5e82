"""The delta-tuning stage's config (`tune:` in a LifecycleConfig)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, field_validator

from ..configio import FrozenModel


class TuneConfig(FrozenModel):
    tasks: str = Field("demo-ccpm,demo-c3,demo-lcsts,demo-math23k", description="CUGE or demo task names, comma list")
    methods: str = Field("lora,full", description="delta methods, comma list (`full` = full fine-tuning, the "
                                                   "baseline every delta is compared with)")
    data: str | None = Field(None, description="folder of a CUGE task's raw files (None: $CUGE_DATA/<task>)")
    epochs: int = Field(3, ge=1, description="passes over the training examples (at most; early stop may end sooner)")
    batch_size: int = Field(8, ge=1, description="training examples per optimizer step")
    eval_batch_size: int = Field(16, ge=1, description="examples per batch when evaluating")
    lr: dict[str, PositiveFloat] = Field(default_factory=dict,
                                 description="learning rate per method, e.g. {lora: 1e-3, full: 1e-4}; a method not "
                                             "named uses its registered default (lora 1e-3, full 1e-4, ...)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, ge=0.0, description="gradient-norm clip (0: none)")
    method_params: dict[str, dict] = Field(default_factory=dict,
                                           description="params per method, e.g. {lora: {r: 4}} (defaults: CPM-Ant's)")
    patience: int = Field(2, ge=0, description="epochs without a better primary metric before stopping (0: never)")
    seed: int = Field(1234, description="seeds the delta's init, the example order and dropout")
    max_train_examples: int | None = Field(None, ge=1, description="use at most this many training examples")
    max_eval_examples: int | None = Field(None, ge=1, description="evaluate on at most this many examples")
    malformed_threshold: float = Field(0.01, ge=0.0, le=1.0,
                                       description="fraction of malformed rows in a task file above which loading "
                                                   "fails (naming the file and line); below it they are counted")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 where native, else fp32")

    @field_validator("lr", "method_params")
    @classmethod
    def _known_methods(cls, v: dict) -> dict:
        from .methods import method_names

        bad = sorted(k for k in v if k not in method_names())
        if bad:
            raise ValueError(f"unknown delta method {', '.join(map(repr, bad))}; "
                             f"choose from: {', '.join(method_names())}")
        return v

    def lr_for(self, method: str) -> float:
        from .methods import get_method

        return float(self.lr.get(method, get_method(method).default_lr))
