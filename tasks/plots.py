"""Plots people would rather look at than read: the loss curve, the compression ladder, a task's comparison (each
score with its 95% interval as an error bar where the row carries `score_ci_low` / `score_ci_high`)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss(log_path: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in Path(log_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["iter"] for r in recs], [r["loss"] for r in recs], label="train loss", lw=1)
    for key, name in (("mask", "mask-and-predict"), ("lm", "left-to-right LM")):
        pts = [(r["iter"], r["task_loss"][key]) for r in recs if r.get("task_loss", {}).get(key)]
        if pts:
            ax.plot(*zip(*pts), label=name, lw=0.6, alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("CPM-Ant pretraining")
    return _finish(fig, ax, out)


def rung_label(row: dict, base_model: str) -> str:
    """A ladder row's short label: "base" for the parent, else the recipe (the row's `recipe`, or the variant's
    name after the parent's: `models:/cpm-ant-tiny-3b/1` under `models:/cpm-ant-tiny/1` -> "3b")."""
    if row.get("model") == base_model:
        return "base"
    if row.get("recipe"):
        return str(row["recipe"])
    name = str(row.get("model", "")).removeprefix("models:/").split("/")[0].split("@")[0]
    base = str(base_model).removeprefix("models:/").split("/")[0]
    return name.removeprefix(base + "-") or name


def draw_ladder(ax, table: list[dict]) -> bool:
    """LM loss against parameters on `ax`: the parent and the structured rungs (the published ladder's recipes,
    cpmant.compress.recipe.LADDER) joined as a line in order of size, other variants (int8, MoE, a YAML recipe)
    as separate markers, each point labelled; the published increases drawn on our parent's loss. x ticks on a
    log scale at 1-2-5, rotated so that they do not overlap. False when fewer than two points can be drawn."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    from cpmant.compress.recipe import LADDER

    rows = [r for r in table if r.get("params") and r.get("lm_loss")]
    if len(rows) < 2:
        return False
    base_model, base = rows[0].get("model"), rows[0]["lm_loss"]
    labelled = [(rung_label(r, base_model), r) for r in rows]
    line = sorted([(n, r) for n, r in labelled if n == "base" or n in LADDER], key=lambda x: x[1]["params"])
    others = [(n, r) for n, r in labelled if not (n == "base" or n in LADDER)]
    ax.plot([r["params"] for _, r in line], [r["lm_loss"] for _, r in line], "o-",
            label="ours: structured rungs (held-out LM loss)")
    for n, r in others:
        ax.plot([r["params"]], [r["lm_loss"]], "D", ms=7, label=f"ours: {n} (not a ladder rung)")
    pub = sorted((r["params"], base * (1 + r["published_loss_increase"])) for n, r in line
                 if r.get("published_loss_increase") is not None)
    if len(pub) > 1:
        ax.plot(*zip(*pub), "s--", alpha=0.7, label="CPM-Ant's published increases on our parent")
    for n, r in labelled:  # line points labelled above, the others below (int8 sits on its parent's size)
        on_line = n == "base" or n in LADDER
        ax.annotate(n, (r["params"], r["lm_loss"]), textcoords="offset points", xytext=(4, 4 if on_line else -11),
                    fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel("parameters")
    ax.set_ylabel("LM loss")
    return True


def plot_ladder(table: list[dict], out: Path) -> Path | None:
    """The ladder (draw_ladder) as a PNG at `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if not draw_ladder(ax, table):
        plt.close(fig)
        return None
    ax.set_title("Compression ladder")
    return _finish(fig, ax, out)


def _finish(fig, ax, out: Path) -> Path:
    """Grid, legend, tight layout, save and close: the common end of every plot here."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _errors(rows: list[dict]):
    """matplotlib's asymmetric yerr ([below], [above]) from each row's interval; 0 where a row has none."""
    below, above = [], []
    for r in rows:
        low, high = r.get("score_ci_low"), r.get("score_ci_high")
        has = low is not None and high is not None
        below.append(max(r["score"] - low, 0.0) if has else 0.0)
        above.append(max(high - r["score"], 0.0) if has else 0.0)
    return [below, above]


def plot_comparison(table: list[dict], out: Path, title: str = "") -> Path | None:
    """One bar per row of a task's comparison table (zero-shot, each method, full): the task's score with its 95%
    interval as an error bar (rows without `score_ci_low` / `score_ci_high` get none), and the share of parameters
    each method trained written on its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r.get("score") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    names = [r["method"] for r in rows]
    scores = [r["score"] for r in rows]
    colors = ["#999999" if n == "zero-shot" else "#1f77b4" if n != "full" else "#d62728" for n in names]
    bars = ax.bar(names, scores, color=colors, label=rows[0]["metric"], yerr=_errors(rows), capsize=4,
                  error_kw={"elinewidth": 1, "label": "95% interval"})
    for b, r in zip(bars, rows):
        ratio = r.get("trainable_ratio")
        label = f"{r['score']:.3g}" + (f"\n{ratio:.2%} trained" if ratio else "")
        top = r.get("score_ci_high") if r.get("score_ci_high") is not None else b.get_height()
        ax.annotate(label, (b.get_x() + b.get_width() / 2, top), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(rows[0]["metric"])
    ax.set_title(f"Delta tuning: {title or rows[0].get('task', '')}")
    ax.margins(y=0.2)
    return _finish(fig, ax, out)
