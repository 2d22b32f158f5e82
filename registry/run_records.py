"""MLflow runs opened and closed by id, for the tasks/ layer (which never imports mlflow): a stage's tracked run
(the fluent active run its task logs into), the lifecycle's parent and stage runs (made with MlflowClient, no
active-run stack: a stage's own runs in task threads or Dask workers are filed under them by `mlflow.parentRunId`),
and batched metric logging by run id. The caller has pointed MLflow at its store and experiment first
(registry.tracking.setup_tracking(experiment); create_run does it itself).

    start_run(run_name, tags) -> context manager yielding mlflow's active Run (ended FINISHED, or FAILED on error)
    create_run(experiment, name, tags=None, parent_run_id=None) -> run_id   (the command's pid tags added)
    log_batch(run_id, metrics=[(key, value, step)], tags=None, timestamp_ms=None)   at most 1000 metrics a call
    log_run_table(run_id, columns, path)     an MLflow table on a run by id
    set_run_note(run_id, markdown)           a run's description, by id
    end_run(run_id, status="FINISHED")
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import mlflow
from mlflow.entities import Metric, RunTag

from mlflow.tracking import MlflowClient

from .limits import tag_value
from .runs import NOTE
from .tracking import setup_tracking

BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics


def _client() -> MlflowClient:
    """A client on the store the caller set up (registry.tracking.setup_tracking with its experiment)."""
    return MlflowClient()


@contextlib.contextmanager
def start_run(run_name: str, tags: dict[str, str] | None = None):
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        yield run


def create_run(experiment: str, name: str, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
    from mlflow.tracking.context.system_environment_context import SystemEnvironmentContext

    exp_id = setup_tracking(experiment)
    context = SystemEnvironmentContext()  # MLFLOW_RUN_CONTEXT: the command's pid, as start_run adds (stale runs)
    all_tags = {"mlflow.runName": name, **(context.tags() if context.in_context() else {}), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return _client().create_run(exp_id, tags=all_tags, run_name=name).info.run_id


def log_batch(run_id: str, metrics: Iterable[tuple[str, float, int]] = (), tags: dict[str, str] | None = None,
              timestamp_ms: int | None = None, client=None) -> None:
    """Metrics (key, value, step) and tags on the run `run_id`, synchronously, in batches MLflow accepts."""
    client = client or _client()
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    rows = [Metric(k, float(v), ts, int(step)) for k, v, step in metrics]
    run_tags = [RunTag(k, tag_value(v)) for k, v in (tags or {}).items()]
    for i in range(0, max(len(rows), 1), BATCH):
        client.log_batch(run_id, metrics=rows[i: i + BATCH], tags=run_tags if i == 0 else [], synchronous=True)


def metric_client():
    """A client for repeated log_batch calls from one thread (AsyncMetricLogger's)."""
    return _client()


def log_run_table(run_id: str, columns: dict[str, list], path: str) -> None:
    _client().log_table(run_id, columns, path)


def set_run_note(run_id: str, markdown: str) -> None:
    _client().set_tag(run_id, NOTE, tag_value(markdown))


def end_run(run_id: str, status: str = "FINISHED") -> None:
    _client().set_terminated(run_id, status=status)
