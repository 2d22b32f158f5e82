"""The delta-tuning stage as a Prefect flow."""

from __future__ import annotations

from prefect import flow

from tasks.tune import comparison_table, tune_delta, zero_shot

from .config import LifecycleConfig, forced
from .summary import summary_row

__all__ = ["tune_flow"]


def _config(config: dict | None, tasks: list[str] | None, methods: list[str] | None) -> LifecycleConfig:
    """The flow's config, with `tasks` / `methods` (when given) in its tune section: validated once, here."""
    config = dict(config or {})
    picked = {k: v for k, v in (("tasks", tasks), ("methods", methods)) if v}
    if picked:
        config["tune"] = {**(config.get("tune") or {}), **picked}
    return LifecycleConfig.model_validate(config)


def _delta_note(row: dict, zero: dict) -> str:
    note = f"{row.get('trainable_ratio') or 0:.2%} trainable"
    return note + (f", zero-shot {zero['score']:.4g}" if zero.get("score") is not None else "")


@flow(name="tune", log_prints=True)
def tune_flow(model_uri: str, tasks: list[str] | None = None, methods: list[str] | None = None,
              config: dict | None = None, force: bool | list[str] = False) -> dict:
    """Tune deltas of a registered model on CUGE or demo tasks.

    Steps, per task (`tasks` or the config's tune.tasks; `methods` or tune.methods):
      1. zeroshot-<task>: the base's score without tuning (one run per reuse key: base version, task data,
         scoring settings and code; reused)
      2. tune-<task>-<method>, once per method: tune, score, register `<model>-<task>-<method>` (the delta only,
         naming its base; alias `candidate`), or the version recorded with the same reuse key unless `force`
      3. compare-<task>: zero-shot, each method and full side by side (MLflow table and plot, Prefect artifact)
    Returns {"deltas": [URI, ...], "tables": {task: rows}, "summary": [summary rows, each with its reuse reason]}.
    """
    cfg = _config(config, tasks, methods)  # unknown names fail here, before any run starts
    again = forced(force, "tune")
    deltas, tables, summary = [], {}, []
    for t in cfg.tune.tasks:
        # return_state: a reused result comes back as a state named Reused (tasks.reuse.reused_state), a new one as
        # Completed; .result() is the row either way
        zero = zero_shot(cfg.tune, cfg.tracking, model_uri, t, force=again, return_state=True).result()
        summary.append(summary_row(f"zero-shot {t}", zero["model"], zero["metric"], zero.get("score"),
                                   zero["seconds"], zero["reused"], reason=zero["reason"]))
        rows = [tune_delta(cfg.tune, cfg.tracking, model_uri, t, m, force=again, return_state=True).result()
                for m in cfg.tune.methods]
        for m, row in zip(cfg.tune.methods, rows):
            deltas.append(row["model"])
            summary.append(summary_row(f"tune {t} {m}", row["model"], row["metric"], row.get("score"),
                                       row.get("seconds") or 0.0, row["reused"], note=_delta_note(row, zero),
                                       reason=row["reason"]))
        tables[t] = comparison_table(cfg.tracking, model_uri, t, zero, rows, tune=cfg.tune)
    return {"deltas": deltas, "tables": tables, "summary": summary}
