"""The compression stage as a Prefect flow."""

from __future__ import annotations

import time

from prefect import flow

from tasks.compress import compress_variant, ladder_table, resolve_recipes

from .config import LifecycleConfig
from .summary import summary_row


@flow(name="compress", log_prints=True)
def compress_flow(model_uri: str, recipes: str | None = None, config: dict | None = None, force: bool = False) -> dict:
    """Compress a registered model into size variants.

    Steps:
      1. compress-<recipe>, once per recipe: prune / distill / quantize / MoEfy, measure, register
         `<base>-<recipe>` with its parent's lineage and alias `candidate`; a variant made from the same inputs
         (parent version, recipe, settings, data, code) is reused unless `force`
      2. ladder-table: the variants side by side (MLflow table, Prefect artifact, plot)
    """
    cfg = LifecycleConfig.model_validate(config or {})
    rows, summary = [], []
    for recipe in resolve_recipes(recipes or cfg.compress.recipes):
        t0 = time.perf_counter()
        row = compress_variant(cfg.compress, cfg.tracking, model_uri, recipe, force=force)
        rows.append(row)
        inc = row.get("loss_increase")
        summary.append(summary_row(f"compress {recipe.name}", row["model"], "lm_loss", row.get("lm_loss"),
                                   time.perf_counter() - t0, row.get("reused", False),
                                   note="" if inc is None else f"{inc:+.1%} vs parent"))
    table = ladder_table(cfg.tracking, model_uri, rows)
    return {"variants": [r["model"] for r in rows], "ladder": table, "summary": summary}
