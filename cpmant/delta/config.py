"""The delta-tuning stage's config (`tune:` in a LifecycleConfig)."""

from __future__ import annotations

from pydantic import Field, PositiveFloat, field_validator

from ..configio import FrozenModel
from ..errors import CpmantError
from ..precision import Precision


class TuneConfig(FrozenModel):
    """How deltas are tuned. Every method (LoRA ... full) trains the same way: AdamW over its trainable parameters,
    linear warmup then cosine decay (`cpmant.training.schedule.cosine`: CPM-Live's Noam shape, warmup then decay,
    but peaking at `lr` itself where Noam peaks at lr / sqrt(warmup)), weight decay 0.01 and gradient clip 10 as
    CPM-Live tunes; epoch 0 (the untuned start) is scored on the valid split and kept when no epoch beats it."""

    tasks: list[str] = Field(["demo-ccpm", "demo-c3", "demo-lcsts", "demo-math23k"],
                             description="CUGE or demo task names: a list, or a comma list in YAML and flags")
    methods: list[str] = Field(["lora", "full"], description="delta methods: a list or a comma list (`full` = full "
                                                              "fine-tuning, the baseline every delta is compared with)")
    data: str | None = Field(None, description="folder of a CUGE task's raw files (None: $CUGE_DATA/<task>)")
    epochs: int = Field(3, ge=1, description="passes over the training examples (at most; early stop may end sooner)")
    batch_size: int = Field(8, ge=1, description="training examples per optimizer step")
    eval_batch_size: int = Field(16, ge=1, description="examples per batch when evaluating")
    lr: dict[str, PositiveFloat] = Field(default_factory=dict,
                                 description="peak learning rate per method, e.g. {lora: 1e-3, full: 3e-3}; a method "
                                             "not named uses its registered default (cpmant.delta.methods)")
    sweep_lr: bool = Field(False, description="choose each method's lr on the valid split from its lr grid "
                                              "(`cpmant tune --sweep-lr`): one tuning run per grid value")
    lr_grid: dict[str, list[PositiveFloat]] = Field(
        default_factory=dict, description="lrs tried by sweep_lr per method (at most 3), e.g. {full: [1e-3, 3e-3]}; "
                                          "a method not named uses its registered grid")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0,
                                description="schedule: the first warmup_ratio of the planned steps (epochs x steps "
                                            "per epoch) raise the lr linearly from lr/warmup to lr; then it decays "
                                            "along a cosine to min_lr_ratio x lr one step after the last planned one")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="the schedule's final lr as a fraction of lr")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW (decoupled) weight decay, CPM-Live's 0.01")
    grad_clip: float = Field(10.0, ge=0.0, description="gradient-norm clip, CPM-Live's tuning value 10 (0: none)")
    method_params: dict[str, dict] = Field(default_factory=dict,
                                           description="params per method, e.g. {lora: {r: 4}} (defaults: CPM-Ant's)")
    patience: int = Field(2, ge=0, description="epochs without a better primary metric before stopping (0: never)")
    seed: int = Field(1234, description="seeds the delta's init, the example order and dropout")
    max_train_examples: int | None = Field(None, ge=1, description="use at most this many training examples")
    max_eval_examples: int | None = Field(None, ge=1, description="evaluate on at most this many examples")
    malformed_threshold: float = Field(0.01, ge=0.0, le=1.0,
                                       description="fraction of malformed rows in a task file above which loading "
                                                   "fails (naming the file and line); below it they are counted")
    precision: Precision = Field("auto", description="auto: bf16 where native, else fp32")

    @field_validator("tasks", "methods", mode="before")
    @classmethod
    def _comma_list(cls, v):
        """"a,b" (YAML, flags) or ["a", "b"]: a list of names, blanks dropped."""
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, (list, tuple)):
            return [str(s).strip() for s in v if str(s).strip()]
        return v

    @field_validator("tasks", "methods")
    @classmethod
    def _registered(cls, v: list[str], info) -> list[str]:
        """Each name checked once, here, against its registry (cpmant.cuge tasks, cpmant.delta methods); the
        first of repeats kept. A CpmantError (not a ValueError: pydantic passes it through as it is), so that the CLI
        prints the known names as the fix."""
        if info.field_name == "tasks":
            from ..cuge import task_names as known_names
            what = "task"
        else:
            from .methods import method_names as known_names
            what = "delta method"
        known = known_names()
        bad = [n for n in v if n not in known]
        if bad or not v:
            problem = f"unknown {what} {', '.join(map(repr, bad))}" if bad else f"no {what} given"
            raise CpmantError(f"{problem} (tune.{info.field_name}, --{info.field_name[:-1]})",
                              f"choose from: {', '.join(known)} (a comma list tunes several)")
        return list(dict.fromkeys(v))

    @field_validator("lr_grid")
    @classmethod
    def _small_grid(cls, v: dict) -> dict:
        from .methods import MAX_LR_GRID

        bad = sorted(k for k, g in v.items() if not 1 <= len(g) <= MAX_LR_GRID)
        if bad:
            raise ValueError(f"tune.lr_grid.{bad[0]} has {len(v[bad[0]])} values; give 1 to {MAX_LR_GRID} "
                             "(each value is a whole tuning run)")
        return v

    @field_validator("lr", "lr_grid", "method_params")
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

    def lr_grid_for(self, method: str) -> tuple[float, ...]:
        """The lrs sweep_lr tries for `method`: tune.lr_grid.<method>, else the method's registered grid."""
        from .methods import get_method

        return tuple(float(x) for x in self.lr_grid.get(method, get_method(method).lr_grid))
