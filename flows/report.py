"""The report as a Prefect flow: one self-contained HTML page read from MLflow (the package tasks/report/)."""

from __future__ import annotations

from prefect import flow

from tasks.report import write_report

from .config import LifecycleConfig

REASON = "report: made anew: the page is read from the tracking store each time"  # never reused


@flow(name="report", log_prints=True)
def report_flow(config: dict | None = None, out: str | None = None) -> dict:
    """Write the lifecycle report: loss curves, the size ladder beside CPM-Ant's published one (with the base's
    held-out loss checked to be one measurement), delta tuning against full fine-tuning (each score with its 95%
    interval, demo tasks labelled, odd results read as noise or significant), validation gates, energy /
    emissions / cost per stage, lineage, and the projection of a full 10B pretraining run. The page goes to `out`
    (default $CPMANT_HOME/reports/report.html), into the MLflow run `report` as an artifact, and into a Prefect
    markdown artifact `lifecycle-report`.

    Returns {"path", "run_id", "sections": {section: present}, "projection": [rows], "measured": {...} | None,
    "summary": [one row]}."""
    import time

    from .summary import summary_row

    cfg = LifecycleConfig.model_validate(config or {})
    t0 = time.perf_counter()
    out_ = write_report(cfg.tracking, out)
    print(f"report written to {out_['path']}")
    out_["summary"] = [summary_row("report", out_["path"], "sections", float(sum(out_["sections"].values())),
                                   time.perf_counter() - t0, False, reason=REASON)]
    return out_
