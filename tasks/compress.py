"""Prefect tasks of the compression stage: make one variant (tracked, registered, or reused), then the ladder table.

    fetch_parent(tracking, parent_uri) -> str   (the parent pinned to its version, its checkpoint in the local cache)
    compress_variant(compress, tracking, parent_uri, recipe, force=False) -> dict   (Prefect-cached: ContentHash)
    ladder_table(tracking, parent_uri, rows) -> list[dict]
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from cpmant.compress.config import CompressConfig
from cpmant.compress.pipeline import (compress_checkpoint, describe_variant, final_metrics, recipe_params,
                                      variant_key)
from cpmant.compress.recipe import PUBLISHED_LABEL, Recipe, get_recipes
from cpmant.paths import subdir
from registry import tags as T

from .aliases import new_version_alias
from .caching import ContentHash
from .config import TrackingConfig
from .outcomes import log_lines
from .tracking import AsyncMetricLogger, MlflowCallbacks, retry_transient, tracked_stage
from .tracking import recorded_tracking as _recorded_tracking

# the ladder's columns: report keys, with the published reference figure a labelled column (never a metric)
# `name` first: the short version name (cpm-ant-tiny-3b/1), which MLflow's table view shows whole
LADDER_COLUMNS = ["name", "recipe", "model", "attention_layers", "ffn_layers", "num_heads", "dim_ff", "params",
                  "bytes_on_disk", "lm_loss", "perplexity", "loss_increase", "published_loss_increase",
                  "generation_tokens_per_second"]
SHAPE_COLUMNS = ("attention_layers", "ffn_layers", "num_heads", "dim_ff")
COLUMN_LABELS = {"published_loss_increase": PUBLISHED_LABEL}


def resolve_recipes(spec: str) -> list[Recipe]:
    """Recipe names, `all`, comma lists or YAML paths -> recipes (a clear error for an unknown one)."""
    return get_recipes(spec)


def _as_recipe(recipe: Recipe | str) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    found = get_recipes(str(recipe))
    if len(found) != 1:
        from cpmant.errors import CpmantError

        raise CpmantError(f"{recipe!r} names {len(found)} recipes, compress_variant makes one",
                          "pass one recipe name or YAML file (the flow loops over a list)")
    return found[0]


def _variant_run_name() -> str:
    """compress-<recipe>: what the task run does."""
    from prefect.runtime import task_run

    r = task_run.parameters.get("recipe")
    try:
        return f"compress-{_as_recipe(r).name}"
    except Exception:  # a bad recipe fails in the task itself, with its message
        return "compress-variant"


def _data_params(parent_dir: Path) -> dict[str, str]:
    from cpmant.checkpoint import CONFIG_FILE
    from cpmant.config import ModelConfig
    from cpmant.lineage import read_lineage

    lin = read_lineage(parent_dir)
    return {"data.corpus": lin.corpus or lin.corpus_name, "data.corpus_name": lin.corpus_name,
            "data.valid_fraction": str(lin.valid_fraction), "data.seed": str(lin.seed),
            "data.data_sha256": lin.data_sha256,
            "data.vocab_size": str(ModelConfig.load(parent_dir / CONFIG_FILE).vocab_size)}


def _reused(uri: str, recipe: Recipe) -> dict:
    """The row of an existing version: its run's report."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name, version = uri[len("models:/"):].rsplit("/", 1)
    mv = MlflowClient().get_model_version(name, version)
    report = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/compress_report.json")
    log_lines(f"reusing {uri} (same parent, recipe, data and code): {mv.description or ''}")
    return {**report, "model": uri, "run_id": mv.run_id, "reused": True, "description": mv.description or "",
            "published_loss_increase": recipe.published_loss_increase}


@task(name="fetch-parent", task_run_name="fetch-parent", cache_policy=NONE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def fetch_parent(tracking: TrackingConfig, parent_uri: str) -> str:
    """The parent pinned to models:/NAME/VERSION (an alias could move while the rungs run) and its checkpoint in
    the local model cache, verified, once: the rungs then read it at the same time without racing to download."""
    from registry.pulling import checkpoint_dir, resolve_version
    from registry.tracking import setup_tracking

    setup_tracking(tracking.experiment)
    name, version = resolve_version(parent_uri)
    pinned = f"models:/{name}/{version}"
    checkpoint_dir(pinned)
    return pinned


@task(name="compress-variant", task_run_name=_variant_run_name, retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_transient,
      cache_policy=ContentHash())
def compress_variant(compress: CompressConfig, tracking: TrackingConfig, parent_uri: str, recipe: Recipe | str,
                     force: bool = False) -> dict:
    """Make, measure and register `<base>-<recipe>` from `parent_uri` inside a tracked MLflow run. A version made
    from the same inputs (recipe and method configs, the compress settings it uses, parent version, data, code)
    is returned instead, without a new run; `force` makes a new one."""
    import mlflow

    from registry.pulling import checkpoint_dir, resolve_version
    from registry.register import find_version, register_checkpoint
    from registry.tracking import setup_tracking

    recipe = _as_recipe(recipe)
    setup_tracking(tracking.experiment)
    name, version = resolve_version(parent_uri)
    parent = f"models:/{name}/{version}"
    parent_dir = checkpoint_dir(parent)
    variant = f"{name}-{recipe.name}"
    key = variant_key(parent_dir, recipe, compress)
    if not force:
        found = find_version(variant, {T.CONFIG_SHA256: key.config_sha256, T.PARENT: parent,
                                       T.DATA_SHA256: key.data_sha256, T.GIT_SHA: key.git_sha})
        if found:
            return _reused(found, recipe)
    out = (Path(compress.output_dir) / name) if compress.output_dir else subdir("runs", f"compress-{name}")
    if force:
        shutil.rmtree(out / recipe.name, ignore_errors=True)  # made again from scratch (distillation too)
    tags = {T.STAGE: "compress", T.PARENT: parent}
    with tracked_stage(tracking, f"compress-{recipe.name}", tags=tags) as run:
        mlflow.log_params({k: v[:500] for k, v in {**recipe_params(recipe, compress),
                                                   **_data_params(parent_dir)}.items()})
        # the whole resolved config and the code version, for `cpmant rerun`
        mlflow.log_dict({"compress": compress.model_dump(mode="json"), "tracking": _recorded_tracking(tracking),
                         "recipe": recipe.model_dump(mode="json")}, "config.json")
        mlflow.set_tag(T.GIT_SHA, key.git_sha)
        logger = AsyncMetricLogger(run.info.run_id, tracking.metric_flush_steps)
        try:
            report = compress_checkpoint(parent_dir, recipe, compress, out / recipe.name, parent_uri=parent,
                                         callbacks=MlflowCallbacks(logger))
        finally:
            logger.close()
        run.final_step = int(report.get("final_step") or 0)  # the last distillation step (0 without training)
        run.log_final(final_metrics(report))
        mlflow.log_dict(report, "compress_report.json")
        description = describe_variant(recipe, parent, report)
        reg = register_checkpoint(out / recipe.name / "model", variant, stage="compress", parent=parent,
                                  extra_tags={T.INPUTS_SHA256: key.config_sha256}, description=description,
                                  alias=new_version_alias(tracking, variant))
    log_lines(f"{reg.uri}: {description}", f"MLflow run {run.info.run_id}")  # the task run's log in Prefect
    return {**report, "model": reg.uri, "run_id": run.info.run_id, "reused": False, "description": description,
            "published_loss_increase": recipe.published_loss_increase}


@task(name="ladder-table", task_run_name="ladder-table", cache_policy=NONE)
def ladder_table(tracking: TrackingConfig, parent_uri: str, rows: list[dict]) -> list[dict]:
    """The ladder in CPM-Live's shape, as an MLflow table (in a `compress-ladder` run) and a Prefect artifact,
    with a plot of LM loss against parameters and the published increases beside ours. The published increase is
    a reference figure, in a labelled column ("published loss increase (CPM-Ant 10B ladder)")."""
    import mlflow

    from .plots import plot_ladder

    table = [{c: r.get(c) for c in LADDER_COLUMNS} for r in rows]
    if rows:
        first = rows[0]
        # the parent's shape as the variant's report gives it (a variant made before it did: None)
        parent_row = {"recipe": "base", "model": parent_uri, **{c: first.get(f"parent_{c}") for c in SHAPE_COLUMNS},
                      "params": first["parent_params"], "bytes_on_disk": first["parent_bytes_on_disk"],
                      "lm_loss": first["parent_lm_loss"], "perplexity": first.get("parent_perplexity"),
                      "loss_increase": 0.0,
                      "published_loss_increase": 0.0,
                      "generation_tokens_per_second": first["parent_generation_tokens_per_second"]}
        table = [parent_row] + table
    for r in table:
        r["name"] = str(r["model"]).removeprefix("models:/")
    if rows and all(r.get("reused") for r in rows):  # nothing new: the ladder of these versions is logged already
        return table
    labelled = [{COLUMN_LABELS.get(c, c): r[c] for c in LADDER_COLUMNS} for r in table]
    with tracked_stage(tracking, "compress-ladder", tags={T.STAGE: "compress"}):
        mlflow.log_table({COLUMN_LABELS.get(c, c): [r[c] for r in table] for c in LADDER_COLUMNS}, "ladder.json")
        png = plot_ladder(table, subdir("runs") / "ladder.png")
        if png:
            mlflow.log_artifact(str(png), artifact_path="plots")
    fmt = [{k: (f"{v:.4g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()}
           for r in labelled]
    create_table_artifact(fmt, key="compression-ladder", description=f"Size ladder from {parent_uri}")
    return table
