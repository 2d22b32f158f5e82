"""The whole lifecycle on one config: pretrain -> compression ladder -> delta tuning -> validation and promotion of
every candidate -> the report. One Prefect flow with a subflow per stage (the flow-run graph is the DAG), one MLflow
parent run `lifecycle` with a nested run per stage (each stage's own runs nested under it)."""

from __future__ import annotations

import importlib
import time

from prefect import flow

from tasks.aliases import pin_candidates
from tasks.lifecycle import LIFECYCLE_TAG, close_run, lifecycle_run_name, open_run

from .compress import compress_flow
from .config import STAGES, LifecycleConfig, check_force, forced
from .pretrain import pretrain_flow
from .runners import with_runner


_RUNNING: dict = {"stage": None}  # the stage this process's lifecycle is in (None: none), for the Ctrl+C message


def running_stage() -> str | None:
    """The lifecycle stage running in this process (kept after an interrupt or failure; None when none ran)."""
    return _RUNNING["stage"]


def _stage_flow(module: str, name: str):
    """A stage flow of another module (tune, validate, report), looked up when the stage runs."""
    return getattr(importlib.import_module(f"flows.{module}"), name)


def _stage_config(cfg: LifecycleConfig, stage_run_id: str) -> dict:
    """The config a stage flow gets: its runs nested under the stage's run; new versions become `candidate` (the
    lifecycle is who moves it)."""
    tracking = cfg.tracking.model_copy(update={"parent_run_id": stage_run_id, "register_alias": "candidate"})
    return cfg.model_copy(update={"tracking": tracking}).model_dump(mode="json")


@flow(name="lifecycle", log_prints=True)
def lifecycle_flow(config: dict | None = None, force: bool | list[str] = False) -> dict:
    """Steps (each a subflow, each recorded as a nested MLflow run under the run `lifecycle`):
      1. pretrain: corpus -> vocab -> pretrain -> `cpm-ant-<preset>`, or the version made from the same config, data
         and code
      2. compress: the recipes of `compress.recipes` from it, the rungs side by side on the task runner
      3. tune: delta tuning of the base model on the demo tasks (config `tune`)
      4. validate: every candidate made or reused (base, variants, deltas), pinned as `candidate` first; those that
         pass are promoted to `champion`
      5. report: the HTML report
    Every stage reuses what matches its inputs. `force=True` reruns every stage; a list of stage names
    (pretrain, compress, tune, validate, report) reruns those only.
    """
    cfg = LifecycleConfig.model_validate(config or {})
    force = check_force(force)
    _RUNNING["stage"] = None
    t_all = time.perf_counter()
    parent = open_run(cfg.tracking, lifecycle_run_name(cfg.pretrain.preset), tags={LIFECYCLE_TAG: "parent"})
    out: dict = {"summary": [], "reused_stages": [], "lifecycle_run_id": parent}
    status = "FAILED"

    def run_stage(stage: str, fn):
        """Open the stage's run, run `fn(stage_config)` (a dict with "summary"), close the run with its summary."""
        _RUNNING["stage"] = stage
        run_id = open_run(cfg.tracking, stage, parent_run_id=parent, tags={LIFECYCLE_TAG: stage})
        t0, st = time.perf_counter(), "FAILED"
        res: dict = {"summary": []}
        try:
            res = fn(_stage_config(cfg, run_id))
            st = "FINISHED"
            _RUNNING["stage"] = None
        finally:
            rows = res.get("summary") or []
            close_run(cfg.tracking, run_id, rows, status=st, name=stage, seconds=time.perf_counter() - t0)
        out[stage] = res
        out["summary"] += rows
        if rows and all(r.get("reused") for r in rows):
            out["reused_stages"].append(stage)
        return res

    try:
        pre = run_stage("pretrain", lambda c: with_runner(pretrain_flow, c)(c, force=forced(force, "pretrain")))
        base = pre["model_uri"]
        comp = run_stage("compress", lambda c: with_runner(compress_flow, c)(base, None, c,
                                                                             force=forced(force, "compress")))
        candidates = [base, *comp["variants"]]

        tune_flow = _stage_flow("tune", "tune_flow")
        tune = run_stage("tune", lambda c: with_runner(tune_flow, c)(base, None, None, c,
                                                                     force=forced(force, "tune")))
        candidates += list(tune.get("deltas") or [])

        pin_candidates(cfg.tracking, candidates)  # the versions this lifecycle made or reused are `candidate`
        validate_flow = _stage_flow("validate", "validate_flow")
        run_stage("validate", lambda c: with_runner(validate_flow, c)(candidates, c, force=forced(force, "validate"),
                                                                      promote=True))

        report_flow = _stage_flow("report", "report_flow")
        run_stage("report", lambda c: with_runner(report_flow, c)(c, None))  # its result has a summary row
        out["candidates"] = candidates
        status = "FINISHED"
    finally:
        close_run(cfg.tracking, parent, out["summary"], status=status, name="lifecycle",
                  seconds=time.perf_counter() - t_all,  # duration_s: the lifecycle's wall time
                  reused_stages=out["reused_stages"])
    out["stages"] = [s for s in STAGES if s in out]
    return out
