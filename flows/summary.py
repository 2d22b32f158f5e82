"""The rows of the summary a stage flow returns: one per model it made or reused."""

from __future__ import annotations


def summary_row(stage: str, model_uri: str, metric: str, value: float | None, seconds: float, reused: bool,
                note: str = "") -> dict:
    """stage, model URI, key metric (name and value), wall time and whether an existing version was reused."""
    return {"stage": stage, "model": model_uri, "metric": metric, "value": value, "seconds": round(seconds, 1),
            "reused": bool(reused), "note": note}
