"""Prefect task of the validation stage: measure one registered version (tasks/validation_measure.py), decide its
gates against its parent and the current champion of its name (registry.promotion, MLflow's threshold semantics),
record everything in a tracked MLflow run (tag cpmant.stage=validate) and move `champion` when every gate passes.
The champion is also measured beside the candidate in the same run (timings, in alternation; a delta's task on the
same examples), and a delta's base scored zero-shot: those gates never use a recorded figure.

    validate_version(validation, tracking, uri, force=False, promote=None) -> dict
        {"model", "passed", "promoted", "failures", "run_id", "reused", "reason", "metrics", "kind", "parent",
         "champion", "seconds"}

The steps: `candidate` (the version, its champion and its reuse key) -> `lookup` (one search by the key, decided by
tasks.reuse.decide, which prints why) -> either `reused_result` or `measure_and_decide` then `record`.
Reuse: a finished validation with the same key (version and weights, settings, held-out rows, gates, code; tag
cpmant.inputs_sha256) that compared with the same champion (or whose version has become the champion since) is
returned without measuring again; `force` measures again. A reused passing result still promotes when asked and the
version is not champion yet.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NONE

from cpmant.validation.config import ValidateConfig
from cpmant.validation.gates import HELDOUT_ID, describe_failure, describe_interval, plan_checks
from registry import runs
from registry import tags as T
from registry.aliases import get_alias
from registry.promotion import FAILED, PASSED, decide, promote_version, record_validation
from registry.tracking import setup_tracking
from registry.validation_records import VersionFacts, champions, find_validation, report_kind, version_facts

from .config import TrackingConfig
from .notes import mlflow_note
from .outcomes import validation_outcome
from .reuse import Reuse
from .reuse import decide as decide_reuse
from .metering import retry_transient, tracked_stage
from .validation_measure import heldout_id, measure, reference, reuse_key, settings_sha256
from .validation_report import comparison_rows, evidence_lines, gate_tags, in_run_champion, render_markdown

__all__ = ["champions", "render_markdown", "validate_version"]  # champions: the nightly flow's list (flows/)

REPORT_JSON, REPORT_MD = "validation_report.json", "validation_report.md"
COMPARISON_TABLE, GATES_TABLE = "comparison.json", "gates.json"
GATE_COLUMNS = ("metric", "against", "rule", "value", "baseline", "limit", "evidence", "passed", "mlflow_message")


@dataclass(frozen=True)
class Candidate:
    """The version to validate, its name's champion when the validation starts and its reuse key."""

    facts: VersionFacts
    champion_version: int | None
    key: str

    @property
    def uri(self) -> str:
        return self.facts.uri

    @property
    def champion(self) -> str:
        return "" if self.champion_version is None else f"models:/{self.facts.name}/{self.champion_version}"

    @property
    def own(self) -> bool:
        """The candidate is its name's champion already."""
        return self.champion_version == self.facts.version


@dataclass(frozen=True)
class Verdict:
    """A fresh measurement and its gates."""

    report: dict  # the suite's report
    parent_from: str
    champion_from: str
    checks: list
    decided: list[dict]
    skipped: list[dict]
    rows: list[dict]  # the three-way comparison

    @property
    def failed(self) -> list:
        return [c for c, d in zip(self.checks, self.decided) if not d["passed"]]

    @property
    def failures(self) -> list[str]:
        return [describe_failure(c) for c in self.failed]

    @property
    def evidence(self) -> list[str]:
        return evidence_lines(self.checks, self.decided, self.skipped)


def candidate(cfg: ValidateConfig, uri: str) -> Candidate:
    facts = version_facts(uri)
    return Candidate(facts, get_alias(facts.name, T.ALIAS_CHAMPION), reuse_key(cfg, facts, heldout_id(facts)))


def _still_holds(rec: dict, cand: Candidate) -> bool:
    """An earlier run with the key holds when it decided (passed or failed) and the champion it compared with is
    the champion now, or its version is the champion now."""
    tags = rec["tags"]
    return tags.get(T.VALIDATION) in (PASSED, FAILED) and (tags.get(T.VALIDATION_CHAMPION, "") == cand.champion
                                                           or cand.own)


def lookup(cand: Candidate, force: bool) -> tuple[Reuse, dict | None]:
    """One search by the key decides reuse (the reason is printed); the run reused, or None."""
    rec = None if force else find_validation(cand.uri, cand.key)
    rec = rec if rec is not None and _still_holds(rec, cand) else None
    what = f"validations of {cand.uri} against champion {cand.champion or 'none'}"
    reuse = decide_reuse(f"validate {cand.uri}", cand.key, rec and f"runs:/{rec['run_id']}", what, force)
    return reuse, rec


def _promote(cand: Candidate, passed: bool, promote: bool, run_id: str, evidence: list[str],
             reused: bool) -> bool:
    """Move `champion` to the candidate when every gate passed, promotion is asked and it is not champion yet."""
    if not (passed and promote and not cand.own):
        return False
    why = f"every gate passed (validation run {run_id}{', reused' if reused else ''})"
    promote_version(cand.uri, "validation", "; ".join([why, *evidence]), run_id)
    return True


def _result(cand: Candidate, passed: bool, promoted: bool, failures: list[str], run_id: str, reuse: Reuse,
            metrics: dict, kind: str, champion: str, t0: float) -> dict:
    return {"model": cand.uri, "passed": passed, "promoted": promoted, "failures": failures, "run_id": run_id,
            "reused": reuse.reused, "reason": reuse.reason, "metrics": metrics, "kind": kind,
            "parent": cand.facts.parent, "champion": champion, "seconds": time.perf_counter() - t0}


def _split(tag: str | None) -> list[str]:
    return [f for f in (tag or "").split("; ") if f]


def reused_result(rec: dict, cand: Candidate, promote: bool, reuse: Reuse, t0: float) -> dict:
    """The earlier run's decision, recorded on the version again; a passing one promotes when asked."""
    tags, run_id = rec["tags"], rec["run_id"]
    passed = tags.get(T.VALIDATION) == PASSED
    failures, evidence = _split(tags.get(T.VALIDATION_FAILURES)), _split(tags.get(T.VALIDATION_EVIDENCE))
    promoted = _promote(cand, passed, promote, run_id, evidence, reused=True)
    record_validation(cand.uri, passed, run_id, failures, evidence)
    return _result(cand, passed, promoted, failures, run_id, reuse, rec["metrics"],
                   report_kind(run_id, REPORT_JSON), tags.get(T.VALIDATION_CHAMPION, ""), t0)


def measure_and_decide(cfg: ValidateConfig, cand: Candidate) -> Verdict:
    """Measure the candidate (the champion beside it), read its references, decide every gate."""
    stage, parent = cand.facts.stage, cand.facts.parent
    report = measure(cand.uri, cfg, stage, parent, "" if cand.own else cand.champion,
                     "the candidate is the champion" if cand.own else "no champion")
    metrics = report["metrics"]
    parent_m, parent_from = reference(parent, cfg)
    champ_m, champ_from = reference(cand.champion, cfg, own=cand.own)
    checks, skipped = plan_checks(cfg, stage, metrics, parent_m, champ_m, report.get("unmeasured"))
    decided = decide(checks)
    for c, d in zip(checks, decided):
        d["evidence"] = describe_interval(c) if c.interval is not None else ""
    return Verdict(report, parent_from, champ_from, checks, decided, skipped,
                   comparison_rows(metrics, parent_m, in_run_champion(champ_m, metrics)))


def _params(cfg: ValidateConfig, cand: Candidate, v: Verdict, promote: bool) -> dict:
    """The run's params (registry.runs cuts each value to MLflow's limit)."""
    out = {"model": cand.uri, "kind": v.report["kind"], "stage": cand.facts.stage,
           "parent": cand.facts.parent or "none", "champion": cand.champion or "none",
           "parent_metrics_from": v.parent_from or "-", "champion_metrics_from": v.champion_from or "-",
           "promote": str(promote)}
    for k, val in cfg.measurement().items():
        out[f"validation.{k}"] = (" | ".join(val) if isinstance(val, list) else json.dumps(val)
                                  if isinstance(val, dict) else str(val))
    out.update({f"gate.{c.metric}.{c.against}": c.rule for c in v.checks})
    if v.report.get("task"):
        out.update({"task": v.report["task"]["name"], "task_examples": str(v.report["task"]["examples"])})
    return out


def _run_tags(cfg: ValidateConfig, cand: Candidate, v: Verdict) -> dict:
    return {T.STAGE: "validate", T.MODEL: cand.uri, T.PARENT: cand.facts.parent, T.INPUTS_SHA256: cand.key,
            T.VALIDATION_SETTINGS: settings_sha256(cfg), T.VALIDATION_CHAMPION: cand.champion,
            T.HELDOUT_SHA256: str(v.report["metrics"].get(HELDOUT_ID) or "")}


def record(cfg: ValidateConfig, tracking: TrackingConfig, cand: Candidate, v: Verdict, promote: bool,
           reuse: Reuse, t0: float) -> tuple[dict, str]:
    """The validation run (params, metrics, tables, the reports, the decision's tags and description), the promotion
    and the decision on the version: (result, markdown report)."""
    metrics, passed = v.report["metrics"], not v.failures
    with tracked_stage(tracking, f"validate-{cand.facts.name}-v{cand.facts.version}",
                       tags=_run_tags(cfg, cand, v)) as run:
        run_id = run.info.run_id
        runs.log_params(_params(cfg, cand, v, promote))
        run.log_final({k: x for k, x in metrics.items() if isinstance(x, (int, float)) and not isinstance(x, bool)})
        runs.log_table(v.rows, COMPARISON_TABLE)
        if v.decided:
            runs.log_table([{c: d[c] for c in GATE_COLUMNS} for d in v.decided], GATES_TABLE)
        promoted = _promote(cand, passed, promote, run_id, v.evidence, reused=False)
        res = _result(cand, passed, promoted, v.failures, run_id, reuse, metrics, v.report["kind"], cand.champion,
                      t0)
        md = render_markdown(res, v.report, v.rows, v.decided, v.skipped)
        runs.log_dict({**v.report, "result": {k: x for k, x in res.items() if k != "metrics"},
                       "comparison": v.rows, "gates": v.decided, "skipped": v.skipped}, REPORT_JSON)
        runs.log_text(md, REPORT_MD)
        runs.set_tags({T.VALIDATION: PASSED if passed else FAILED, T.VALIDATION_FAILURES: "; ".join(v.failures),
                       T.VALIDATION_EVIDENCE: "; ".join(v.evidence), T.PROMOTED: str(promoted).lower(),
                       **gate_tags(v.failed)})
        runs.set_note(mlflow_note(md))  # headings and tables MLflow can show
    record_validation(cand.uri, passed, run_id, v.failures, v.evidence)
    return res, md


def _prefect_artifact(md: str, uri: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    key = "validation-" + re.sub(r"[^a-z0-9-]+", "-", uri.removeprefix("models:/").lower()).strip("-")
    try:
        create_markdown_artifact(md, key=key, description=f"Validation of {uri}")
    except Exception:  # outside a flow or task run (a notebook) there is no Prefect artifact to make
        pass


def _run_name() -> str:
    from prefect.runtime import task_run

    uri = str(task_run.parameters.get("uri", ""))
    return "validate-" + re.sub(r"[^A-Za-z0-9@._-]+", "-", uri.removeprefix("models:/"))


@task(name="validate-version", task_run_name=_run_name, cache_policy=NONE, retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def validate_version(validation: ValidateConfig, tracking: TrackingConfig, uri: str, force: bool = False,
                     promote: bool | None = None) -> dict:
    """Validate one version (see the module docstring); `promote` None = `validation.promote`. The result dict; a
    failed gate ends the task run in a Completed state named `Rejected` (tasks/outcomes.py) carrying the dict."""
    t0 = time.perf_counter()
    cfg = validation
    promote = cfg.promote if promote is None else bool(promote)
    setup_tracking(tracking.experiment)
    cand = candidate(cfg, uri)
    reuse, rec = lookup(cand, force)
    if rec is not None:
        return validation_outcome(reused_result(rec, cand, promote, reuse, t0))
    res, md = record(cfg, tracking, cand, measure_and_decide(cfg, cand), promote, reuse, t0)
    _prefect_artifact(md, cand.uri)
    res["seconds"] = time.perf_counter() - t0
    return validation_outcome(res)  # a failed gate: a Completed state named "Rejected" with the gates' message
