"""Gates and promotion: decide every gate with MLflow's own threshold semantics, record the decision on the version,
move `champion` (after validation, or by hand with a reason).

    decide(checks) -> list[dict]                               # each check + passed + MLflow's message
    record_validation(uri, passed, run_id, failures, evidence)  # version tags cpmant.validation=passed|failed, ...
    promote_version(uri, by, reason, run_id="") -> dict        # champion -> uri, who and why on the version
    promote_by_hand(uri, reason, user=None) -> dict            # `cpmant promote`: an MLflow run records it too
(the validation stage's queries: registry/validation_records.py)
"""

from __future__ import annotations

import datetime as _dt
import getpass

from cpmant.errors import CpmantError

from . import tags as T
from .aliases import get_alias, set_alias
from .limits import param_value, version_tag_value
from .runs import NOTE
from .tracking import setup_tracking

# the tags beyond the contract's live in registry/tags.py with the others
from .tags import (MODEL, PREVIOUS_CHAMPION, PROMOTED_AT, PROMOTED_BY, PROMOTION_REASON, PROMOTION_RUN,  # noqa: F401
                   VALIDATION, VALIDATION_EVIDENCE, VALIDATION_FAILURES, VALIDATION_RUN,
                   VALIDATION_SETTINGS)

PASSED, FAILED = "passed", "failed"
_clip = version_tag_value  # a version tag's value, cut to MLflow's limit (registry/limits.py)


def decide(checks) -> list[dict]:
    """Each `cpmant.validation.gates.Check` decided by `mlflow.validate_evaluation_results` with a
    `mlflow.models.MetricThreshold` (MLflow's comparison, including its zero-baseline fallback); a check's dict
    gains `passed` and `mlflow_message` (MLflow's own failure text, "" when it passed)."""
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    out = []
    for c in checks:
        num = (lambda x: None if x is None else float(x))  # MetricThreshold takes plain int/float only
        th = MetricThreshold(threshold=num(c.threshold), min_absolute_change=num(c.min_absolute_change),
                             min_relative_change=num(c.min_relative_change), greater_is_better=bool(c.greater_is_better))
        cand = EvaluationResult(metrics={} if c.value is None else {c.metric: float(c.value)}, artifacts={})
        base = None if c.baseline is None or c.threshold is not None else EvaluationResult(
            metrics={c.metric: float(c.baseline)}, artifacts={})
        try:
            mlflow.validate_evaluation_results({c.metric: th}, cand, base)
            passed, msg = True, ""
        except ModelValidationFailedException as e:
            passed, msg = False, e.message
        out.append({**c.to_dict(), "passed": passed, "mlflow_message": msg})
    return out


def _client():
    from mlflow.tracking import MlflowClient

    setup_tracking()
    return MlflowClient()


def _version_uri(uri: str) -> tuple[str, int, str]:
    from .pulling import resolve_version

    setup_tracking()
    name, version = resolve_version(uri)
    return name, version, f"models:/{name}/{version}"


EVIDENCE_LINE = "Validation evidence"  # the version description's line that states the interval gates


def record_validation(uri: str, passed: bool, run_id: str, failures: list[str],
                      evidence: list[str] | None = None) -> None:
    """The decision on the version: cpmant.validation=passed|failed, the run id, the failed gates and the interval
    gates' evidence (each difference, its 95% interval and the decision; also one line of the version's
    description, replaced at each validation)."""
    name, version, _ = _version_uri(uri)
    c = _client()
    c.set_model_version_tag(name, str(version), VALIDATION, PASSED if passed else FAILED)
    c.set_model_version_tag(name, str(version), VALIDATION_RUN, run_id)
    c.set_model_version_tag(name, str(version), VALIDATION_FAILURES, _clip("; ".join(failures)))
    c.set_model_version_tag(name, str(version), VALIDATION_EVIDENCE, _clip("; ".join(evidence or [])))
    if evidence:
        desc = c.get_model_version(name, str(version)).description or ""
        kept = [ln for ln in desc.split("\n") if not ln.startswith(EVIDENCE_LINE)]
        line = f"{EVIDENCE_LINE} (run {run_id}, {PASSED if passed else FAILED}): {'; '.join(evidence)}"
        c.update_model_version(name, str(version), description="\n".join(kept + [line]).strip())


def promote_version(uri: str, by: str, reason: str, run_id: str = "") -> dict:
    """Point `champion` of the model at `uri`'s version and record who moved it, why, when, the previous champion
    and the run that decided: {"model", "previous", "by", "reason", "at"}."""
    name, version, vuri = _version_uri(uri)
    previous = get_alias(name, T.ALIAS_CHAMPION)
    set_alias(vuri, T.ALIAS_CHAMPION)
    at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    prev = "" if previous is None else f"models:/{name}/{previous}"
    c = _client()
    for k, v in {PROMOTED_BY: by, PROMOTION_REASON: _clip(reason), PROMOTED_AT: at, PREVIOUS_CHAMPION: prev,
                 PROMOTION_RUN: run_id}.items():
        c.set_model_version_tag(name, str(version), k, v)
    return {"model": vuri, "previous": prev, "by": by, "reason": reason, "at": at}


def promote_by_hand(uri: str, reason: str, user: str | None = None) -> dict:
    """`cpmant promote URI --reason TEXT`: move `champion` to the version whatever its validation said, recording
    who asked (getpass.getuser()) and why on the version (tags and a line of its description) and in an MLflow run
    (tag cpmant.stage=promote)."""
    import mlflow

    if not isinstance(reason, str) or not reason.strip():
        raise CpmantError("a promotion needs a reason", 'pass --reason "why this version becomes champion"')
    user = user or getpass.getuser()
    name, version, vuri = _version_uri(uri)
    previous = get_alias(name, T.ALIAS_CHAMPION)
    with mlflow.start_run(run_name=f"promote-{name}-v{version}",
                          tags={T.STAGE: "promote", MODEL: vuri, PROMOTED_BY: user}) as run:
        mlflow.log_params({"model": vuri, "user": user, "reason": param_value(reason),
                           "previous_champion": "" if previous is None else f"models:/{name}/{previous}",
                           "validation": _client().get_model_version(name, str(version)).tags.get(VALIDATION, "none")})
        mlflow.set_tag(NOTE, f"{user} promoted {vuri} to champion: {reason}")
        rec = promote_version(vuri, user, reason, run.info.run_id)
    c = _client()
    mv = c.get_model_version(name, str(version))
    line = f"Promoted to champion by {user} on {rec['at']}: {reason}"
    c.update_model_version(name, str(version), description=((mv.description or "").rstrip() + "\n\n" + line).strip())
    return {**rec, "run_id": run.info.run_id}


def champions() -> list[str]:
    """models:/NAME/VERSION of every registered model's current champion."""
    c = _client()
    out = []
    for rm in _all_registered(c):
        v = (getattr(rm, "aliases", None) or {}).get(T.ALIAS_CHAMPION)
        if v is None:
            v = get_alias(rm.name, T.ALIAS_CHAMPION)
        if v is not None:
            out.append(f"models:/{rm.name}/{v}")
    return sorted(out)


def _all_registered(client):
    token = None
    while True:
        page = client.search_registered_models(page_token=token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return
