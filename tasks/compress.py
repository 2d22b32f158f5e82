"""Prefect tasks of the compression stage: make one variant (tracked, registered), then the ladder table."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from cpmant.compress.pipeline import compress_checkpoint
from cpmant.compress.recipe import Recipe, get_recipes
from cpmant.paths import subdir

from .config import LifecycleConfig
from .tracking import AsyncMetricLogger, MlflowCallbacks, finite, tracked_stage

LADDER_COLUMNS = ["model", "attention_layers", "ffn_layers", "num_heads", "dim_ff", "params", "bytes_on_disk",
                  "lm_loss", "perplexity", "loss_increase", "published_loss_increase", "generation_tokens_per_second"]


def resolve_recipes(spec: str) -> list[Recipe]:
    """Recipe names, `all`, comma lists or YAML paths -> recipes (a clear error for an unknown one)."""
    return get_recipes(spec)


@task(name="compress-variant", cache_policy=NONE)
def compress_variant(cfg: LifecycleConfig, parent_uri: str, recipe: Recipe) -> dict:
    """Make, measure and register `<base>-<recipe>` from `parent_uri` inside a tracked MLflow run."""
    import mlflow

    from registry.pull import checkpoint_dir, resolve_version
    from registry.register import register_checkpoint
    from registry.tracking import setup_tracking

    setup_tracking(cfg.tracking.experiment)
    name, version = resolve_version(parent_uri)
    parent = f"models:/{name}/{version}"
    parent_dir = checkpoint_dir(parent)
    out = (Path(cfg.compress.output_dir) / name) if cfg.compress.output_dir else subdir("runs", f"compress-{name}")
    variant = f"{name}-{recipe.name}"
    with tracked_stage(cfg.tracking, f"compress-{recipe.name}",
                       tags={"cpmant.stage": "compress", "cpmant.parent": parent}) as run:
        mlflow.log_params({f"recipe.{k}": str(v)[:500] for k, v in recipe.model_dump(mode="json").items()})
        mlflow.log_params({f"compress.{k}": str(v)[:500] for k, v in cfg.compress.model_dump(mode="json").items()})
        logger = AsyncMetricLogger(run.info.run_id, cfg.tracking.metric_flush_steps)
        try:
            report = compress_checkpoint(parent_dir, recipe, cfg.compress, out / recipe.name, parent_uri=parent,
                                         callbacks=MlflowCallbacks(logger))
        finally:
            logger.close()
        mlflow.log_metrics(finite({k: v for k, v in report.items() if isinstance(v, (int, float))
                                   and not isinstance(v, bool)}))
        mlflow.log_dict(report, "compress_report.json")
        reg = register_checkpoint(out / recipe.name / "model", variant, stage="compress", parent=parent)
    return {"model": reg.uri, "run_id": run.info.run_id, **report}


@task(name="ladder-table", cache_policy=NONE)
def ladder_table(cfg: LifecycleConfig, parent_uri: str, rows: list[dict]) -> list[dict]:
    """The ladder in CPM-Live's shape, as an MLflow table (in a `compress-ladder` run) and a Prefect artifact,
    with a plot of LM loss against parameters and the published increases beside ours."""
    import mlflow

    from .plots import plot_ladder
    from .tracking import tracked_stage

    table = [{c: r.get(c) for c in LADDER_COLUMNS} for r in rows]
    if rows:
        first = rows[0]
        parent_row = {"model": parent_uri, "attention_layers": None, "ffn_layers": None, "num_heads": None,
                      "dim_ff": None, "params": first["parent_params"], "bytes_on_disk": first["parent_bytes_on_disk"],
                      "lm_loss": first["parent_lm_loss"], "perplexity": None, "loss_increase": 0.0,
                      "published_loss_increase": 0.0,
                      "generation_tokens_per_second": first["parent_generation_tokens_per_second"]}
        table = [parent_row] + table
    with tracked_stage(cfg.tracking, "compress-ladder", tags={"cpmant.stage": "compress"}):
        mlflow.log_table({c: [r[c] for r in table] for c in LADDER_COLUMNS}, "ladder.json")
        png = plot_ladder(table, subdir("runs") / "ladder.png")
        if png:
            mlflow.log_artifact(str(png), artifact_path="plots")
    fmt = [{k: (f"{v:.4g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()}
           for r in table]
    create_table_artifact(fmt, key="compression-ladder", description=f"Size ladder from {parent_uri}")
    return table
