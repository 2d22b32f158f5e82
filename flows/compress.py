"""The compression stage as a Prefect flow."""

from __future__ import annotations

import time

from prefect import flow

from tasks.aliases import missing_versions
from tasks.caching import cached, was_cached
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
         parent's lineage; a variant made from the same inputs (parent version, recipe, settings, data, code) is
         reused unless `force`: from Prefect's cache (tasks/caching.py), else from the registry
      3. ladder-table: the variants side by side (MLflow table, Prefect artifact, plot)
    """
    cfg = LifecycleConfig.model_validate(config or {})
    force = forced(force, "compress")
    t0 = time.perf_counter()
    parent = fetch_parent(cfg.tracking, model_uri)
    make = cached(compress_variant, force=force)
    futures = [(r, make.submit(cfg.compress, cfg.tracking, parent, r, force=force))
               for r in resolve_recipes(recipes or cfg.compress.recipes)]
    results = [(r, dict(f.result()), was_cached(f.state)) for r, f in futures]
    gone = set(missing_versions(cfg.tracking, [row["model"] for _, row, hit in results if hit]))
    if gone:  # a cached result names a version deleted since: make it again (the new result replaces the cached)
        again = cached(compress_variant, force=True)
        results = [(r, dict(again(cfg.compress, cfg.tracking, parent, r, force=force)), False)
                   if row["model"] in gone else (r, row, hit) for r, row, hit in results]
    rows, summary = [], []
    for recipe, row, hit in results:
        if hit:
            row["reused"] = True
        rows.append(row)
        inc = row.get("loss_increase")
        # the rungs ran side by side: each row's time is the stage's wall time so far
        summary.append(summary_row(f"compress {recipe.name}", row["model"], "lm_loss", row.get("lm_loss"),
                                   time.perf_counter() - t0, row.get("reused", False),
                                   note="" if inc is None else f"{inc:+.1%} vs parent"))
    table = ladder_table(cfg.tracking, model_uri, rows)
    return {"variants": [r["model"] for r in rows], "ladder": table, "summary": summary}
