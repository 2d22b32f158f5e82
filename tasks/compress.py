"""Prefect tasks of the compression stage: make one variant (tracked, registered, or reused), then the ladder table.

    fetch_parent(tracking, parent_uri) -> str   (the parent pinned to its version, its checkpoint in the local cache)
    compress_variant(compress, tracking, parent_uri, recipe, force=False) -> dict   (reused by its one key)
    ladder_table(tracking, parent_uri, rows) -> list[dict]

A variant's reuse key is cpmant.compress.pipeline.variant_key, with the parent's checkpoint sha256 as its version
records it (never hashed again); one registry lookup by that key (tag cpmant.inputs_sha256) decides reuse
(tasks/reuse.py), and the key in the variant folder's metadata lets a made variant whose registration failed be
registered without being made again. MLflow is reached through registry/ (runs.py, stage_records.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from cpmant.compress.config import CompressConfig
from cpmant.compress.pipeline import (VariantKey, compress_checkpoint, describe_variant, final_metrics,
                                      recipe_params, variant_key)
from cpmant.compress.recipe import PUBLISHED_LABEL, Recipe, get_recipes
from cpmant.paths import subdir
from registry import runs, stage_records
from registry import tags as T
from registry.pulling import checkpoint_dir, resolve_version
from registry.tracking import setup_tracking

from .candidates import new_version_alias
from .config import TrackingConfig
from .outcomes import log_lines
from .reuse import decide, reused_state
from .metering import AsyncMetricLogger, MlflowCallbacks, retry_transient, tracked_stage
from .metering import recorded_tracking as _recorded_tracking

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


def _reused_row(uri: str, recipe: Recipe) -> dict:
    """The row of an existing version: its run's report."""
    row = stage_records.variant_report(uri)
    log_lines(f"{uri}: {row['description']}")
    return {**row, "model": uri, "reused": True, "published_loss_increase": recipe.published_loss_increase}


@task(name="fetch-parent", task_run_name="fetch-parent", cache_policy=NONE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def fetch_parent(tracking: TrackingConfig, parent_uri: str) -> str:
    """The parent pinned to models:/NAME/VERSION (an alias could move while the rungs run) and its checkpoint in
    the local model cache, verified, once: the rungs then read it at the same time without racing to download."""
    setup_tracking(tracking.experiment)
    name, version = resolve_version(parent_uri)
    pinned = f"models:/{name}/{version}"
    checkpoint_dir(pinned)
    return pinned


def _decide(compress: CompressConfig, recipe: Recipe, parent_uri: str, force: bool):
    """(parent pinned, its folder, the variant's key, the reuse decision): one registry lookup by the key."""
    name, version = resolve_version(parent_uri)
    parent = f"models:/{name}/{version}"
    parent_dir = checkpoint_dir(parent)
    variant = f"{name}-{recipe.name}"
    key = variant_key(parent_dir, recipe, compress, parent_uri=parent,
                      parent_checkpoint_sha256=stage_records.recorded_checkpoint_sha256(parent))
    found = None if force else stage_records.find_by_key(variant, key.config_sha256)
    return parent, parent_dir, key, decide(f"compress {recipe.name}", key.config_sha256, found, variant, force)


def _make(compress: CompressConfig, tracking: TrackingConfig, recipe: Recipe, parent: str, parent_dir: Path,
          key: VariantKey, force: bool) -> dict:
    """Make, measure and register the variant in a tracked run (a finished one of the same key on disk is
    registered without being made again); its ladder row."""
    name = parent.removeprefix("models:/").rsplit("/", 1)[0]
    out = (Path(compress.output_dir) / name) if compress.output_dir else subdir("runs", f"compress-{name}")
    if force:
        shutil.rmtree(out / recipe.name, ignore_errors=True)  # made again from scratch (distillation too)
    with tracked_stage(tracking, f"compress-{recipe.name}", tags={T.STAGE: "compress", T.PARENT: parent}) as run:
        runs.log_params({**recipe_params(recipe, compress), **_data_params(parent_dir)})
        # the whole resolved config and the code version, for `cpmant rerun`
        runs.log_dict({"compress": compress.model_dump(mode="json"), "tracking": _recorded_tracking(tracking),
                       "recipe": recipe.model_dump(mode="json")}, "config.json")
        runs.set_tags({T.GIT_SHA: key.git_sha, T.INPUTS_SHA256: key.config_sha256})
        logger = AsyncMetricLogger(run.info.run_id, tracking.metric_flush_steps)
        try:
            report = compress_checkpoint(parent_dir, recipe, compress, out / recipe.name, parent_uri=parent,
                                         callbacks=MlflowCallbacks(logger), key=key)
        finally:
            logger.close()
        run.final_step = int(report.get("final_step") or 0)  # the last distillation step (0 without training)
        run.log_final(final_metrics(report))
        runs.log_dict(report, stage_records.REPORT)
        description = describe_variant(recipe, parent, report)
        variant = f"{name}-{recipe.name}"
        reg = stage_records.register_keyed(out / recipe.name / "model", variant, key.config_sha256, stage="compress",
                                           parent=parent, description=description,
                                           alias=new_version_alias(tracking, variant))
    log_lines(f"{reg.uri}: {description}", f"MLflow run {run.info.run_id}")  # the task run's log in Prefect
    return {**report, "model": reg.uri, "run_id": run.info.run_id, "reused": False, "description": description,
            "published_loss_increase": recipe.published_loss_increase}


@task(name="compress-variant", task_run_name=_variant_run_name, retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_transient, cache_policy=NONE)
def compress_variant(compress: CompressConfig, tracking: TrackingConfig, parent_uri: str, recipe: Recipe | str,
                     force: bool = False):
    """Make, measure and register `<base>-<recipe>` from `parent_uri` inside a tracked MLflow run. A version
    registered with the same reuse key (recipe and method configs, the compress settings it uses, parent version
    and its checkpoint sha256, data, held-out rows, code) is returned instead, as a `Reused` state whose message is
    the reason, without a new run; `force` makes a new one. The row carries the decision's `reason`."""
    recipe = _as_recipe(recipe)
    setup_tracking(tracking.experiment)
    parent, parent_dir, key, reuse = _decide(compress, recipe, parent_uri, force)
    if reuse.reused:
        return reused_state(reuse, {**_reused_row(reuse.found, recipe), "reason": reuse.reason})
    return {**_make(compress, tracking, recipe, parent, parent_dir, key, force), "reason": reuse.reason}


@task(name="ladder-table", task_run_name="ladder-table", cache_policy=NONE)
def ladder_table(tracking: TrackingConfig, parent_uri: str, rows: list[dict]) -> list[dict]:
    """The ladder in CPM-Live's shape, as an MLflow table (in a `compress-ladder` run) and a Prefect artifact,
    with a plot of LM loss against parameters and the published increases beside ours. The published increase is
    a reference figure, in a labelled column ("published loss increase (CPM-Ant 10B ladder)")."""
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
        runs.log_table({COLUMN_LABELS.get(c, c): [r[c] for r in table] for c in LADDER_COLUMNS}, "ladder.json")
        png = plot_ladder(table, subdir("runs") / "ladder.png")
        if png:
            runs.log_artifact(str(png), "plots")
    fmt = [{k: (f"{v:.4g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()}
           for r in labelled]
    create_table_artifact(fmt, key="compression-ladder", description=f"Size ladder from {parent_uri}")
    return table
