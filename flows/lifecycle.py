"""The whole lifecycle on one config: pretrain -> compression ladder -> delta tuning -> validation and promotion of
every candidate -> the report. One Prefect flow with a subflow per stage (the flow-run graph is the DAG), one MLflow
parent run `lifecycle` with a nested run per stage (each stage's own runs nested under it), and one printed line per
stage saying whether it was reused and why."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from prefect import flow

from tasks.lifecycle import LIFECYCLE_TAG, RunRecord, lifecycle_run_name, reuse_line, stage_reused

from .config import STAGES, LifecycleConfig, check_force, forced
from .runners import with_runner

_RUNNING: dict = {"stage": None}  # the stage this process's lifecycle is in (None: none), for the Ctrl+C message


def running_stage() -> str | None:
    """The lifecycle stage running in this process (kept after an interrupt or failure; None when none ran)."""
    return _RUNNING["stage"]


@dataclass(frozen=True)
class StageFlows:
    """The flow each stage runs (the project's by default; a test gives stand-ins)."""

    pretrain: Callable
    compress: Callable
    tune: Callable
    validate: Callable
    report: Callable

    @classmethod
    def default(cls) -> StageFlows:
        from .compress import compress_flow
        from .pretrain import pretrain_flow
        from .report import report_flow
        from .tune import tune_flow
        from .validate import validate_flow

        return cls(pretrain_flow, compress_flow, tune_flow, validate_flow, report_flow)


def _stage_config(cfg: LifecycleConfig, stage_run_id: str) -> dict:
    """The config a stage flow gets: its runs nested under the stage's run; new versions become `candidate` (the
    lifecycle is who moves it)."""
    tracking = cfg.tracking.model_copy(update={"parent_run_id": stage_run_id, "register_alias": "candidate"})
    return cfg.model_copy(update={"tracking": tracking}).model_dump(mode="json")


class _Stages:
    """Runs the stages one after another under the lifecycle's parent run, and collects their summaries."""

    def __init__(self, cfg: LifecycleConfig, record, parent: str, runner: Callable):
        self.cfg, self.record, self.parent, self.runner = cfg, record, parent, runner
        self.out: dict = {"summary": [], "reused_stages": [], "reuse_lines": [], "lifecycle_run_id": parent}

    def run(self, stage: str, flow_, *args, **kwargs) -> dict:
        """Open the stage's run, run `flow_` with the stage's config (after `args`), close the run with its summary
        and print the stage's reuse line."""
        _RUNNING["stage"] = stage
        run_id = self.record.open(stage, parent_run_id=self.parent, tags={LIFECYCLE_TAG: stage})
        t0, status, res, line = time.perf_counter(), "FAILED", {"summary": []}, ""
        try:
            conf = _stage_config(self.cfg, run_id)
            res = self.runner(flow_, self.cfg.orchestration)(*args, conf, **kwargs)
            status = "FINISHED"
            _RUNNING["stage"] = None
        finally:
            rows = res.get("summary") or []
            if status == "FINISHED":
                line = reuse_line(stage, rows)
                print(line)
            self.record.close(run_id, rows, status=status, name=stage, seconds=time.perf_counter() - t0,
                              note=line)
        self.out[stage] = res
        self.out["summary"] += rows
        self.out["reuse_lines"].append(line)
        if stage_reused(rows):
            self.out["reused_stages"].append(stage)
        return res


def run_lifecycle(cfg: LifecycleConfig, force, flows: StageFlows | None = None, record=None,
                  runner: Callable = with_runner) -> dict:
    """The lifecycle's steps (see lifecycle_flow) on a validated config and a checked `force`. `flows` (the stage
    flows), `record` (the MLflow runs' open/close and the `candidate` pins, tasks.lifecycle.RunRecord) and `runner`
    (a flow with its task runner) default to the project's."""
    flows = flows or StageFlows.default()
    record = record or RunRecord(cfg.tracking)
    _RUNNING["stage"] = None
    t_all = time.perf_counter()
    parent = record.open(lifecycle_run_name(cfg.pretrain.preset), tags={LIFECYCLE_TAG: "parent"})
    st = _Stages(cfg, record, parent, runner)
    out, status = st.out, "FAILED"
    try:
        base = st.run("pretrain", flows.pretrain, force=forced(force, "pretrain"))["model_uri"]
        comp = st.run("compress", flows.compress, base, None, force=forced(force, "compress"))
        candidates = [base, *comp["variants"]]
        tune = st.run("tune", flows.tune, base, None, None, force=forced(force, "tune"))
        candidates += list(tune.get("deltas") or [])
        record.pin(candidates)  # the versions this lifecycle made or reused are `candidate`
        st.run("validate", flows.validate, candidates, force=forced(force, "validate"), promote=True)
        st.run("report", flows.report)  # its result has a summary row
        out["candidates"] = candidates
        status = "FINISHED"
    finally:
        record.close(parent, out["summary"], status=status, name="lifecycle",
                     seconds=time.perf_counter() - t_all,  # duration_s: the lifecycle's wall time
                     reused_stages=out["reused_stages"], note="\n\n".join(ln for ln in out["reuse_lines"] if ln))
    out["stages"] = [s for s in STAGES if s in out]
    return out


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
    Every stage reuses what matches its inputs and prints one line: reused or ran, and why (each row's reason).
    `force=True` reruns every stage; a list of stage names (pretrain, compress, tune, validate, report) reruns those
    only.
    """
    return run_lifecycle(LifecycleConfig.model_validate(config or {}), check_force(force))
