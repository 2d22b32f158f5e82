"""The delta-tuning stage's one reuse rule: a zero-shot run and a delta version are reused when their reuse key
matches (tag cpmant.inputs_sha256). Each key is cpmant.hashing.sha256_json over every input that shapes the result:

    zero-shot: the base version and its recorded checkpoint sha256, the task, its test examples' hash, the scoring
               settings (eval batch size, max examples, precision), the code version
    delta:     the same base, task and code, the hash of its train/valid/test examples, the method and the settings
               that decide its weights (`tune_settings`: the loop's settings, this method's lr or lr grid, params)

The task's examples are hashed as loaded (whatever files they came from), never the base's weights: the base's
recorded `cpmant.checkpoint_sha256` tag stands for them.
"""

from __future__ import annotations

from cpmant.hashing import sha256_json
from registry.tune_records import BaseVersion

from ..config import TuneConfig
from .names import SPLITS, ZERO_SHOT, get_task

# the TuneConfig fields that do not decide a delta: the task and method lists (the key names the task and method),
# the data folder (the examples are hashed instead), the lr fields (replaced by this method's lr or grid)
NOT_SETTINGS = ("tasks", "methods", "data", "lr", "lr_grid", "sweep_lr", "method_params")


def _code() -> str:
    from cpmant.checkpoint import git_sha  # imported when first needed: cpmant.checkpoint loads torch

    return git_sha()


def load_split(task_name: str, split: str, tune: TuneConfig):
    """One split of a task's examples (its raw files under tune.data or $CUGE_DATA/<task>; demo tasks build
    theirs from the corpus); malformed rows above tune.malformed_threshold fail naming the file and line."""
    return get_task(task_name).load(split, data_dir=tune.data, malformed_threshold=tune.malformed_threshold)


def load_splits(task_name: str, tune: TuneConfig) -> dict:
    return {s: load_split(task_name, s, tune) for s in SPLITS}


def examples_sha256(splits: dict) -> str:
    """The hash of loaded examples by split (what the tuning and the scores depend on)."""
    return sha256_json({s: list(ex) for s, ex in splits.items()})


def tune_settings(tune: TuneConfig, method: str) -> dict:
    """The config fields that decide `method`'s delta: the loop's settings, this method's learning rate (its lr grid
    when tune.sweep_lr) and params."""
    d = tune.model_dump(mode="json")
    out = {k: v for k, v in d.items() if k not in NOT_SETTINGS}
    lr = {"lr_grid": list(tune.lr_grid_for(method))} if tune.sweep_lr else {"lr": tune.lr_for(method)}
    return {**out, **lr, "params": d["method_params"].get(method) or {}}


def eval_settings(tune: TuneConfig) -> dict:
    """What decides a zero-shot score besides the base and the examples."""
    return {"eval_batch_size": tune.eval_batch_size, "max_eval_examples": tune.max_eval_examples,
            "precision": tune.precision}


def zero_shot_key(base: BaseVersion, task_name: str, data_sha: str, tune: TuneConfig) -> str:
    return sha256_json({"kind": ZERO_SHOT, "base": base.uri, "base_sha": base.checkpoint_sha256, "task": task_name,
                        "data": data_sha, "settings": eval_settings(tune), "code": _code()})


def delta_key(base: BaseVersion, task_name: str, data_sha: str, method: str, settings: dict) -> str:
    return sha256_json({"kind": "delta", "base": base.uri, "base_sha": base.checkpoint_sha256, "task": task_name,
                        "data": data_sha, "method": method, "settings": settings, "code": _code()})


def config_sha256(method: str, settings: dict) -> str:
    """The contract's `cpmant.config_sha256` of a delta: its method and tuning settings."""
    return sha256_json({"method": method, "settings": settings})
