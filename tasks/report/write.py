"""Writing the report: the page under CPMANT_HOME (or where asked), a `report` run holding it
(registry.report_queries.record_report) and the Prefect markdown artifact; `write_report` is the Prefect task."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from cpmant import projection as P
from registry import tags as T
from registry.report_queries import record_report

from ..config import TrackingConfig
from .collect import collect
from .page import render_html, render_markdown, sections_present

REPORT_STAGE = "report"  # the `report` run's cpmant.stage tag


def default_path() -> Path:
    from cpmant.paths import subdir

    return subdir("reports") / "report.html"


def build_report(experiment: str = "cpmant", out: str | Path | None = None) -> tuple[Path, dict, str]:
    """Collect, render and write the page (atomically); (path, data, html). No run is logged."""
    from cpmant.fsutil import atomic_write_text

    data = collect(experiment)
    page = render_html(data)
    path = Path(out).expanduser().resolve() if out else default_path()
    if path.is_dir():  # --out DIR: the page goes in it under its default name
        path = path / default_path().name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    return path, data, page


def published_params() -> dict:
    """CPM-Ant's and T5-11B's published figures: params of the report run, never metrics."""
    return {"published.cpm_ant_cost_rmb": P.CPM_ANT_COST_RMB,
            "published.cpm_ant_emissions_kg_co2e": P.CPM_ANT_EMISSIONS_KG,
            "published.cpm_ant_gpu_hours": P.CPM_ANT_GPU_HOURS,
            "published.cpm_ant_tokens_per_second": P.CPM_ANT_TOKENS_PER_SECOND,
            "published.t5_11b_emissions_kg_co2e": P.T5_11B_EMISSIONS_KG,
            "published.source": P.PUBLISHED_SOURCE}


def _log_report(tracking: TrackingConfig, path: Path, data: dict) -> str:
    """A `report` run (nested under the lifecycle's run) holding the page, the projection table, and the published
    figures as params."""
    rows = data["projection"]
    tags = {**tracking.parent_tags(), T.STAGE: REPORT_STAGE}
    return record_report(tracking.experiment, tags, str(path), {k: [r[k] for r in rows] for k in rows[0]},
                         published_params())


@task(name="report", task_run_name="report", cache_policy=NONE)
def write_report(tracking: TrackingConfig, out: str | None = None) -> dict:
    """Write the page (default $CPMANT_HOME/reports/report.html), log it as an artifact of a `report` run and as a
    Prefect markdown artifact `lifecycle-report`. Returns {"path", "run_id", "sections", "projection", "measured"}."""
    from prefect.artifacts import create_markdown_artifact

    path, data, _ = build_report(tracking.experiment, out)
    run_id = _log_report(tracking, path, data)
    create_markdown_artifact(render_markdown(data, str(path)), key="lifecycle-report",
                             description="CPM-Ant lifecycle report")
    return {"path": str(path), "run_id": run_id, "sections": sections_present(data),
            "projection": data["projection"], "measured": data["measured"]}
