"""The lifecycle report as a package: one self-contained HTML page (inline CSS, plots as inline base64 PNG, no
external URL) read from MLflow, written under CPMANT_HOME (or where asked), logged as an artifact of a `report` run
and summarised as a Prefect markdown artifact.

    collect.py              what the report reads (registry.report_queries, registry.ancestry): collect(experiment)
    scores.py               what it says about its numbers: intervals, demo labels, noise readings, held-out check
    plots.py                its plots as inline PNGs (the ladder and comparison drawn by tasks/plots.py)
    markup.py, sections.py, projection_section.py, page.py   the HTML (render_html) and markdown (render_markdown)
    write.py                build_report (collect, render, write) and the Prefect task write_report

Sections: loss curves, the size ladder beside CPM-Ant's published ladder, delta tuning against full fine-tuning,
the validation gates and their decisions, energy / emissions / cost per stage, the lineage from corpus to deltas,
and the projection of a full 10B pretraining run (cpmant.projection). A section whose stage has not run yet says so.
Published figures are labelled columns and run params, never metrics.
"""

from __future__ import annotations

from .collect import collect, published_ladder
from .page import render_html, render_markdown
from .write import build_report, default_path, write_report

__all__ = ["build_report", "collect", "default_path", "published_ladder", "render_html", "render_markdown",
           "write_report"]
