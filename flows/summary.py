"""The rows of the summary a stage flow returns: one per model it made or reused."""

from __future__ import annotations


def summary_row(stage: str, model_uri: str, metric: str, value: float | None, seconds: float, reused: bool,
                note: str = "", reason: str = "") -> dict:
    """stage, model URI, key metric (name and value), wall time, whether an existing version was reused and why
    (`reason`: the line `tasks.reuse.decide` printed, e.g. "pretrain: reused models:/cpm-ant-tiny/3: same key ...")."""
    return {"stage": stage, "model": model_uri, "metric": metric, "value": value, "seconds": round(seconds, 1),
            "reused": bool(reused), "note": note, "reason": reason}
