"""The MLflow records of the pretraining and compression stages, for tasks/pretrain.py and tasks/compress.py (which
never import mlflow): the one reuse lookup by key, what a reused version's run recorded, and registering a
checkpoint inside the run that made it.

    find_by_key(name, key) -> models:/NAME/N | None     the newest version of `name` tagged cpmant.inputs_sha256=key
    recorded_checkpoint_sha256(uri) -> str              a version's cpmant.checkpoint_sha256 tag ("" when absent)
    version_summary(uri, keys) -> dict                  run id, description, the run's metrics among `keys`, params
    variant_report(uri) -> dict                         a compression variant's report as its run logged it
    run_exists(run_id) -> bool
    register_keyed(model_dir, name, key, ...) -> Registered   in the active run, version and run tagged with the key
    register_in_run(run_id, model_dir, name, key, ...)         the same inside the run `run_id`
"""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException

from . import runs
from .register import Registered, find_version, register_checkpoint
from .tags import CHECKPOINT_SHA256, INPUTS_SHA256

REPORT = "compress_report.json"  # a variant's report, logged in its run


def _split(uri: str) -> tuple[str, str]:
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    return name, version


def find_by_key(name: str, key: str) -> str | None:
    """The one lookup that decides a stage's reuse: the newest version of `name` made with reuse key `key`."""
    return find_version(name, {INPUTS_SHA256: key})


def recorded_checkpoint_sha256(uri: str) -> str:
    """The checkpoint sha256 the version `uri` (models:/NAME/N) was registered with: read, never hashed again."""
    return runs.version_tags(*_split(uri)).get(CHECKPOINT_SHA256, "")


def version_summary(uri: str, keys: tuple[str, ...] = ()) -> dict:
    """The version's run id and description, its run's final metrics among `keys` and its params."""
    mv = runs.model_version(*_split(uri))
    metrics = runs.run_metrics(mv.run_id) if mv.run_id else {}
    params = runs.run_params(mv.run_id) if mv.run_id else {}
    return {"run_id": mv.run_id, "description": mv.description or "", "params": params,
            "metrics": {k: metrics[k] for k in keys if k in metrics}}


def variant_report(uri: str) -> dict:
    """The report a compression variant's run logged (its ladder row), with its run id and description."""
    mv = runs.model_version(*_split(uri))
    return {**runs.load_dict(mv.run_id, REPORT), "run_id": mv.run_id, "description": mv.description or ""}


def run_exists(run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        runs.run_tags(run_id)
    except MlflowException:
        return False
    return True


def register_keyed(model_dir: str | Path, name: str, key: str, *, stage: str, parent: str = "",
                   description: str = "", alias: str | None = None, step: int = 0) -> Registered:
    """Register `model_dir` as a new version of `name` in the active run (the run that made it; the logged model
    is linked at `step`, the run's final step), the version and the run tagged with the stage's reuse key."""
    runs.set_tags({INPUTS_SHA256: key})
    return register_checkpoint(model_dir, name, stage=stage, parent=parent, alias=alias,
                               extra_tags={INPUTS_SHA256: key}, description=description, step=step)


def register_in_run(run_id: str, model_dir: str | Path, name: str, key: str, **kw) -> Registered:
    """register_keyed inside the (finished) run `run_id`, e.g. a training run whose registration failed."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        return register_keyed(model_dir, name, key, **kw)
