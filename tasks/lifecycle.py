"""The lifecycle's MLflow record: a parent run `lifecycle` and one nested run per stage. Plain functions the
lifecycle flow calls, not Prefect tasks: bookkeeping has no place in the flow-run graph (a tracking server's transient
errors are retried by MLflow's own HTTP client, MLFLOW_HTTP_REQUEST_MAX_RETRIES).

    open_run(tracking, name, parent_run_id=None, tags=None) -> run_id
    close_run(tracking, run_id, summary, status="FINISHED", extra=None, name="stage", seconds=None) -> None

Runs are made with MlflowClient (no active-run stack): a stage's own runs, made in task threads or Dask worker
processes, are filed under the stage run by the `mlflow.parentRunId` tag (TrackingConfig.parent_run_id)."""

from __future__ import annotations

from registry import tags as T

from .config import TrackingConfig

LIFECYCLE_TAG = "cpmant.lifecycle"  # run tag: "parent" on the lifecycle run, the stage's name on a stage run


def registered_models(summary: list[dict]) -> list[str]:
    """The distinct models:/ URIs of a summary's rows, in order (a report row's path is not one)."""
    return list(dict.fromkeys(str(r["model"]) for r in summary if str(r.get("model") or "").startswith("models:/")))


def lifecycle_run_name(preset: str, when: float | None = None) -> str:
    """The lifecycle parent run's name: `lifecycle-<preset>-<UTC yyyymmdd-hhmmss>`, one per lifecycle."""
    import time

    return f"lifecycle-{preset}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(when))}"


def open_run(tracking: TrackingConfig, name: str, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None) -> str:
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking

    exp_id = setup_tracking(tracking.experiment)
    client = MlflowClient()
    from mlflow.tracking.context.system_environment_context import SystemEnvironmentContext

    context = SystemEnvironmentContext()  # MLFLOW_RUN_CONTEXT: the command's pid, as start_run adds (stale runs)
    all_tags = {"mlflow.runName": name, **(context.tags() if context.in_context() else {}), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, tags=all_tags, run_name=name).info.run_id


def close_run(tracking: TrackingConfig, run_id: str, summary: list[dict], status: str = "FINISHED",
              extra: dict | None = None, name: str = "stage", seconds: float | None = None,
              reused_stages: list[str] | None = None) -> None:
    """Log the stage's summary (a table, the models it made or reused, reused 0/1) and end the run. `duration_s` is
    `seconds`, the run's wall time as its caller measured it (None: the longest row's `seconds`, a lower bound).
    `models` counts the distinct registered versions (models:/ URIs) of the summary, once each; `cpmant.reused`
    is yes | no, or on the lifecycle's run (`reused_stages` given) the stages reused, comma-separated, or none."""
    import time

    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking

    setup_tracking(tracking.experiment)
    client = MlflowClient()
    ts = int(time.time() * 1000)
    if seconds is None:
        seconds = max([r.get("seconds") or 0.0 for r in summary] or [0.0])
    reused = bool(summary) and all(r.get("reused") for r in summary)
    metrics = [Metric("duration_s", float(seconds), ts, 0), Metric("reused", float(reused), ts, 0),
               Metric("models", float(len(registered_models(summary))), ts, 0)]
    for k, v in (extra or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics.append(Metric(k, float(v), ts, 0))
    models = ", ".join(registered_models(summary))
    said = ("yes" if reused else "no") if reused_stages is None else (",".join(reused_stages) or "none")
    client.log_batch(run_id, metrics=metrics, params=[], tags=[RunTag(T.MODELS, models[:5000]),
                                                              RunTag(T.REUSED, said)])
    if summary:
        cols = ("stage", "model", "metric", "value", "seconds", "reused", "note")
        client.log_table(run_id, {c: [r.get(c) for r in summary] for c in cols}, "summary.json")
    client.set_terminated(run_id, status=status)
