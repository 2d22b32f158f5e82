"""The report's plots as inline base64 PNGs (matplotlib, no file): loss curves, the size ladder, a task's scores
with their intervals (both drawn by tasks/plots.py, which the stages use too), costs per stage, the 10B projection.
Each returns None where there is nothing to draw."""

from __future__ import annotations

import base64
import io

from cpmant import projection as P

from ..plots import draw_ladder, plot_comparison


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_loss_curves(curves: list[dict]) -> str | None:
    if not curves:
        return None
    fig, ax = _plt().subplots(figsize=(7, 3.6), dpi=90)
    for c in curves:
        ax.plot(c["steps"], c["loss"], lw=1, label=f"{c['run']} ({c['run_id'][:8]}) train")
        if c["valid_steps"]:
            ax.plot(c["valid_steps"], c["valid_loss"], "o--", ms=3, lw=0.8, label=f"{c['run_id'][:8]} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_ladder_vs_published(rows: list[dict]) -> str | None:
    """tasks/plots.py's ladder (structured rungs as a line, int8 / MoE as markers, points labelled), inline."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=90)
    if not draw_ladder(ax, rows):
        plt.close(fig)
        return None
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_task_scores(t: dict) -> str | None:
    """A task's scores with their 95% intervals as error bars (tasks/plots.py's comparison plot, inline)."""
    if not t.get("plot"):
        return None
    _plt()
    buf = io.BytesIO()
    title = f"{t['task']} (demo task: not a CUGE score)" if t["demo"] else t["task"]
    return base64.b64encode(buf.getvalue()).decode("ascii") if plot_comparison(t["plot"], buf, title) else None


def plot_stage_costs(stages: list[dict]) -> str | None:
    if not stages:
        return None
    fig, axes = _plt().subplots(1, 3, figsize=(9, 2.8), dpi=90)
    names = [s["stage"] for s in stages]
    for ax, (k, label) in zip(axes, (("energy_kwh", "kWh"), ("emissions_kg_co2e", "kg CO2e"), ("cost_rmb", "RMB"))):
        ax.bar(names, [s[k] for s in stages], color="#4c72b0")
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    return _png(fig)


def plot_projection(rows: list[dict]) -> str | None:
    # CPM-Ant's own figures and each profile at the published utilisation (an MFU measured on another kind of
    # device, "if a GPU reached the MFU measured here", is in the table, not on this scale)
    rows = [r for r in rows if r.get("cost_rmb") and r["device"] != "this machine" and "measured" not in r["label"]]
    if not rows:
        return None
    fig, ax = _plt().subplots(figsize=(7, 3.2), dpi=90)
    labels = [r["label"] for r in rows] + ["CPM-Ant published"]
    ax.barh(labels, [r["cost_rmb"] / 1e3 for r in rows] + [P.CPM_ANT_COST_RMB / 1e3],
            color=["#4c72b0"] * len(rows) + ["#dd8452"])
    ax.set_xlabel("thousand RMB for 200 B tokens of the 10B")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)
