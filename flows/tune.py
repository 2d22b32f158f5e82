"""The delta-tuning stage as a Prefect flow."""

from __future__ import annotations

from prefect import flow

from tasks.tune import comparison_table, resolve_methods, resolve_tasks, tune_delta, zero_shot

from .config import LifecycleConfig, forced
from .summary import summary_row

__all__ = ["tune_flow", "resolve_tasks", "resolve_methods"]


@flow(name="tune", log_prints=True)
def tune_flow(model_uri: str, tasks: str | None = None, methods: str | None = None, config: dict | None = None,
              force: bool | list[str] = False) -> dict:
    """Tune deltas of a registered model on CUGE or demo tasks.

    Steps, per task (`tasks` or the config's tune.tasks; `methods` or tune.methods):
      1. zeroshot-<task>: the base's score without tuning (one run per base version, task data and code; reused)
      2. tune-<task>-<method>, once per method: tune, score, register `<model>-<task>-<method>` (the delta only,
         naming its base; alias `candidate`), or the version made from the same inputs unless `force`
      3. compare-<task>: zero-shot, each method and full side by side (MLflow table and plot, Prefect artifact)
    Returns {"deltas": [URI, ...], "tables": {task: rows}, "summary": [summary rows]}.
    """
    cfg = LifecycleConfig.model_validate(config or {})
    force = forced(force, "tune")  # True, or a list of stages that names tune
    task_list = resolve_tasks(tasks or cfg.tune.tasks)  # unknown names fail before any run starts
    method_list = resolve_methods(methods or cfg.tune.methods)
    deltas, tables, summary = [], {}, []
    for t in task_list:
        zero = zero_shot(cfg.tune, cfg.tracking, model_uri, t, force=force)
        summary.append(summary_row(f"zero-shot {t}", zero["model"], zero["metric"], zero.get("score"),
                                   zero["seconds"], zero["reused"]))
        rows = []
        for m in method_list:
            row = tune_delta(cfg.tune, cfg.tracking, model_uri, t, m, force=force)
            rows.append(row)
            deltas.append(row["model"])
            z = zero.get("score")
            note = f"{row.get('trainable_ratio') or 0:.2%} trainable"
            if z is not None:
                note += f", zero-shot {z:.4g}"
            summary.append(summary_row(f"tune {t} {m}", row["model"], row["metric"], row.get("score"),
                                       row.get("seconds") or 0.0, row.get("reused", False), note=note))
        tables[t] = comparison_table(cfg.tracking, model_uri, t, zero, rows, tune=cfg.tune)
    return {"deltas": deltas, "tables": tables, "summary": summary}
