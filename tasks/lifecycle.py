"""The lifecycle's MLflow record: a parent run `lifecycle` and one nested run per stage, and the one line per stage
that says whether it was reused and why. Plain functions the lifecycle flow calls, not Prefect tasks: bookkeeping
has no place in the flow-run graph (a tracking server's transient errors are retried by MLflow's own HTTP client,
MLFLOW_HTTP_REQUEST_MAX_RETRIES).

    open_run(tracking, name, parent_run_id=None, tags=None) -> run_id
    close_run(tracking, run_id, summary, status="FINISHED", extra=None, name="stage", seconds=None,
              reused_stages=None, note="") -> None
    reuse_line(stage, rows) -> str      "pretrain: reused: pretrain: reused models:/cpm-ant-tiny/3: same key ..."
    RunRecord                           open_run/close_run and the `candidate` pins as one object (a flow takes
                                        another in tests)

Runs are made by id (registry.run_records: no active-run stack): a stage's own runs, made in task threads or Dask
worker processes, are filed under the stage run by the `mlflow.parentRunId` tag (TrackingConfig.parent_run_id)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cpmant.errors import CpmantError
from registry import run_records
from registry import tags as T
from registry.tracking import setup_tracking

from .config import TrackingConfig

__all__ = ["CpmantError", "RunRecord", "close_run", "lifecycle_run_name", "open_run", "registered_models",
           "reuse_line"]  # CpmantError: re-exported for flows/, which import only tasks/

SUMMARY_COLUMNS = ("stage", "model", "metric", "value", "seconds", "reused", "note", "reason")


def registered_models(summary: list[dict]) -> list[str]:
    """The distinct models:/ URIs of a summary's rows, in order (a report row's path is not one)."""
    return list(dict.fromkeys(str(r["model"]) for r in summary if str(r.get("model") or "").startswith("models:/")))


def lifecycle_run_name(preset: str, when: float | None = None) -> str:
    """The lifecycle parent run's name: `lifecycle-<preset>-<UTC yyyymmdd-hhmmss>`, one per lifecycle."""
    return f"lifecycle-{preset}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(when))}"


def stage_reused(rows: list[dict]) -> bool:
    """A stage is reused when it has rows and every row was reused."""
    return bool(rows) and all(r.get("reused") for r in rows)


def reuse_line(stage: str, rows: list[dict]) -> str:
    """One line: whether `stage` was reused (every row), partly reused or ran, and why (its rows' reasons, the
    lines tasks.reuse.decide printed; a row without one is named by its model), e.g.
    "pretrain (reused): reused models:/cpm-ant-tiny/1: same key 1a2b3c4d5e6f"."""
    verdict = "reused" if stage_reused(rows) else "partly reused" if any(r.get("reused") for r in rows) else "ran"
    why = [(r.get("reason") or f"{r.get('model')}: {'reused' if r.get('reused') else 'made'} (no reason recorded)")
           .removeprefix(f"{stage}: ") for r in rows]  # a row labelled as its stage: the label once
    return f"{stage} ({verdict})" + (": " + " | ".join(why) if why else ": no rows")


def open_run(tracking: TrackingConfig, name: str, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None) -> str:
    return run_records.create_run(tracking.experiment, name, tags, parent_run_id)


def close_run(tracking: TrackingConfig, run_id: str, summary: list[dict], status: str = "FINISHED",
              extra: dict | None = None, name: str = "stage", seconds: float | None = None,
              reused_stages: list[str] | None = None, note: str = "") -> None:
    """Log the stage's summary (a table with each row's reuse reason, the models it made or reused, reused 0/1) and
    end the run. `duration_s` is `seconds`, the run's wall time as its caller measured it (None: the longest row's
    `seconds`, a lower bound). `models` counts the distinct registered versions (models:/ URIs) of the summary, once
    each; `cpmant.reused` is yes | no, or on the lifecycle's run (`reused_stages` given) the stages reused,
    comma-separated, or none. `note` (the reuse lines) becomes the run's description."""
    setup_tracking(tracking.experiment)
    if seconds is None:
        seconds = max([r.get("seconds") or 0.0 for r in summary] or [0.0])
    reused = stage_reused(summary)
    metrics = [("duration_s", float(seconds), 0), ("reused", float(reused), 0),
               ("models", float(len(registered_models(summary))), 0)]
    metrics += [(k, float(v), 0) for k, v in (extra or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
    said = ("yes" if reused else "no") if reused_stages is None else (",".join(reused_stages) or "none")
    run_records.log_batch(run_id, metrics, tags={T.MODELS: ", ".join(registered_models(summary)), T.REUSED: said})
    if summary:
        run_records.log_run_table(run_id, {c: [r.get(c) for r in summary] for c in SUMMARY_COLUMNS},
                                  "summary.json")
    if note:
        run_records.set_run_note(run_id, note)
    run_records.end_run(run_id, status=status)


@dataclass(frozen=True)
class RunRecord:
    """Where the lifecycle records its parent and stage runs (MLflow: open_run/close_run) and pins `candidate` on
    the versions it made or reused (tasks.candidates.pin_candidates)."""

    tracking: TrackingConfig

    def pin(self, candidates: list[str]) -> None:
        from .candidates import pin_candidates

        pin_candidates(self.tracking, candidates)

    def open(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        return open_run(self.tracking, name, parent_run_id, tags)

    def close(self, run_id: str, summary: list[dict], **kw) -> None:
        close_run(self.tracking, run_id, summary, **kw)


LIFECYCLE_TAG = T.LIFECYCLE  # run tag: "parent" on the lifecycle run, the stage's name on a stage run
