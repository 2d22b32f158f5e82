"""The validation stage's MLflow queries (tasks/validate.py records through registry.runs and registry.promotion):

    version_facts(uri) -> VersionFacts            name, version, models:/ URI, tags and tuning run of a version
    find_validation(uri, key) -> dict | None      the newest finished validation run of the version with reuse key
                                                  `key` (tag cpmant.inputs_sha256): {"run_id", "metrics", "tags"}
    recorded_validation(uri, settings) -> dict | None   the same, by measurement settings only (a reference's
                                                  recorded metrics: tag cpmant.validation_settings_sha256)
    tuning_data_dir(uri) -> str | None            the task data folder the version's tuning run used (`data.dir`)
    report_kind(run_id, path) -> str              the `kind` of a validation run's JSON report ("" if unreadable)
    champions() -> [models:/NAME/VERSION]         re-exported from registry.promotion

The caller has pointed MLflow at its store (registry.tracking.setup_tracking). Runs are searched in every active
experiment: a validation may be filed under any experiment the config names.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from . import tags as T
from .promotion import champions  # noqa: F401  (the nightly re-validation's list)
from .pulling import resolve_version


@dataclass(frozen=True)
class VersionFacts:
    name: str
    version: int
    uri: str  # models:/NAME/VERSION
    tags: dict
    run_id: str  # the run that logged it ("" when none)

    @property
    def stage(self) -> str:
        return self.tags.get(T.STAGE, "pretrain")

    @property
    def parent(self) -> str:
        return self.tags.get(T.PARENT, "")


def version_facts(uri: str) -> VersionFacts:
    name, version = resolve_version(uri)
    mv = MlflowClient().get_model_version(name, str(version))
    return VersionFacts(name, int(version), f"models:/{name}/{version}", dict(mv.tags or {}), mv.run_id or "")


def _newest_validation(uri: str, tags: dict[str, str]) -> dict | None:
    c = MlflowClient()
    exps = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not exps:
        return None
    wanted = {T.STAGE: "validate", T.MODEL: uri, **tags}
    flt = " and ".join([f"tags.`{k}` = '{v}'" for k, v in wanted.items()] + ["attributes.status = 'FINISHED'"])
    runs = c.search_runs(exps, filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    r = runs[0]
    return {"run_id": r.info.run_id, "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)}


def find_validation(uri: str, key: str) -> dict | None:
    """The validation of `uri` (models:/NAME/VERSION) recorded with reuse key `key`, newest first."""
    return _newest_validation(uri, {T.INPUTS_SHA256: key})


def recorded_validation(uri: str, settings_sha256: str) -> dict | None:
    """The newest validation of `uri` measured with these settings (any gates, any champion)."""
    return _newest_validation(uri, {T.VALIDATION_SETTINGS: settings_sha256})


def tuning_data_dir(uri: str) -> str | None:
    """The `data.dir` param of the run that logged the version; None without one (a run that is gone: the
    default data)."""
    run_id = version_facts(uri).run_id
    if not run_id:
        return None
    try:
        return MlflowClient().get_run(run_id).data.params.get("data.dir") or None
    except Exception:  # a deleted run: the task's default data
        return None


def report_kind(run_id: str, path: str) -> str:
    """The `kind` of the JSON report at `path` of the run; "" for an old or damaged run (its tags still hold the
    decision)."""
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}").get("kind", "")
    except Exception:
        return ""
