"""The compression stage as a Prefect flow."""

from __future__ import annotations

from prefect import flow

from tasks.compress import compress_variant, ladder_table, resolve_recipes
from tasks.config import LifecycleConfig


@flow(name="compress", log_prints=True)
def compress_flow(model_uri: str, recipes: str | None = None, config: dict | None = None) -> dict:
    """Compress a registered model into size variants.

    Steps:
      1. compress-variant, once per recipe: prune / distill / quantize / MoEfy, measure, register
         `<base>-<recipe>` with its parent's lineage and alias `candidate`
      2. ladder-table: the variants side by side (MLflow table, Prefect artifact, plot)
    """
    cfg = LifecycleConfig.model_validate(config or {})
    rows = [compress_variant(cfg, model_uri, r) for r in resolve_recipes(recipes or cfg.compress.recipes)]
    table = ladder_table(cfg, model_uri, rows)
    return {"variants": [r["model"] for r in rows], "ladder": table}
