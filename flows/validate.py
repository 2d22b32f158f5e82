"""The validation stage as Prefect flows: validate given versions (moving `champion` where every gate passes), and
the nightly re-validation of every registered model's current champion (the `validate` deployment)."""

from __future__ import annotations

from prefect import flow

from tasks.validate import champions, validate_version

from .config import LifecycleConfig, forced
from .summary import summary_row


def _note(res: dict) -> str:
    if res["passed"]:
        return "passed, now champion" if res["promoted"] else "passed"
    first = res["failures"][0] if res["failures"] else "failed"
    more = f" (+{len(res['failures']) - 1} more)" if len(res["failures"]) > 1 else ""
    return f"failed: {first}{more}"


@flow(name="validate", log_prints=True)
def validate_flow(uris: list[str], config: dict | None = None, force: bool | list[str] = False,
                  promote: bool | None = None) -> dict:
    """Validate registered versions; `champion` moves to each one whose every gate passes (unless promote=False;
    None = the config's validation.promote).

    Steps, per URI (models:/NAME/VERSION or models:/NAME@ALIAS):
      1. measure: held-out perplexity on the data it was trained with, smoke generations (non-empty, UTF-8, no
         <unk>, no loop), tokens/s, first-token latency p50/p95, peak memory; a delta's task metrics; the
         champion timed beside it (alternating) and, for a delta, its base zero-shot and the champion scored on the
         same examples (paired 95% intervals: task_vs_zero_shot, task_vs_champion)
      2. gates: every configured gate against its value threshold, its parent and the current champion (MLflow's
         MetricThreshold), the three-way comparison logged as an MLflow table
      3. record: an MLflow run (tag cpmant.stage=validate) with the metrics, a markdown report and the tables; the
         decision on the version (tags cpmant.validation, cpmant.validation_run_id); a Prefect markdown artifact
      4. promote: `champion` -> the version when every gate passed
    A validation of the same version with the same reuse key (weights, settings, held-out rows, gates, code),
    against the same champion, is reused unless `force`; each summary row carries the reason (`reason`).

    Returns {"results": [{"model", "passed", "promoted", "failures", "run_id", ...}], "summary": [rows]}.
    """
    if isinstance(uris, str):
        uris = [uris]
    cfg = LifecycleConfig.model_validate(config or {})
    force = forced(force, "validate")
    results, summary = [], []
    for uri in uris:  # one after another: a later candidate of the same name compares with the champion just moved
        # its state: Completed, or Completed named "Rejected" when a gate failed; either way the result dict
        res = validate_version(cfg.validation, cfg.tracking, uri, force=force, promote=promote,
                               return_state=True).result()
        results.append(res)
        key = "task_score" if res["metrics"].get("task_score") is not None else "perplexity"  # a delta: its task
        summary.append(summary_row("validate", res["model"], key, res["metrics"].get(key), res["seconds"],
                                   res["reused"], note=_note(res), reason=res.get("reason", "")))
    return {"results": results, "summary": summary}


@flow(name="validate-champions", log_prints=True)
def validate_champions_flow(config: dict | None = None, force: bool = True) -> dict:
    """Validate the current `champion` of every registered model (the nightly deployment): the same measurements
    and gates, with the champion's earlier validation as its reference; nothing is promoted. `force` (default)
    measures again even when an identical validation exists (the point of a nightly check)."""
    uris = champions()
    if not uris:
        print("no registered model has a champion yet: nothing to validate")
        return {"results": [], "summary": []}
    return validate_flow(uris, config, force=force, promote=False)
