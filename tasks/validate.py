"""Prefect task of the validation stage: measure one registered version (cpmant.validation.suite), decide its gates
against its parent and the current champion of its name (registry.promotion, MLflow's threshold semantics), record
everything in a tracked MLflow run (tag cpmant.stage=validate) and move `champion` when every gate passes.
The champion is also measured beside the candidate in the same run (timings, in alternation; a delta's task on the
same examples), and a delta's base scored zero-shot: those gates never use a recorded figure.

    validate_version(validation, tracking, uri, force=False, promote=None) -> dict
        {"model", "passed", "promoted", "failures", "run_id", "reused", "metrics", "kind", "champion", "seconds"}

Reuse: a finished validation of the same version with the same settings and gates (and code) that compared with
the same champion (or whose version has become the champion since) is returned without measuring again; `force`
measures again. A reused passing result still promotes when asked and the version is not champion yet.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from cpmant.errors import CpmantError
from cpmant.validation.config import INTERVAL_GATES, TIMED_METRICS, ValidateConfig
from cpmant.validation.gates import HELDOUT_ID, describe_failure, describe_interval, plan_checks
from registry import tags as T

from .config import TrackingConfig
from .notes import mlflow_note
from .outcomes import validation_outcome
from .tracking import retry_transient, tracked_stage

REPORT_JSON, REPORT_MD = "validation_report.json", "validation_report.md"
COMPARISON_TABLE, GATES_TABLE = "comparison.json", "gates.json"
# the metrics the summary shows and the comparison table lists first
KEY_METRICS = ("perplexity", "lm_loss", "tokens_per_second", "first_token_ms_p50", "first_token_ms_p95",
               "peak_memory_mb", "smoke_pass_rate", "unk_rate", "loop_rate", "task_score")
HELDOUT_TAG = "cpmant.heldout_sha256"  # the held-out rows a validation's perplexity was measured on
_MEASURED: dict[tuple[str, str], dict] = {}  # (version URI, settings sha256) -> metrics of a reference measured here


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def settings_sha256(cfg: ValidateConfig) -> str:
    """What decides the measured numbers: the measurement settings and the code version."""
    from cpmant.checkpoint import git_sha

    return _sha({"settings": cfg.measurement(), "code": git_sha()})


def validation_key(cfg: ValidateConfig, version_uri: str, checkpoint_sha256: str, heldout_sha256: str = "") -> str:
    """The reuse key of a validation: the version (and its weights), the settings, the held-out rows' identity
    (cpmant.heldout), the gates and the code."""
    return _sha({"model": version_uri, "weights": checkpoint_sha256, "settings": settings_sha256(cfg),
                 "heldout_sha256": heldout_sha256,
                 "gates": {k: g.model_dump(mode="json") for k, g in cfg.gates.items()}})


def _heldout_sha256(uri: str, parent: str) -> str:
    """The identity of the held-out rows a version is measured on (its lineage's; "" when it cannot be read)."""
    from cpmant.heldout import folder_heldout_sha256
    from registry.pulling import checkpoint_dir

    try:
        # (metadata and vocab only: the weights are verified when measured)
        return folder_heldout_sha256(_data_dir(checkpoint_dir(uri, verify=False), parent))
    except (CpmantError, OSError):
        return ""


# ---- loading a version ---------------------------------------------------------------------------------------
def _delta_task(model_dir: Path) -> str | None:
    """The task a delta (or a full fine-tune) was tuned on, from its delta_config.json; None for other models."""
    if not (model_dir / "delta_config.json").is_file():
        return None
    try:
        from cpmant.delta.checkpoint import read_delta_config
    except ImportError:
        return None
    return read_delta_config(model_dir).get("task") or None


def _loader(uri: str, model_dir: Path, parent: str):
    """A `load()` -> (model, tokenizer) for the suite: registry.pulling.load_model where it exists (composes
    deltas), else the checkpoint (a delta composed on its parent's checkpoint)."""
    from registry import pulling

    def load():
        if hasattr(pulling, "load_model"):
            return pulling.load_model(uri)
        from cpmant.checkpoint import load_pretrained

        try:
            from cpmant.delta.checkpoint import is_delta_checkpoint, load_delta
        except ImportError:
            is_delta_checkpoint = None
        if is_delta_checkpoint is not None and is_delta_checkpoint(model_dir):
            if not parent:
                raise CpmantError(f"{uri} is a delta without a cpmant.parent tag naming its base",
                                  "register deltas with `cpmant tune`, which records the base")
            return load_delta(pulling.checkpoint_dir(parent), model_dir)
        return load_pretrained(model_dir)

    return load


def _data_dir(model_dir: Path, parent: str) -> Path:
    """The folder whose data lineage gives the held-out split: the model's own, else (a delta) its parent's."""
    from cpmant.lineage import read_lineage
    from registry.pulling import checkpoint_dir

    try:
        read_lineage(model_dir)
        return model_dir
    except CpmantError:
        if not parent:
            raise
        return _data_dir(checkpoint_dir(parent), "")


def _task_data(uri: str) -> str | None:
    """The task data folder the version's tuning run used (its `data.dir` param), if any."""
    from mlflow.tracking import MlflowClient

    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    c = MlflowClient()
    run_id = c.get_model_version(name, version).run_id
    if not run_id:
        return None
    try:
        return c.get_run(run_id).data.params.get("data.dir") or None
    except Exception:  # a run that is gone: the default data
        return None


def _version_loader(uri: str):
    """_loader of a registered version (its checkpoint fetched, its parent read from its tags)."""
    from mlflow.tracking import MlflowClient

    from registry.pulling import checkpoint_dir

    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    parent = (MlflowClient().get_model_version(name, version).tags or {}).get(T.PARENT, "")
    return _loader(uri, checkpoint_dir(uri), parent)


def measure(uri: str, cfg: ValidateConfig, stage: str, parent: str, champion: str = "",
            no_champion: str = "no champion") -> dict:
    """The suite's report of a registered version; `champion` (a version URI, "" for none: `no_champion` says why)
    is measured beside it in the same run (timings; a delta's task), and a delta's base (`parent`) is scored
    zero-shot on the same examples."""
    from cpmant.validation.suite import run_suite
    from registry.pulling import checkpoint_dir

    model_dir = checkpoint_dir(uri)
    task_name = _delta_task(model_dir) if stage == "delta" else None
    base = task_name and parent
    return run_suite(_loader(uri, model_dir, parent), _data_dir(model_dir, parent), cfg, stage=stage,
                     task=task_name, task_data=_task_data(uri) if task_name else None, progress=False,
                     champion_load=_version_loader(champion) if champion else None, no_champion=no_champion,
                     base_load=_version_loader(parent) if base else None, base_key=parent if base else None)


def reference_metrics(uri: str, cfg: ValidateConfig, own: bool = False) -> tuple[dict | None, str]:
    """(metrics, where from) of a reference version (a parent, a champion): its latest validation run with the same
    measurement settings, else measured now (no run). `own`: the candidate is the champion itself: only an earlier
    run serves (measuring it again would compare it with itself)."""
    from mlflow.tracking import MlflowClient

    from registry.promotion import recorded_validation

    rec = recorded_validation(uri, settings_sha256(cfg))
    if rec is not None:
        # the held-out rows' identity is a tag of the run (a string, not a metric)
        return {**rec["metrics"], HELDOUT_ID: rec["tags"].get(HELDOUT_TAG)}, f"validation run {rec['run_id']}"
    if own:
        return None, ""
    memo = (uri, settings_sha256(cfg))
    if memo not in _MEASURED:  # a parent of several candidates is measured once per process
        name, version = uri.removeprefix("models:/").rsplit("/", 1)
        tags = MlflowClient().get_model_version(name, version).tags
        _MEASURED[memo] = measure(uri, cfg, tags.get(T.STAGE, "pretrain"), tags.get(T.PARENT, ""))["metrics"]
    return _MEASURED[memo], "measured now"


def _reference(uri: str, cfg: ValidateConfig, own: bool = False) -> tuple[dict | None, str]:
    """reference_metrics, or (None, why) when there is no reference or it cannot be had (a deleted parent): its
    comparisons are then skipped, and the report says so."""
    if not uri:
        return None, ""
    try:
        return reference_metrics(uri, cfg, own)
    except CpmantError as e:
        return None, f"unavailable: {e.problem}"[:480]


# ---- the report ------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def in_run_champion(champion: dict | None, candidate: dict) -> dict | None:
    """The champion's metrics with those measured beside the candidate in this run (timings, task score) in place
    of its recorded ones."""
    here = {m: candidate[f"champion_{m}"] for m in (*TIMED_METRICS, "task_score") if f"champion_{m}" in candidate}
    if champion is None and not here:
        return None
    return {**(champion or {}), **here}


def evidence_lines(checks: list, decided: list[dict], skipped: list[dict]) -> list[str]:
    """The interval gates' record: each difference with its 95% interval and the decision, or why it was
    skipped."""
    out = [f"{describe_interval(c)}: {'pass' if d['passed'] else 'FAIL'}"
           for c, d in zip(checks, decided) if c.interval is not None]
    out += [f"{s['metric']}: skipped ({s['reason']})" for s in skipped if s["metric"] in INTERVAL_GATES]
    return out


def comparison_rows(candidate: dict, parent: dict | None, champion: dict | None) -> list[dict]:
    """The three-way comparison: one row per metric the candidate has (key metrics first)."""
    names = [m for m in KEY_METRICS if m in candidate] + sorted(m for m in candidate if m not in KEY_METRICS)
    return [{"metric": m, "candidate": candidate.get(m), "parent": (parent or {}).get(m),
             "champion": (champion or {}).get(m)} for m in names]


def render_markdown(res: dict, report: dict, rows: list[dict], decided: list[dict], skipped: list[dict]) -> str:
    verdict = "PASSED" if res["passed"] else "FAILED"
    lines = [f"# Validation of {res['model']} ({report['kind']}): {verdict}", ""]
    lines.append(f"- parent: {res['parent'] or 'none'}; champion before: {res['champion'] or 'none'}")
    lines.append(f"- promoted to champion: {'yes' if res['promoted'] else 'no'}")
    if res["failures"]:
        lines += ["", "## Failed gates", ""] + [f"- {f}" for f in res["failures"]]
    lines += ["", "## Candidate, parent, champion", "", "| metric | candidate | parent | champion |",
              "|---|---|---|---|"]
    lines += [f"| {r['metric']} | {_fmt(r['candidate'])} | {_fmt(r['parent'])} | {_fmt(r['champion'])} |"
              for r in rows]
    lines += ["", "## Gates (MLflow MetricThreshold)", "", "| metric | against | rule | value | limit | result |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {d['metric']} | {d['against']} | {d.get('evidence') or d['rule']} | {_fmt(d['value'])} | "
              f"{_fmt(d['limit'])} | {'pass' if d['passed'] else 'FAIL'} |" for d in decided]
    lines += [f"| {s['metric']} | {s['against']} | skipped: {s['reason']} | | | |" for s in skipped]
    lines += ["", "## Sample generations", "", "| prompt | continuation | checks |", "|---|---|---|"]
    for s in report["samples"]:
        text = s["text"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s['prompt']} | {text} | {'ok' if s['passed'] else ', '.join(s['problems'])} |")
    if report.get("task"):
        t = report["task"]
        lines += ["", f"## Task {t['name']} ({t['examples']} test examples)", ""]
        lines += [f"- {k}: {_fmt(v)}{' (primary)' if k == t['primary_metric'] else ''}"
                  for k, v in t["metrics"].items()]
        m = res["metrics"]
        for name, what in (("task_score", "score"), ("task_vs_zero_shot", "minus its base zero-shot"),
                           ("task_vs_champion", "minus the champion")):
            if m.get(name) is not None:
                lines.append(f"- {name} ({what}, same examples): {_fmt(m[name])} "
                             f"[{_fmt(m.get(name + '_ci_low'))}, {_fmt(m.get(name + '_ci_high'))}] (95% interval)")
    secs = ", ".join(f"{k} {v:.2f} s" for k, v in report["seconds"].items())
    lines += ["", f"Time: {secs}.", ""]
    return "\n".join(lines)


def _artifact_key(uri: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes)."""
    return "validation-" + re.sub(r"[^a-z0-9-]+", "-", uri.removeprefix("models:/").lower()).strip("-")


def _result(vuri: str, passed: bool, promoted: bool, failures: list[str], run_id: str, reused: bool,
            metrics: dict, kind: str, parent: str, champion: str, seconds: float) -> dict:
    return {"model": vuri, "passed": passed, "promoted": promoted, "failures": failures, "run_id": run_id,
            "reused": reused, "metrics": metrics, "kind": kind, "parent": parent, "champion": champion,
            "seconds": seconds}


def _reused(rec: dict, vuri: str, name: str, version: int, champion_now: int | None, promote: bool,
            t0: float) -> dict | None:
    """The result of an earlier validation run when it still holds: the champion it compared with is the champion
    now, or its version is the champion now. A passing one promotes when asked."""
    import mlflow

    from registry.promotion import FAILED, PASSED, VALIDATION, VALIDATION_EVIDENCE, VALIDATION_FAILURES, \
        promote_version, record_validation

    tags = rec["tags"]
    compared = tags.get("cpmant.validation_champion", "")
    now = "" if champion_now is None else f"models:/{name}/{champion_now}"
    if compared != now and champion_now != version:
        return None
    passed = tags.get(VALIDATION) == PASSED
    if tags.get(VALIDATION) not in (PASSED, FAILED):
        return None
    failures = [f for f in tags.get(VALIDATION_FAILURES, "").split("; ") if f]
    evidence = [f for f in tags.get(VALIDATION_EVIDENCE, "").split("; ") if f]
    promoted = False
    if passed and promote and champion_now != version:
        promote_version(vuri, "validation", "; ".join([f"every gate passed (validation run {rec['run_id']}, "
                                                       "reused)", *evidence]), rec["run_id"])
        promoted = True
    record_validation(vuri, passed, rec["run_id"], failures, evidence)
    try:
        report = mlflow.artifacts.load_dict(f"runs:/{rec['run_id']}/{REPORT_JSON}")
        kind = report.get("kind", "")
    except Exception:  # an old or damaged run: the tags above still hold the decision
        kind = ""
    return _result(vuri, passed, promoted, failures, rec["run_id"], True, rec["metrics"], kind,
                   tags.get(T.PARENT, ""), compared, time.perf_counter() - t0)


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
    import mlflow
    from mlflow.tracking import MlflowClient
    from prefect.artifacts import create_markdown_artifact

    from registry.aliases import get_alias
    from registry.promotion import (FAILED, MODEL, PASSED, VALIDATION, VALIDATION_EVIDENCE, VALIDATION_FAILURES,
                                    VALIDATION_KEY, VALIDATION_SETTINGS, decide, promote_version,
                                    recorded_validation, record_validation)
    from registry.pulling import resolve_version
    from registry.tracking import setup_tracking

    t0 = time.perf_counter()
    cfg = validation
    promote = cfg.promote if promote is None else bool(promote)
    setup_tracking(tracking.experiment)
    name, version = resolve_version(uri)
    vuri = f"models:/{name}/{version}"
    mv = MlflowClient().get_model_version(name, str(version))
    vtags = mv.tags or {}
    stage, parent = vtags.get(T.STAGE, "pretrain"), vtags.get(T.PARENT, "")
    champion_v = get_alias(name, T.ALIAS_CHAMPION)
    champion = "" if champion_v is None else f"models:/{name}/{champion_v}"
    key = validation_key(cfg, vuri, vtags.get(T.CHECKPOINT_SHA256, ""), _heldout_sha256(vuri, parent))
    if not force:
        rec = recorded_validation(vuri, key=key)
        if rec is not None:
            out = _reused(rec, vuri, name, version, champion_v, promote, t0)
            if out is not None:
                return validation_outcome(out)  # a failed gate: a Completed state named "Rejected"

    own = champion_v == version
    report = measure(vuri, cfg, stage, parent, "" if own else champion,
                     "the candidate is the champion" if own else "no champion")
    cand = report["metrics"]
    parent_m, parent_from = _reference(parent, cfg)
    champ_m, champ_from = _reference(champion, cfg, own=own)
    checks, skipped = plan_checks(cfg, stage, cand, parent_m, champ_m, report.get("unmeasured"))
    decided = decide(checks)
    failed = [c for c, d in zip(checks, decided) if not d["passed"]]
    failures = [describe_failure(c) for c in failed]
    passed = not failures
    evidence = evidence_lines(checks, decided, skipped)
    for c, d in zip(checks, decided):
        d["evidence"] = describe_interval(c) if c.interval is not None else ""
    rows = comparison_rows(cand, parent_m, in_run_champion(champ_m, cand))

    run_tags = {T.STAGE: "validate", MODEL: vuri, T.PARENT: parent, VALIDATION_KEY: key,
                VALIDATION_SETTINGS: settings_sha256(cfg), "cpmant.validation_champion": champion,
                HELDOUT_TAG: str(cand.get(HELDOUT_ID) or "")}
    with tracked_stage(tracking, f"validate-{name}-v{version}", tags=run_tags) as run:
        run_id = run.info.run_id
        params = {"model": vuri, "kind": report["kind"], "stage": stage, "parent": parent or "none",
                  "champion": champion or "none", "parent_metrics_from": parent_from or "-",
                  "champion_metrics_from": champ_from or "-", "promote": str(promote)}
        for k, v in cfg.measurement().items():
            params[f"validation.{k}"] = (" | ".join(v) if isinstance(v, list) else json.dumps(v)
                                         if isinstance(v, dict) else str(v))[:500]
        for c, d in zip(checks, decided):
            params[f"gate.{c.metric}.{c.against}"] = c.rule[:500]
        if report.get("task"):
            params["task"] = report["task"]["name"]
            params["task_examples"] = str(report["task"]["examples"])
        mlflow.log_params(params)
        run.log_final({k: v for k, v in cand.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_table({c: [r[c] for r in rows] for c in ("metric", "candidate", "parent", "champion")},
                         COMPARISON_TABLE)
        gate_cols = ("metric", "against", "rule", "value", "baseline", "limit", "evidence", "passed",
                     "mlflow_message")
        if decided:
            mlflow.log_table({c: [d[c] for d in decided] for c in gate_cols}, GATES_TABLE)
        promoted = False
        if passed and promote and champion_v != version:
            promote_version(vuri, "validation", "; ".join([f"every gate passed (validation run {run_id})",
                                                           *evidence]), run_id)
            promoted = True
        res = _result(vuri, passed, promoted, failures, run_id, False, cand, report["kind"], parent, champion,
                      time.perf_counter() - t0)
        md = render_markdown(res, report, rows, decided, skipped)
        mlflow.log_dict({**report, "result": {k: v for k, v in res.items() if k != "metrics"},
                         "comparison": rows, "gates": decided, "skipped": skipped}, REPORT_JSON)
        mlflow.log_text(md, REPORT_MD)
        mlflow.set_tags({VALIDATION: PASSED if passed else FAILED,
                         VALIDATION_FAILURES: "; ".join(failures)[:4000],
                         VALIDATION_EVIDENCE: "; ".join(evidence)[:4000],
                         "cpmant.promoted": str(promoted).lower(),
                         **{f"cpmant.gate.{c.metric}.{c.against}": (
                             f"failed: {describe_interval(c)}" if c.interval is not None else
                             f"failed: {c.metric} {_fmt(c.value)}, limit {_fmt(c.limit)} ({c.rule})")[:4000]
                            for c in failed}})
        mlflow.set_tag("mlflow.note.content", mlflow_note(md)[:4000])  # headings and tables MLflow can show
    record_validation(vuri, passed, run_id, failures, evidence)
    try:
        create_markdown_artifact(md, key=_artifact_key(vuri), description=f"Validation of {vuri}")
    except Exception:  # outside a flow or task run (a notebook) there is no Prefect artifact to make
        pass
    res["seconds"] = time.perf_counter() - t0
    return validation_outcome(res)  # a failed gate: a Completed state named "Rejected" with the gates' message

