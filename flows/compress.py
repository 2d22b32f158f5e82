"""The compression stage as a Prefect flow."""

from __future__ import annotations

import time

from prefect import flow

from tasks.compress import compress_variant, fetch_parent, ladder_table, resolve_recipes

from .config import LifecycleConfig, forced
from .summary import summary_row


@flow(name="compress", log_prints=True)
def compress_flow(model_uri: str, recipes: str | None = None, config: dict | None = None,
                  force: bool | list[str] = False) -> dict:
    """Compress a registered model into size variants.

    Steps:
      1. fetch-parent: pin the parent to its version and put its checkpoint in the local cache (once)
      2. compress-<recipe>, once per recipe, submitted together (the task runner runs them side by side: threads,
         or Dask processes): prune / distill / quantize / MoEfy, measure, register `<base>-<recipe>` with its
         parent's lineage; a variant registered with the same reuse key (parent version, recipe, settings, data,
         code) is returned as it is unless `force`, and each rung prints why ("compress 3b: reused ...: same key")
      3. ladder-table: the variants side by side (MLflow table, Prefect artifact, plot)
    """
    cfg = LifecycleConfig.model_validate(config or {})
    force = forced(force, "compress")
    t0 = time.perf_counter()
    parent = fetch_parent(cfg.tracking, model_uri)
    futures = [(r, compress_variant.submit(cfg.compress, cfg.tracking, parent, r, force=force))
               for r in resolve_recipes(recipes or cfg.compress.recipes)]
    rows, summary = [], []
    for recipe, future in futures:
        row = dict(future.result())
        rows.append(row)
        inc = row.get("loss_increase")
        # the rungs ran side by side: each row's time is the stage's wall time so far
        summary.append(summary_row(f"compress {recipe.name}", row["model"], "lm_loss", row.get("lm_loss"),
                                   time.perf_counter() - t0, row.get("reused", False), reason=row.get("reason", ""),
                                   note="" if inc is None else f"{inc:+.1%} vs parent"))
    table = ladder_table(cfg.tracking, model_uri, rows)
    return {"variants": [r["model"] for r in rows], "ladder": table, "summary": summary}
