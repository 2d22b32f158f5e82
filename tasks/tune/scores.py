"""Test scores of the delta-tuning stage as its rows carry them: each metric with its 95% interval, and the
per-example predictions a run stores (`predictions/test.jsonl`) so that comparisons made later pair the same
examples (cpmant.delta.evaluation does the scoring; registry.tune_records the storing)."""

from __future__ import annotations

from cpmant.errors import CpmantError
from registry import tune_records

NO_DELTA = {"trainable_params": 0, "trainable_ratio": 0.0, "delta_bytes": 0, "delta_bytes_ratio": 0.0}  # zero-shot


def log_predictions(scored, examples) -> None:
    """The per-example test predictions on the active run (what paired comparisons read)."""
    from cpmant.delta.evaluation import predictions_jsonl

    tune_records.log_predictions(predictions_jsonl(scored.predictions, examples))


def stored_predictions(run_id: str, examples) -> list | None:
    """A run's stored test predictions, or None when it has none or they are of other examples."""
    from cpmant.delta.evaluation import read_predictions

    text = tune_records.load_predictions(run_id)
    try:
        return None if text is None else read_predictions(text, examples)
    except (CpmantError, ValueError):
        return None


def interval_fields(test: dict, metrics, primary: str) -> dict:
    """{"metrics": {m: value}, "intervals": {m: [low, high]}, "score_ci_low", "score_ci_high"} from a run's
    `test_<m>`, `test_<m>_ci_low`, `test_<m>_ci_high` (test: those names without `test_`)."""
    vals = {m: test[m] for m in metrics if m in test}
    ivs = {m: [test.get(f"{m}_ci_low"), test.get(f"{m}_ci_high")] for m in vals}
    low, high = ivs.get(primary, [None, None])
    return {"metrics": vals, "intervals": ivs, "score_ci_low": low, "score_ci_high": high}


def scored_fields(scored, primary: str) -> dict:
    """The same fields from a fresh score, with its predictions."""
    ivs = {m: [iv.low, iv.high] for m, iv in scored.intervals.items()}
    low, high = ivs.get(primary, [None, None])
    return {"metrics": scored.metrics, "intervals": ivs, "score_ci_low": low, "score_ci_high": high,
            "predictions": scored.predictions}

