"""Recording into MLflow runs, for the tasks/ layer (which never imports mlflow): the active run's params, metrics,
tags, tables, dicts, texts, figures and files, MLflow's length limits applied here (registry/limits.py), and the few
run queries the stages make.

On the active run (mlflow's fluent API; a task opens it with tasks.metering.tracked_stage):
    log_params(d, prefix="")         values cut to MLflow's param limit
    log_metrics(d, step=None)        finite values only
    set_tags(d)                      values cut to the tag limit
    log_dict(d, path) / log_text(text, path) / log_table(rows, path) / log_figure(fig, path) / log_artifact(path, dir)
    set_note(markdown)               the run's description (mlflow.note.content), cut to the tag limit
    active_run_id() -> str | None
On any run (MlflowClient):
    run_tags(run_id) / run_params(run_id) / run_metrics(run_id) -> dict
    load_dict(run_id, path) / load_text(run_id, path)
    find_runs(tags, order="start_time DESC", max_results=100, experiment=None) -> [Run]   runs whose tags equal
                                                                          `tags`, newest first
    model_version(name, version)                                          a registered version
    version_tags(uri_or_name, version=None) -> dict                       a registered version's tags
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from .limits import param_value, tag_value
from .tracking import setup_tracking

NOTE = "mlflow.note.content"


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def log_params(params: dict[str, Any], prefix: str = "") -> None:
    if params:
        mlflow.log_params({f"{prefix}{k}": param_value(v) for k, v in params.items()})


def log_metrics(metrics: dict[str, float | None], step: int | None = None) -> None:
    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    if tags:
        mlflow.set_tags({k: tag_value(v) for k, v in tags.items()})


def set_note(markdown: str) -> None:
    mlflow.set_tag(NOTE, tag_value(markdown))


def log_dict(d: Any, path: str) -> None:
    mlflow.log_dict(d, path)


def log_text(text: str, path: str) -> None:
    mlflow.log_text(text, path)


def log_table(rows: list[dict] | dict, path: str) -> None:
    """An MLflow table (the UI's artifact view and its evaluation tab): a list of row dicts, or columns."""
    if isinstance(rows, list):
        cols: dict[str, list] = {}
        keys = list(dict.fromkeys(k for r in rows for k in r))
        for k in keys:
            cols[k] = [r.get(k) for r in rows]
        rows = cols
    mlflow.log_table(rows, path)


def log_figure(fig, path: str) -> None:
    mlflow.log_figure(fig, path)


def log_artifact(path: str, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(path, artifact_path)


def _client() -> MlflowClient:
    setup_tracking()
    return MlflowClient()


def run_tags(run_id: str) -> dict[str, str]:
    return dict(_client().get_run(run_id).data.tags)


def run_params(run_id: str) -> dict[str, str]:
    return dict(_client().get_run(run_id).data.params)


def run_metrics(run_id: str) -> dict[str, float]:
    return dict(_client().get_run(run_id).data.metrics)


def load_dict(run_id: str, path: str) -> Any:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")


def load_text(run_id: str, path: str) -> str:
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")


def _quote(v: str) -> str:
    return "'" + str(v).replace("'", "\\'") + "'"


def find_runs(tags: dict[str, str], order: str = "start_time DESC", max_results: int = 100,
              status: str | None = "FINISHED", experiment: str | None = None) -> list:
    """Runs of `experiment` (default: the project's) whose tags equal every key/value of `tags` (and whose status
    is `status`, unless None), newest first."""
    from .tracking import EXPERIMENT

    client = _client()
    exp = client.get_experiment_by_name(experiment or EXPERIMENT)
    if exp is None:
        return []
    clauses = [f"tags.`{k}` = {_quote(v)}" for k, v in tags.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    return client.search_runs([exp.experiment_id], " and ".join(clauses), order_by=[f"attributes.{order}"],
                              max_results=max_results)


def end_runs(run_ids: list[str], status: str, tracking_uri: str | None = None) -> None:
    """End runs with `status` (e.g. KILLED: runs a killed command left RUNNING) in the store at `tracking_uri`
    (default: this home's)."""
    client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else _client()
    for run_id in run_ids:
        client.set_terminated(run_id, status=status)


def model_version(name: str, version: str | int):
    """A registered version (mlflow's ModelVersion: run_id, description, tags, aliases)."""
    return _client().get_model_version(name, str(version))


def version_tags(name: str, version: str | int) -> dict[str, str]:
    return dict(_client().get_model_version(name, str(version)).tags or {})
