"""The delta-tuning stage's MLflow records (tasks/tune/ calls these; it never imports mlflow): the base version a
tune starts from, per-example test predictions, the lr sweep's table, the comparison run's table and notes, metrics
logged onto the tuning runs of a comparison, the stored row of a registered delta, and the zero-shot run found by
its reuse key.

    base_version(uri, experiment) -> BaseVersion   name, models:/NAME/N, local folder, recorded checkpoint sha256
    log_predictions(text) / load_predictions(run_id) -> str | None
    log_sweep(grid, chosen, rows, columns)            params lr_grid, lr_chosen; table lr_sweep.json
    log_comparison(task, table, columns, notes, png)  table comparison-<task>.json, `<method>.note` params, the plot
    log_on_runs(values_by_run)                        metrics onto other (finished) runs, at step 0
    log_epoch(run_id, metrics, epoch)                 a tuning epoch's eval_<metric> at step = epoch
    delta_record(uri) -> DeltaRecord                  run id, description and tune_report.json of a version
    zero_shot_run(key, experiment) -> (run_id, test metrics) | None
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from . import runs
from . import tags as T
from .pulling import checkpoint_dir, resolve_version
from .run_records import log_batch
from .tracking import setup_tracking

REPORT_ARTIFACT = "tune_report.json"  # a delta run's row of the comparison table
SWEEP_ARTIFACT = "lr_sweep.json"


@dataclass(frozen=True)
class BaseVersion:
    name: str
    uri: str  # models:/NAME/VERSION
    folder: Path  # the verified local checkpoint
    checkpoint_sha256: str  # its recorded cpmant.checkpoint_sha256 tag (never re-hashed)


def base_version(uri: str, experiment: str) -> BaseVersion:
    """The base a tune starts from (an alias resolved to its version number). MLflow is pointed at the store first:
    a tune task may run first in a fresh process, where nothing else has."""
    setup_tracking(experiment)
    name, version = resolve_version(uri)
    exact = f"models:/{name}/{version}"
    sha = runs.version_tags(name, version).get(T.CHECKPOINT_SHA256, "")
    return BaseVersion(name, exact, checkpoint_dir(exact), sha)


def log_predictions(text: str) -> None:
    from cpmant.delta.evaluation import PREDICTIONS_ARTIFACT

    runs.log_text(text, PREDICTIONS_ARTIFACT)


def load_predictions(run_id: str) -> str | None:
    """A run's stored test predictions (jsonl), or None when it stored none."""
    from cpmant.delta.evaluation import PREDICTIONS_ARTIFACT

    try:
        return runs.load_text(run_id, PREDICTIONS_ARTIFACT)
    except (MlflowException, OSError):
        return None


def log_sweep(grid: list[float], chosen: float, rows: list[dict], columns: list[str]) -> None:
    runs.log_params({"lr_grid": json.dumps(list(grid)), "lr_chosen": chosen})
    runs.log_table({c: [r[c] for r in rows] for c in columns}, SWEEP_ARTIFACT)


def log_comparison(task_name: str, table: list[dict], columns: list[str], notes: dict[str, str],
                   png: Path | None) -> None:
    """On the active comparison run: the table, why rows were not paired, the plot."""
    runs.log_table({c: [r[c] for r in table] for c in columns}, f"comparison-{task_name}.json")
    runs.log_params(notes)
    if png:
        runs.log_artifact(str(png), "plots")


def log_on_runs(values_by_run: dict[str, dict[str, float]]) -> None:
    """Each run id's metrics (e.g. a method's paired comparisons, computed after its run ended), at step 0."""
    for run_id, values in values_by_run.items():
        if run_id and values:
            log_batch(run_id, [(k, v, 0) for k, v in values.items()])


def log_epoch(run_id: str, metrics: dict[str, float], epoch: int) -> None:
    """A tuning epoch's `eval_<metric>` values on its run, at step = epoch."""
    if metrics:
        log_batch(run_id, [(k, v, epoch) for k, v in metrics.items()])


@dataclass(frozen=True)
class DeltaRecord:
    run_id: str
    description: str
    row: dict  # the run's tune_report.json


def delta_record(uri: str) -> DeltaRecord:
    name, version = uri[len("models:/"):].rsplit("/", 1)
    mv = runs.model_version(name, version)
    return DeltaRecord(mv.run_id, mv.description or "", runs.load_dict(mv.run_id, REPORT_ARTIFACT))


def zero_shot_run(key: str, experiment: str) -> tuple[str, dict[str, float]] | None:
    """The newest finished zero-shot run recorded with reuse key `key`: its id and its `test_*` metrics (names
    without `test_`), or None."""
    found = runs.find_runs({T.INPUTS_SHA256: key, T.TUNE_KIND: "zero-shot"}, max_results=1, experiment=experiment)
    if not found:
        return None
    run = found[0]
    return run.info.run_id, {k[len("test_"):]: v for k, v in run.data.metrics.items() if k.startswith("test_")}
