"""Test-split scoring that keeps what comparisons need: per-example predictions, the task's metrics and their 95%
bootstrap intervals, and the paired comparisons of two models scored on the same examples.

    scored = score_examples(task, model, tokenizer, examples, cfg, zero_shot=True)
    scored.metrics            # {metric: value}, as task.evaluate gives them
    scored.interval_metrics() # {test_<m>, test_<m>_ci_low, test_<m>_ci_high} for every metric
    compare(task, a_predictions, b_predictions, examples, "vs_zero_shot")  # {vs_zero_shot_<primary>, ..._ci_*}

Predictions are stored as JSON lines (`predictions_jsonl` / `read_predictions`): one line per example, in the
examples' order, with the example's source, so a comparison made later pairs the same examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..errors import CpmantError
from ..precision import autocast
from .config import TuneConfig

PREDICTIONS_ARTIFACT = "predictions/test.jsonl"
TEST_PRECISION = "fp32"  # test scores (the ones users compare) are made as validation makes them


@dataclass
class Scored:
    predictions: list
    metrics: dict[str, float]
    intervals: dict = field(default_factory=dict)  # {metric: cpmant.stats.Interval}

    def interval_metrics(self, prefix: str = "test_") -> dict[str, float]:
        out: dict[str, float] = {}
        for m, iv in self.intervals.items():
            out.update(iv.metrics(f"{prefix}{m}"))
        return out


def eval_examples(examples: list, cfg: TuneConfig | None = None) -> list:
    """The examples a model is scored on: the first cfg.max_eval_examples (all when unset)."""
    cfg = cfg or TuneConfig()
    return list(examples[: cfg.max_eval_examples] if cfg.max_eval_examples else examples)


def predict_examples(task, model, tokenizer, examples: list, cfg: TuneConfig | None = None,
                     zero_shot: bool = False) -> list:
    """Per-example predictions of `model` (as task.predict gives them) in fp32 (TEST_PRECISION, whatever the
    tuning's precision: validation scores a delta the same way, so the two are one measurement); zero_shot
    formats with the base's pretraining prompt."""
    cfg = cfg or TuneConfig()
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(TEST_PRECISION, device):
        return list(task.predict(model, tokenizer, examples, cfg.eval_batch_size, zero_shot=zero_shot))


def score_predictions(task, predictions: list, examples: list, seed: int = 0) -> Scored:
    """The metrics and intervals of predictions already made."""
    metrics = {k: float(v) for k, v in task.score(predictions, examples).items()}
    return Scored(list(predictions), metrics, task.score_intervals(predictions, examples, seed=seed))


def score_examples(task, model, tokenizer, examples: list, cfg: TuneConfig | None = None,
                   zero_shot: bool = False) -> Scored:
    """Predict and score `examples` (cut to cfg.max_eval_examples)."""
    examples = eval_examples(examples, cfg)
    return score_predictions(task, predict_examples(task, model, tokenizer, examples, cfg, zero_shot), examples,
                             seed=(cfg or TuneConfig()).seed)


def compare(task, pred_a: list, pred_b: list, examples: list, name: str, ratio_name: str | None = None,
            seed: int = 0) -> dict[str, float]:
    """Paired comparison of a against b on the task's primary metric: `{name}_<primary>` (a - b, points) with
    `_ci_low/_ci_high`, and with ratio_name also `{ratio_name}_<primary>` (a / b) with its interval."""
    primary = task.primary_metric
    examples = list(examples)[: len(pred_a)]
    if len(pred_a) != len(pred_b):
        raise CpmantError(f"cannot pair {len(pred_a)} predictions with {len(pred_b)}",
                          "score both models on the same test examples (same task data and max_eval_examples)")
    out = task.paired_intervals(pred_a, pred_b, examples, seed=seed)[primary].metrics(f"{name}_{primary}")
    if ratio_name:
        out.update(task.paired_ratio(pred_a, pred_b, examples, seed=seed).metrics(f"{ratio_name}_{primary}"))
    return out


def predictions_jsonl(predictions: list, examples: list) -> str:
    """One JSON line per example: index, source (file:line of the raw row) and prediction."""
    return "".join(json.dumps({"index": i, "source": getattr(ex, "source", ""), "prediction": p},
                              ensure_ascii=False) + "\n" for i, (p, ex) in enumerate(zip(predictions, examples)))


def read_predictions(text: str, examples: list | None = None) -> list:
    """Predictions from `predictions_jsonl` text; with examples, a CpmantError when they are other examples."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if examples is not None:
        sources = [getattr(ex, "source", "") for ex in list(examples)[: len(rows)]]
        if len(rows) > len(examples) or [r.get("source", "") for r in rows] != sources:
            raise CpmantError("stored predictions are of other test examples than the task's",
                              "rescore the model (the task's data changed since; pass force=True)")
    return [r["prediction"] for r in rows]
