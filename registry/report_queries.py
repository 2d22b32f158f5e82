"""Every MLflow call the lifecycle report makes (tasks/report/ never imports mlflow): the runs of every experiment,
the tables a run logged, metric histories, registered versions with their aliases, and the `report` run itself.

    open_store(experiment) -> str                   point MLflow at the store (registry.tracking); its URI
    search_runs(stage=None, max_results=500)        RunRecord of every experiment, newest first
    logged_tables(run) -> {path: table}             the tables a run logged with log_table
    metric_history(run_id, key) -> [(step, value)]  by step
    run_metrics(run_id) -> dict                     {} for a run that is gone
    model_versions() -> [dict]                      every registered version: uri, stage, parent, task, aliases
    record_report(experiment, tags, page, table, params) -> run_id   the `report` run: page, table, params
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import mlflow
from mlflow.tracking import MlflowClient

from . import tags as T
from .limits import param_value
from .tracking import setup_tracking

LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # MLflow's own run tag listing what log_table wrote


@dataclass(frozen=True)
class RunRecord:
    """What the report reads of a run: plain values, no MLflow object."""

    run_id: str
    name: str
    status: str
    start: int | None
    tags: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def open_store(experiment: str) -> str:
    """The project's store (and `experiment` in it) made current; its tracking URI."""
    setup_tracking(experiment)
    return mlflow.get_tracking_uri()


def _record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name, run.info.status, run.info.start_time,
                     dict(run.data.tags), dict(run.data.params), dict(run.data.metrics))


def search_runs(stage: str | None = None, max_results: int = 500) -> list[RunRecord]:
    """The runs of every experiment (of `stage`, by its cpmant.stage tag, when given), newest first."""
    client = MlflowClient()
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    flt = f"tags.`{T.STAGE}` = '{stage}'" if stage else ""
    runs = client.search_runs(exp_ids, filter_string=flt, max_results=max_results,
                              order_by=["attributes.start_time DESC"])
    return [_record(r) for r in runs]


def logged_tables(run: RunRecord) -> dict[str, dict]:
    """The tables `run` logged with mlflow.log_table (listed in its `mlflow.loggedArtifacts` tag): path -> table
    as {"columns": [...], "data": [[...]]}. A table the artifact store lost is left out."""
    try:
        listed = json.loads(run.tags.get(LOGGED_ARTIFACTS, "[]"))
    except ValueError:
        return {}
    out = {}
    for a in listed:
        if a.get("type") != "table":
            continue
        try:
            out[a["path"]] = mlflow.artifacts.load_dict(f"runs:/{run.run_id}/{a['path']}")
        except Exception:  # an artifact store that lost it: the rest of the report still renders
            continue
    return out


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def run_metrics(run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        return dict(MlflowClient().get_run(run_id).data.metrics)
    except Exception:  # a version whose run was deleted: its row still renders, without a reading
        return {}


def _aliases(client: MlflowClient) -> dict[tuple[str, str], list[str]]:
    """(name, version) -> its aliases, as MLflow's registry shows them. search_model_versions leaves a version's
    `aliases` empty (MLflow fills them in get_model_version only), so they are read from the registered models."""
    out: dict[tuple[str, str], list[str]] = {}
    for rm in client.search_registered_models(max_results=1000):
        for alias, version in (rm.aliases or {}).items():
            out.setdefault((rm.name, str(version)), []).append(alias)
    return out


def model_versions() -> list[dict]:
    """Every registered version: {uri, name, version, stage, parent, run_id, task, aliases}."""
    client = MlflowClient()
    aliases = _aliases(client)
    out = []
    for mv in client.search_model_versions(max_results=1000):
        t = mv.tags or {}
        out.append({"uri": f"models:/{mv.name}/{mv.version}", "name": mv.name, "version": str(mv.version),
                    "stage": t.get(T.STAGE, ""), "parent": t.get(T.PARENT, ""), "run_id": mv.run_id,
                    "task": t.get(T.TASK, ""), "aliases": aliases.get((mv.name, str(mv.version)), [])})
    return out


def record_report(experiment: str, tags: dict[str, str], page: str, table: dict[str, list],
                  params: dict) -> str:
    """A run named `report` with `tags`: the page under `report/`, `table` as projection.json, `params` (cut to
    MLflow's limit); no metrics. Its run id."""
    setup_tracking(experiment)
    with mlflow.start_run(run_name="report", tags=tags) as run:
        mlflow.log_artifact(page, artifact_path="report")
        mlflow.log_table(table, "projection.json")
        mlflow.log_params({k: param_value(v) for k, v in params.items()})
    return run.info.run_id
