"""The report's two renderings of collect()'s data: the self-contained HTML page (sections in order, a table of
contents) and the Prefect markdown artifact (where the page is, and the headline figures)."""

from __future__ import annotations

from cpmant import projection as P

from .markup import CSS, esc, section
from .projection_section import projection_html
from .scores import DEMO_NOTE, fmt, validation_summary
from .sections import costs_html, deltas_html, ladder_html, lineage_html, loss_html, validation_html

TOC = (("loss", "loss"), ("ladder", "ladder"), ("deltas", "deltas"), ("validation", "validation"),
       ("costs", "costs"), ("lineage", "lineage"), ("projection", "10B projection"))


def render_html(data: dict) -> str:
    s = [section("Loss curves", "loss", loss_html(data["loss_curves"])),
         section("Size ladder beside CPM-Ant's published ladder", "ladder",
                 ladder_html(data["ladder"], data.get("heldout"), data["published_ladder"])),
         section("Delta tuning against full fine-tuning", "deltas", deltas_html(data["deltas"])),
         section("Validation gates and decisions", "validation", validation_html(data["validation"])),
         section("Energy, emissions and cost per stage", "costs", costs_html(data["stages"], data["runs"])),
         section("Lineage from corpus to deltas", "lineage", lineage_html(data["lineages"])),
         section("Projection of a full 10B pretraining run", "projection", projection_html(data))]
    toc = " · ".join(f'<a href="#{a}">{t}</a>' for a, t in TOC)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>CPM-Ant lifecycle report</title>'
            f"<style>{CSS}</style></head><body><h1>CPM-Ant lifecycle report</h1>"
            f'<p class="note">generated {esc(data["generated"])} from <code>{esc(data["tracking_uri"])}</code></p>'
            f"<p>{toc}</p>{''.join(s)}</body></html>")


def _deltas_present(data: dict) -> bool:
    d = data["deltas"]
    return bool(d["tables"] or d.get("tasks") or d["versions"])


def sections_present(data: dict) -> dict[str, bool]:
    """Which sections have something of their own to show (the projection always has)."""
    return {"loss_curves": bool(data["loss_curves"]), "ladder": bool(data["ladder"]),
            "deltas": _deltas_present(data), "validation": bool(data["validation"]),
            "lineage": bool(data["lineages"]), "projection": True}


def _costs_markdown(data: dict) -> list[str]:
    lines = ["| stage | runs | kWh | kg CO2e | RMB | s |", "|---|---|---|---|---|---|"]
    return lines + [f"| {st['stage']} | {st['runs']} | {fmt(st['energy_kwh'])} | {fmt(st['emissions_kg_co2e'])} "
                    f"| {fmt(st['cost_rmb'])} | {fmt(st['duration_s'])} |" for st in data["stages"]]


def _validation_markdown(data: dict) -> list[str]:
    if not data["validation"]:
        return []
    sm = validation_summary(data["validation"])
    lines = ["", f"**Validation: {len(sm['passed'])} passed, {len(sm['failed'])} failed**"]
    return lines + [f"- failed: `{v['model']}`: {v['failures'] or 'no failed gate recorded'}" for v in sm["failed"]]


def _deltas_markdown(data: dict) -> list[str]:
    """Delta tuning (each score with its interval, demo tasks labelled, the readings) and a held-out disagreement,
    if any."""
    tasks = data["deltas"].get("tasks") or {}
    head = ["", "## Delta tuning (test split, 95% intervals)", "",
            "| task | method | score | vs zero-shot | vs full | reading |", "|---|---|---|---|---|---|"]
    lines = head if tasks else []
    for name, t in sorted(tasks.items()):
        label = f"{name} ({DEMO_NOTE})" if t["demo"] else name
        lines += [f"| {label} | {r['method']} | {r['score']} | {r['vs zero-shot']} | {r['vs full']} | "
                  f"{r['reading']} |" for r in t["rows"]]
    h = data.get("heldout")
    if h and not h["agree"]:
        lines += ["", f"**Held-out losses disagree**: {h['message']}."]
    return lines


def _projection_markdown(data: dict) -> list[str]:
    check = data["projection"][0]
    lines = ["", "## 10B projection (200 B tokens)", "", "| row | device-hours | RMB | kg CO2e |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {fmt(r['device_hours'])} | {fmt(r['cost_rmb'])} | {fmt(r['emissions_kg_co2e'])} |"
              for r in data["projection"]]
    return lines + [
        f"| CPM-Ant published | {fmt(P.CPM_ANT_GPU_HOURS)} | {fmt(P.CPM_ANT_COST_RMB)} | "
        f"{fmt(P.CPM_ANT_EMISSIONS_KG)} |",
        f"| T5-11B published | | | {fmt(P.T5_11B_EMISSIONS_KG)} |", "",
        f"CPM-Ant's own figures give {check['cost_rmb'] / P.CPM_ANT_COST_RMB - 1:+.1%} against the published "
        "cost (circular: 1,181 tokens/s is derived from the published 47,040 A100-hours)."]


def render_markdown(data: dict, path: str) -> str:
    """The Prefect artifact: where the page is, and the headline figures."""
    present = sections_present(data)
    missing = [name for name, key in (("pretraining", "loss_curves"), ("ladder", "ladder"),
                                      ("delta tuning", "deltas"), ("validation", "validation")) if not present[key]]
    lines = ["# CPM-Ant lifecycle report", "", f"Full page: `{path}`", ""]
    lines += _costs_markdown(data) + _validation_markdown(data) + _deltas_markdown(data)
    lines += _projection_markdown(data)
    lines += ["", "Sections not run yet: " + (", ".join(missing) or "none")]
    return "\n".join(lines)
