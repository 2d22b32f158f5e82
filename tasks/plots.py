"""Plots people would rather look at than read: the loss curve."""

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
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
