"""The validation stage's config (`validation:` in a LifecycleConfig): what is measured and the promotion gates.

A gate is MLflow's `MetricThreshold` (mlflow.models.MetricThreshold) per metric, against three references:

- `threshold`: the candidate's own value (>= threshold when greater is better, else <=);
- `parent` and `champion`: a comparison with the candidate's parent (`cpmant.parent`) and with the current
  `champion` of the same registered name. `min_absolute_change` / `min_relative_change` are MLflow's: the candidate
  must *improve* on that reference by at least that much. `max_relative_regression` is a tolerance MLflow's
  MetricThreshold cannot state (its changes must be positive improvements): the candidate may be at most this
  fraction worse than the reference (perplexity at most 0.1 = 10 % above the champion's). It becomes an MLflow value
  threshold computed from the reference (reference * (1 + x) when lower is better, reference * (1 - x) otherwise).

A comparison with a reference that does not exist (a base model has no parent; the first version has no champion)
is skipped and reported as such; every other gate must pass for `champion` to move.

Two kinds of gate need measurements of a reference made in the same validation run (never a figure recorded under
another load, or on other examples):

- timings (`TIMED_METRICS`: tokens/s, first-token latency) compare with the champion measured beside the candidate,
  alternating; a timing gate has no `parent` comparison;
- a delta's task gates (`INTERVAL_GATES`) are paired differences over the same test examples with a 95% bootstrap
  interval: `task_vs_zero_shot` (the delta minus its base scored zero-shot) must lie above `threshold` (`interval:
  above`: the interval's lower bound > threshold), `task_vs_champion` (the delta minus the current champion of its
  name) must not lie below it (`interval: not_below`: the upper bound >= threshold, i.e. not significantly worse).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..configio import FrozenModel

STAGES = ("pretrain", "compress", "delta")  # the kinds of model a gate may apply to (a version's cpmant.stage)

# the metrics the suite measures, and which way is better (a gate on any other metric must say greater_is_better)
METRICS_GREATER_IS_BETTER = {
    "perplexity": False, "lm_loss": False, "tokens_per_second": True, "peak_memory_mb": False,
    "first_token_ms_p50": False, "first_token_ms_p95": False, "smoke_pass_rate": True, "unk_rate": False,
    "loop_rate": False, "empty_rate": False, "task_score": True, "task_vs_zero_shot": True, "task_vs_champion": True,
}
# timings: compared only with the champion measured in the same run (logged as champion_<metric>)
TIMED_METRICS = ("tokens_per_second", "first_token_ms_p50", "first_token_ms_p95")
# paired task differences of a delta (logged with _ci_low / _ci_high) -> the reference they are taken against
INTERVAL_GATES = {"task_vs_zero_shot": "zero_shot", "task_vs_champion": "champion"}

DEFAULT_PROMPTS = ("床前明月光", "春眠不觉晓", "白日依山尽", "学而时习之", "海内存知己", "千山鸟飞绝",
                   "天下大势", "人生得意须尽欢")


class Comparison(FrozenModel):
    """One reference (the parent, or the champion) of a gate."""

    min_absolute_change: float | None = Field(None, gt=0, description="MLflow: improve on the reference by at least "
                                                                      "this much")
    min_relative_change: float | None = Field(None, ge=0, le=1, description="MLflow: improve on the reference by at "
                                                                            "least this fraction of it")
    max_relative_regression: float | None = Field(None, ge=0, description="be at most this fraction worse than the "
                                                                          "reference (0 = no worse)")

    @model_validator(mode="after")
    def _something(self):
        if all(v is None for v in (self.min_absolute_change, self.min_relative_change, self.max_relative_regression)):
            raise ValueError("a comparison needs min_absolute_change, min_relative_change or max_relative_regression")
        return self


class Gate(FrozenModel):
    """A metric's promotion gate (see the module docstring)."""

    enabled: bool = Field(True, description="false: the gate is not checked (`gates.NAME: null` sets it)")
    greater_is_better: bool | None = Field(None, description="None: the metric's known direction")
    threshold: float | None = Field(None, description="absolute limit on the candidate's value")
    parent: Comparison | None = Field(None, description="comparison with the parent version")
    champion: Comparison | None = Field(None, description="comparison with the current champion of the same name")
    stages: tuple[str, ...] = Field(STAGES, description="the kinds of model it applies to (a version's cpmant.stage)")
    interval: Literal["above", "not_below"] | None = Field(
        None, description="a paired difference with an interval: `above` = its lower bound > threshold (significantly "
                          "better), `not_below` = its upper bound >= threshold (not significantly worse)")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v):
        bad = [s for s in v if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; use {', '.join(STAGES)}")
        return tuple(v)

    @model_validator(mode="after")
    def _something(self):
        if self.threshold is None and self.parent is None and self.champion is None:
            raise ValueError("a gate needs threshold, parent or champion")
        if self.interval is not None and (self.threshold is None or self.parent or self.champion):
            raise ValueError("an interval gate compares its interval with `threshold` only (e.g. threshold: 0)")
        return self


def _default_gates() -> dict[str, Gate]:
    return {
        # held-out quality: a compressed variant may lose some (a pruned tiny model loses a lot), a new version of a
        # name little; a delta is judged on its task instead
        "perplexity": Gate(parent=Comparison(max_relative_regression=3.0),
                           champion=Comparison(max_relative_regression=0.1), stages=("pretrain", "compress")),
        "smoke_pass_rate": Gate(threshold=0.5),  # at least half the prompts: non-empty, UTF-8, no <unk>, no loop
        "unk_rate": Gate(threshold=0.0),  # generation bans <unk>: any is a bug
        # speed and latency: generous (timings on a shared machine are noisy), against the champion measured in the
        # same run only
        "tokens_per_second": Gate(champion=Comparison(max_relative_regression=0.5)),
        "first_token_ms_p95": Gate(champion=Comparison(max_relative_regression=1.0)),
        # a delta: significantly better than its base zero-shot, not significantly worse than the champion
        "task_vs_zero_shot": Gate(threshold=0.0, interval="above", stages=("delta",)),
        "task_vs_champion": Gate(threshold=0.0, interval="not_below", stages=("delta",)),
    }


class ValidateConfig(FrozenModel):
    promote: bool = Field(True, description="move `champion` to a candidate whose every gate passes")
    batch_size: int = Field(8, ge=1, description="examples per forward pass of a delta's task evaluation (the "
                                                 "held-out perplexity uses its lineage's spec, cpmant/heldout.py)")
    prompts: tuple[str, ...] = Field(DEFAULT_PROMPTS, min_length=1, description="smoke-generation prompts")
    max_new_tokens: int = Field(24, ge=1, description="new tokens per smoke generation (and the speed measure)")
    generation: dict = Field(default_factory=dict, description="GenerationConfig overrides for the smoke runs")
    speed_repeats: int = Field(1, ge=1, description="timed batched generations (after one warm-up) for tokens/s; "
                                                    "with a champion, rounds of candidate then champion")
    latency_repeats: int = Field(1, ge=1, description="first-token timings per prompt (p50/p95 over all); with a "
                                                      "champion, rounds of candidate then champion")
    loop_ngram: int = Field(4, ge=1, description="longest n-gram (in tokens) the loop check looks for")
    loop_repeats: int = Field(3, ge=1, description="a generation loops when an n-gram repeats back to back more "
                                                   "than this many times")
    task_examples: int | None = Field(None, ge=1, description="test examples of a delta's task (None = all: the "
                                      "same examples, so the same score, as its tuning run's test_<metric>)")
    task_data: str | None = Field(None, description="a delta's task data folder (None: the folder its tuning run "
                                                    "used, else $CUGE_DATA/<task>; demo tasks: the default corpus)")
    gates: dict[str, Gate] = Field(default_factory=_default_gates, description="metric -> promotion gate")

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data):
        """eval_rows / seq_len chose the held-out rows before the one held-out measure (cpmant/heldout.py)."""
        old = [k for k in ("eval_rows", "seq_len") if isinstance(data, dict) and k in data]
        if old:
            raise ValueError(f"validation.{', validation.'.join(old)}: removed; perplexity is the lineage's held-out "
                             "measure (cpmant/heldout.py), on the rows its pretraining recorded (pretrain.eval_rows, "
                             "pretrain.seq_len, pretrain.micro_batch_size): remove them")
        return data

    @model_validator(mode="before")
    @classmethod
    def _merge_gates(cls, data):
        """Given gates are merged over the default ones (`gates.perplexity.threshold: 500` keeps the perplexity
        gate's parent and champion comparisons and every other gate); a gate set to null is turned off."""
        if isinstance(data, dict) and isinstance(data.get("gates"), dict):
            from ..configio import deep_merge

            merged = {k: g.model_dump(mode="json", exclude_none=True) for k, g in _default_gates().items()}
            for k, v in data["gates"].items():
                if v is None:  # off; kept (disabled) so that the saved config says so
                    if k in merged:
                        merged[k] = {**merged[k], "enabled": False}
                elif isinstance(v, dict) and isinstance(merged.get(k), dict):
                    merged[k] = deep_merge(merged[k], v)
                else:
                    merged[k] = v
            data = {**data, "gates": merged}
        return data

    @field_validator("gates")
    @classmethod
    def _directions(cls, v):
        unknown = [m for m, g in v.items() if g.greater_is_better is None and m not in METRICS_GREATER_IS_BETTER
                   and not m.startswith("eval_")]
        if unknown:
            raise ValueError(f"gate(s) {unknown} on metrics of unknown direction: set greater_is_better")
        timed = [m for m, g in v.items() if g.enabled and m in TIMED_METRICS and g.parent is not None]
        if timed:
            raise ValueError(f"gate(s) {timed} compare timings with the parent: timings compare only with the "
                             "champion measured beside the candidate (use `champion:` or `threshold:`)")
        return v

    def direction(self, metric: str) -> bool:
        """greater_is_better of a gated metric (task metrics `eval_*` are greater-is-better unless said)."""
        g = self.gates.get(metric)
        if g is not None and g.greater_is_better is not None:
            return g.greater_is_better
        return METRICS_GREATER_IS_BETTER.get(metric, True)

    def measurement(self) -> dict:
        """The settings that decide the measured numbers (not the gates, not `promote`): a recorded validation with
        the same measurement settings is a valid reference for a parent or a champion."""
        return self.model_dump(mode="json", exclude={"promote", "gates"})
