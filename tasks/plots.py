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


def plot_ladder(table: list[dict], out: Path) -> Path | None:
    """LM loss against parameters for the ladder; the published increases drawn on the same parent loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r.get("params") and r.get("lm_loss")]
    if len(rows) < 2:
        return None
    base = rows[0]["lm_loss"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["params"] for r in rows], [r["lm_loss"] for r in rows], "o-", label="ours (held-out LM loss)")
    pub = [(r["params"], base * (1 + r["published_loss_increase"])) for r in rows
           if r.get("published_loss_increase") is not None]
    if len(pub) > 1:
        ax.plot(*zip(*pub), "s--", alpha=0.7, label="published increases applied to our parent")
    for r in rows:
        ax.annotate(str(r["model"]).split("-")[-1].split("/")[0], (r["params"], r["lm_loss"]), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("LM loss")
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
