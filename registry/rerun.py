"""Reading a past run back from the tracking store, for `cpmant rerun`: the config it ran with (rebuilt from its
config artifact, params and tags), its data hash and code version, its parent's run, and every metric it logged;
then comparing two runs' metrics.

    resolve_run_id(ref) -> str              a run id or a model URI (models:/NAME/VERSION, models:/NAME@ALIAS)
    read_run(ref) -> RecordedRun
    recorded_chain(ref) -> list[RecordedRun]     the training runs to replay, parents first (pretrain, then compress);
                                                 a lifecycle or stage run stands for the training runs under it
    metric_histories(run_id) -> {name: [(step, value), ...]}
    compare_metrics(histories_a, histories_b) -> dict   every reproducible metric, equal to the last digit or listed
    in_home(home)                           a context: CPMANT_HOME = home and its own default store, then restored
    version_record(uri) -> (run id, data sha256)   of a version the rerun registered

Where a config comes from, best first: the run's `config.json` artifact (the whole resolved LifecycleConfig, when a
stage logs it); else a pretraining run's `config/config.yaml` (its PretrainConfig as the loop ran it) or a
compression run's params (the recipe's methods and the CompressConfig fields it uses), with the tracking section
from the `tracking.*` params and the experiment's name.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from cpmant.errors import CpmantError

from . import tags as T

# metrics that measure the machine's speed or draw, not the computation: never equal between two runs
TIMING_METRICS = frozenset({"duration_s", "energy_kwh", "emissions_kg_co2e", "cost_rmb", "mfu", "peak_flops",
                            "peak_memory_mb"})
RERUN_STAGES = ("pretrain", "compress")
CONFIG_ARTIFACT = "config.json"  # the whole resolved LifecycleConfig (mlflow.log_dict(cfg, "config.json"))


def is_timing_metric(name: str) -> bool:
    """Wall time, throughput, energy, emissions, cost, utilisation: what a rerun cannot reproduce."""
    return (name in TIMING_METRICS or name.endswith(("_seconds", "_s")) or "tokens_per_second" in name
            or name.startswith("parent_generation"))


@dataclass
class RecordedRun:
    run_id: str
    run_name: str
    stage: str
    experiment: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    git_sha: str
    data_sha256: str
    parent: str  # the parent version's models:/NAME/VERSION ('' for a base)
    version: str | None  # the version this run registered
    config: dict  # LifecycleConfig-shaped sections (pretrain / compress / tracking)
    recipe: dict | None = None  # a compression run's recipe (name, methods, published_loss_increase)
    config_source: str = ""  # where `config` was read from
    missing: list[str] = field(default_factory=list)  # what the run did not record (said in the output)


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def resolve_run_id(ref: str) -> str:
    """A run id as it is, or the run that registered a model version."""
    from mlflow.exceptions import MlflowException

    from .pulling import resolve_version
    from .tracking import setup_tracking

    if not isinstance(ref, str) or not ref.strip():
        raise CpmantError("no run given", "pass a run id (see the MLflow UI) or a model URI models:/NAME/VERSION")
    setup_tracking()
    ref = ref.strip()
    client = _client()
    if ref.startswith("models:/"):
        name, version = resolve_version(ref)
        mv = client.get_model_version(name, str(version))
        if not mv.run_id:
            raise CpmantError(f"{ref} was registered without a run", "rerun the run that made it, by its run id")
        return mv.run_id
    try:
        return client.get_run(ref).info.run_id
    except MlflowException:
        from .tracking import tracking_uri

        raise CpmantError(f"no run {ref!r} in the tracking store {tracking_uri()}",
                          "pass a run id from that store (the MLflow UI shows it), or a model URI; "
                          "MLFLOW_TRACKING_URI / CPMANT_HOME choose the store") from None


def _version_of_run(run_id: str) -> tuple[str | None, dict]:
    for mv in _client().search_model_versions(f"run_id = '{run_id}'"):
        return f"models:/{mv.name}/{mv.version}", dict(mv.tags or {})
    return None, {}


def _parse(text: str):
    """A param value back to the value it was written from (str() of an int, float, bool, None, list or text)."""
    import yaml

    if text == "None":
        return None
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, float) and not math.isfinite(v):
        return text
    return v


def _load_artifact(run_id: str, path: str):
    import mlflow

    try:
        if path.endswith(".json"):
            return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except Exception:  # not logged by this run
        return None


def _tracking_section(run, experiment: str) -> dict:
    p = run.data.params
    out = {"experiment": experiment}
    for k in ("country_iso_code", "device"):
        if f"tracking.{k}" in p:
            out[k] = p[f"tracking.{k}"]
    if "tracking.devices" in p:
        out["devices"] = int(p["tracking.devices"])
    return out


def _compress_from_params(params: dict[str, str]) -> tuple[dict, dict]:
    """(the compress section, the recipe) from a compression run's params."""
    compress = {k[len("compress."):]: _parse(v) for k, v in params.items() if k.startswith("compress.")}
    if "precision_setting" in params:  # `compress.precision` is recorded resolved; the setting is what ran
        compress["precision"] = params["precision_setting"]
    name = params.get("recipe.name")
    if not name:
        raise CpmantError("the compression run records no recipe.name param", "rerun it with `cpmant compress`")
    methods = []
    for m in [x for x in params.get("recipe.methods", "").split(",") if x]:
        fields = {k[len(m) + 1:]: _parse(v) for k, v in params.items() if k.startswith(m + ".")}
        methods.append({"name": m, **fields})
    recipe = {"name": name, "methods": methods or None,
              "published_loss_increase": _parse(params.get("recipe.published_loss_increase", "None"))}
    if recipe["methods"] is None:
        recipe.pop("methods")
    compress["recipes"] = name
    return compress, recipe


def read_run(ref: str) -> RecordedRun:
    """Everything a rerun needs from a recorded run (a run id or a model URI)."""
    import yaml

    run_id = resolve_run_id(ref)
    client = _client()
    run = client.get_run(run_id)
    tags, params = dict(run.data.tags), dict(run.data.params)
    stage = tags.get(T.STAGE, "")
    experiment = client.get_experiment(run.info.experiment_id).name
    version, vtags = _version_of_run(run_id)
    git_sha = tags.get(T.GIT_SHA) or vtags.get(T.GIT_SHA) or tags.get("mlflow.source.git.commit", "")
    data_sha = (tags.get(T.DATA_SHA256) or vtags.get(T.DATA_SHA256) or params.get("data.data_sha256", ""))
    missing: list[str] = []
    full = _load_artifact(run_id, CONFIG_ARTIFACT)
    recipe = None
    if isinstance(full, dict) and full:
        config, source = full, CONFIG_ARTIFACT
        if stage == "compress":
            _, recipe = _compress_from_params(params)
            if isinstance(full.get("recipe"), dict):
                recipe = full["recipe"]
    elif stage == "pretrain":
        text = _load_artifact(run_id, "config/config.yaml")
        if not text:
            raise CpmantError(f"run {run_id} logged no config (config.json or config/config.yaml)",
                              "it predates config logging: run the stage again with the same settings")
        config = {"pretrain": yaml.safe_load(text), "tracking": _tracking_section(run, experiment)}
        source = "config/config.yaml + tracking.* params"
        missing.append("the tracking section beyond country, device and devices (defaults used)")
    elif stage == "compress":
        compress, recipe = _compress_from_params(params)
        config = {"compress": compress, "tracking": _tracking_section(run, experiment)}
        source = "params (recipe, methods, compress.*) + tracking.* params"
        missing.append("the compress settings the recipe does not use (defaults used)")
    else:
        raise CpmantError(f"run {run_id} is a {stage or 'untagged'} run; rerun replays the training stages "
                          f"({', '.join(RERUN_STAGES)})",
                          "pass a pretraining or compression run, or a model URI of cpm-ant-<preset> or a variant")
    if not git_sha:
        missing.append("the code version")
    return RecordedRun(run_id=run_id, run_name=run.info.run_name, stage=stage, experiment=experiment, params=params,
                       tags=tags, metrics=dict(run.data.metrics), git_sha=git_sha, data_sha256=data_sha,
                       parent=tags.get(T.PARENT) or vtags.get(T.PARENT, ""), version=version, config=config,
                       recipe=recipe, config_source=source, missing=missing)


def _descendants(run_id: str, depth: int = 3) -> list:
    """The runs nested under `run_id` (mlflow.parentRunId), `depth` levels down, oldest first."""
    client = _client()
    exp = client.get_run(run_id).info.experiment_id
    out, frontier = [], [run_id]
    for _ in range(depth):
        nxt = []
        for rid in frontier:
            nxt += client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{rid}'", max_results=1000)
        out += nxt
        frontier = [r.info.run_id for r in nxt]
        if not frontier:
            break
    return sorted(out, key=lambda r: r.info.start_time)


def recorded_chain(ref: str) -> list[RecordedRun]:
    """The training runs that made `ref`, oldest first: a pretraining run alone; a compression run after the
    pretraining run of its parent version. A run that trains nothing itself (the lifecycle's parent run, a stage's
    run) stands for the training runs nested under it that registered a version, each after its parents."""
    run_id = resolve_run_id(ref)
    stage = _client().get_run(run_id).data.tags.get(T.STAGE, "")
    if stage not in RERUN_STAGES:
        kids = [r for r in _descendants(run_id) if r.data.tags.get(T.STAGE) in RERUN_STAGES]
        kids = [r for r in kids if _version_of_run(r.info.run_id)[0]]
        if not kids:
            read_run(run_id)  # the clear error about what can be rerun
        chain: list[RecordedRun] = []
        for r in kids:
            for rec in recorded_chain(r.info.run_id):
                if rec.run_id not in {c.run_id for c in chain}:
                    chain.append(rec)
        return chain
    rec = read_run(run_id)
    chain = [rec]
    cur = rec
    while cur.parent:
        parent = read_run(cur.parent)
        chain.insert(0, parent)
        cur = parent
        if len(chain) > 8:
            raise CpmantError(f"the chain of {ref} is deeper than 8 runs", "check the cpmant.parent tags")
    if chain[0].stage != "pretrain":
        raise CpmantError(f"the chain of {ref} does not start at a pretraining run", "check the cpmant.parent tags")
    return chain


def metric_histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run with its whole history, sorted by step."""
    client = _client()
    run = client.get_run(run_id)
    out = {}
    for name in run.data.metrics:
        hist = client.get_metric_history(run_id, name)
        out[name] = sorted((m.step, m.value) for m in hist)
    return out


def compare_metrics(a: dict[str, list[tuple[int, float]]], b: dict[str, list[tuple[int, float]]]) -> dict:
    """Two runs' metric_histories -> {"compared": [names], "skipped": [timing names], "differences": ["name: step
    s: a != b", ...]}: every metric but the timing ones, each value at each step, exactly (to the last digit)."""
    compared, skipped, diffs = [], [], []
    for name in sorted(set(a) | set(b)):
        if is_timing_metric(name):
            skipped.append(name)
            continue
        compared.append(name)
        if name not in a or name not in b:
            diffs.append(f"{name}: logged by {'the rerun only' if name in b else 'the recorded run only'}")
            continue
        ha, hb = a[name], b[name]
        if [s for s, _ in ha] != [s for s, _ in hb]:
            diffs.append(f"{name}: steps {[s for s, _ in ha][:5]}... != {[s for s, _ in hb][:5]}...")
            continue
        for (s, va), (_, vb) in zip(ha, hb):
            if va != vb and not (math.isnan(va) and math.isnan(vb)):
                diffs.append(f"{name}: step {s}: {va!r} != {vb!r}")
                break
    return {"compared": compared, "skipped": skipped, "differences": diffs}


@contextlib.contextmanager
def in_home(home: Path):
    """CPMANT_HOME = home and the default store under it (MLFLOW_TRACKING_URI unset), for the duration; the
    environment and MLflow's tracking and registry URIs are restored afterwards."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("CPMANT_HOME", "MLFLOW_TRACKING_URI")}
    saved_uri, saved_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    os.environ["CPMANT_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow.set_tracking_uri(None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        mlflow.set_tracking_uri(saved_uri)
        mlflow.set_registry_uri(saved_registry)


def version_record(uri: str) -> tuple[str, str]:
    """(the run that registered it, its data sha256 tag or '') of models:/NAME/VERSION in the current store."""
    from .runs import model_version

    name, version = uri[len("models:/"):].rsplit("/", 1)
    mv = model_version(name, version)
    return mv.run_id, (mv.tags or {}).get(T.DATA_SHA256, "")
