"""Prefect tasks of the delta-tuning stage: the zero-shot score of the base per task (cached per base version), one
tracked and registered delta per (model, task, method) (or the existing one), then a comparison table per task.

    resolve_tasks(spec) -> list[str]             an unknown task lists the known ones
    resolve_methods(spec) -> list[str]           an unknown method lists the known ones
    zero_shot(tune, tracking, base_uri, task) -> dict
    tune_delta(tune, tracking, base_uri, task, method, force=False) -> dict
    comparison_table(tracking, base_uri, task, zero, rows, tune=None) -> list[dict]

The core does the work: `cpmant.cuge` (tasks: loading, formatting, metrics) and `cpmant.delta` (methods through
OpenDelta, the tuning loop, delta-only checkpoints). These tasks record it: params, `trainable_params`,
`trainable_ratio`, `delta_bytes`, `eval_<metric>` per epoch (step = epoch), the test scores with their 95%
intervals (`test_<metric>`, `_ci_low`, `_ci_high`) and per-example predictions (`predictions/test.jsonl`, what the
comparison step pairs: `vs_zero_shot_<primary>`, `vs_full_<primary>`, `ratio_to_full_<primary>` with intervals),
energy, emissions, cost (tracked_stage), and register `<model>-<task>-<method>` with `cpmant.stage=delta` and
`cpmant.parent` = the base version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from cpmant.errors import CpmantError
from cpmant.paths import subdir
from registry import tags as T

from .aliases import new_version_alias
from .config import TrackingConfig, TuneConfig
from .outcomes import log_lines
from .tracking import AsyncMetricLogger, finite, tracked_stage

TASK_TAG, METHOD_TAG = T.TASK, T.METHOD  # a delta's task and method (version and run tags)
TASK_DATA_TAG = "cpmant.task_data_sha256"  # the task's examples (train, valid, test) as loaded
KIND_TAG = "cpmant.tune.kind"  # run tag: zero-shot | delta | comparison
ZERO_SHOT = "zero-shot"
FULL = "full"
EVAL_SPLIT = "test"  # every row of a comparison table is scored on the same split
# the comparison table's columns: each score with its 95% interval; the paired differences (points, method minus
# zero-shot / full) and the ratio to full, each with the paired interval over the same test examples
TABLE_COLUMNS = ["task", "method", "model", "metric", "score", "score_ci_low", "score_ci_high",
                 "vs_zero_shot", "vs_zero_shot_ci_low", "vs_zero_shot_ci_high", "vs_full", "vs_full_ci_low",
                 "vs_full_ci_high", "ratio_to_full", "ratio_to_full_ci_low", "ratio_to_full_ci_high",
                 "trainable_params", "trainable_ratio", "delta_bytes", "delta_bytes_ratio", "seconds", "reused",
                 "reading"]
DEMO_NOTE = "demo task built from the installed corpus: not a CUGE score"


# ---- the core, in one place (cpmant.cuge and cpmant.delta) ---------------------------------------------------------
def _cuge():
    """The task registry: `get_task(name)`, `task_names()` (imported when first needed: it loads torch)."""
    import cpmant.cuge as cuge

    return cuge


def task_names() -> list[str]:
    return list(_cuge().task_names())


def method_names() -> list[str]:
    from cpmant.delta import methods

    return list(methods.method_names())


def _split_names(spec: str | list | tuple | None) -> list[str]:
    if isinstance(spec, (list, tuple)):
        spec = ",".join(map(str, spec))
    return [s.strip() for s in str(spec or "").split(",") if s.strip()]


def resolve_tasks(spec) -> list[str]:
    """Task names from a comma list; an unknown or empty one is a CpmantError listing the known tasks."""
    known = task_names()
    names = _split_names(spec)
    bad = [n for n in names if n not in known]
    if bad or not names:
        what = f"unknown task {', '.join(map(repr, bad))}" if bad else "no task given"
        raise CpmantError(what, f"choose from: {', '.join(known)} (a comma list tunes several)")
    return list(dict.fromkeys(names))


def resolve_methods(spec) -> list[str]:
    """Method names from a comma list (`full` = full fine-tuning); an unknown one lists the known methods."""
    known = method_names()
    names = _split_names(spec)
    bad = [n for n in names if n not in known]
    if bad or not names:
        what = f"unknown delta method {', '.join(map(repr, bad))}" if bad else "no method given"
        raise CpmantError(what, f"choose from: {', '.join(known)} (a comma list tunes several)")
    return list(dict.fromkeys(names))


def load_split(task_name: str, split: str, tune: TuneConfig):
    """One split of a task's examples (its raw files under tune.data or $CUGE_DATA/<task>; demo tasks build
    theirs from the corpus); malformed rows above tune.malformed_threshold fail naming the file and line."""
    return _cuge().get_task(task_name).load(split, data_dir=tune.data, malformed_threshold=tune.malformed_threshold)


def _jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if hasattr(x, "model_dump"):
        return x.model_dump(mode="json")
    return repr(x)


def examples_sha256(examples) -> str:
    """A hash of loaded examples (what the tuning and the scores depend on, whatever files they came from)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex, ensure_ascii=False, sort_keys=True, default=_jsonable).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _tune_settings(tune: TuneConfig, method: str) -> dict:
    """The config fields that decide `method`'s delta: the loop's settings, this method's learning rate (its lr grid
    when tune.sweep_lr) and params (not the task and method lists, nor the data folder: the task's examples are
    hashed instead)."""
    d = tune.model_dump(mode="json")
    out = {k: v for k, v in d.items() if k not in ("tasks", "methods", "data", "lr", "lr_grid", "sweep_lr",
                                                   "method_params")}
    lr = {"lr_grid": list(tune.lr_grid_for(method))} if tune.sweep_lr else {"lr": tune.lr_for(method)}
    return {**out, **lr, "params": d["method_params"].get(method) or {}}


def _base(base_uri: str, tracking: TrackingConfig) -> tuple[str, str, Path, str]:
    """(name, models:/NAME/VERSION, local folder, checkpoint sha256) of the base version, looked up in the store
    `tracking` names (a task may run first in a fresh process: nothing else has pointed MLflow there yet)."""
    from mlflow.tracking import MlflowClient

    from registry.pulling import checkpoint_dir, resolve_version
    from registry.tracking import setup_tracking

    setup_tracking(tracking.experiment)
    name, version = resolve_version(base_uri)
    uri = f"models:/{name}/{version}"
    sha = MlflowClient().get_model_version(name, str(version)).tags.get(T.CHECKPOINT_SHA256, "")
    return name, uri, checkpoint_dir(uri), sha


def _git_sha() -> str:
    from cpmant.checkpoint import git_sha

    return git_sha()


def _flat(prefix: str, d: dict) -> dict[str, str]:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(f"{prefix}{k}.", v))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


def _primary(task_name: str) -> str:
    return str(_cuge().get_task(task_name).primary_metric)


def _is_demo(task_name: str) -> bool:
    return _cuge().get_task(task_name).is_demo


# ---- test scores: intervals and stored predictions (cpmant.delta.evaluation) ---------------------------------------
def _log_predictions(scored, examples) -> None:
    """The per-example test predictions as the run's `predictions/test.jsonl` (what paired comparisons read)."""
    import mlflow

    from cpmant.delta.evaluation import PREDICTIONS_ARTIFACT, predictions_jsonl

    mlflow.log_text(predictions_jsonl(scored.predictions, examples), PREDICTIONS_ARTIFACT)


def _load_predictions(run_id: str, examples) -> list | None:
    """A run's stored test predictions, or None when it has none or they are of other examples."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from cpmant.delta.evaluation import PREDICTIONS_ARTIFACT, read_predictions

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{PREDICTIONS_ARTIFACT}")
        return read_predictions(text, examples)
    except (MlflowException, OSError, CpmantError, ValueError):
        return None


def _interval_fields(test: dict, metrics, primary: str) -> dict:
    """{"metrics": {m: value}, "intervals": {m: [low, high]}, "score_ci_low", "score_ci_high"} from a run's
    `test_<m>`, `test_<m>_ci_low`, `test_<m>_ci_high` (test: those names without `test_`)."""
    vals = {m: test[m] for m in metrics if m in test}
    ivs = {m: [test.get(f"{m}_ci_low"), test.get(f"{m}_ci_high")] for m in vals}
    low, high = ivs.get(primary, [None, None])
    return {"metrics": vals, "intervals": ivs, "score_ci_low": low, "score_ci_high": high}


def _scored_fields(scored, primary: str) -> dict:
    ivs = {m: [iv.low, iv.high] for m, iv in scored.intervals.items()}
    low, high = ivs.get(primary, [None, None])
    return {"metrics": scored.metrics, "intervals": ivs, "score_ci_low": low, "score_ci_high": high,
            "predictions": scored.predictions}


# ---- zero-shot ------------------------------------------------------------------------------------------------
def _zero_run_name() -> str:
    from prefect.runtime import task_run

    return f"zeroshot-{task_run.parameters.get('task_name', 'task')}"


def _find_run(key: str):
    """The newest finished run tagged with this inputs hash, or None."""
    import mlflow

    from registry.tracking import setup_tracking

    setup_tracking()
    exps = [e.experiment_id for e in mlflow.search_experiments()]
    if not exps:
        return None
    runs = mlflow.search_runs(exps, filter_string=f"tags.`{T.INPUTS_SHA256}` = '{key}' and "
                                                  "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0] if runs else None


@task(name="zero-shot", task_run_name=_zero_run_name, cache_policy=NONE)
def zero_shot(tune: TuneConfig, tracking: TrackingConfig, base_uri: str, task_name: str,
              force: bool = False) -> dict:
    """The base's score on the task without tuning: one tracked run per (base version, task, examples, code),
    reused on later calls unless `force`."""
    import mlflow

    from cpmant.checkpoint import load_pretrained
    from cpmant.delta.evaluation import eval_examples, score_examples

    t0 = time.perf_counter()
    _, base, base_dir, base_sha = _base(base_uri, tracking)
    examples = load_split(task_name, EVAL_SPLIT, tune)
    data_sha = examples_sha256(examples)
    key = _sha({"kind": ZERO_SHOT, "base": base, "base_sha": base_sha, "task": task_name, "data": data_sha,
                "eval": [tune.eval_batch_size, tune.max_eval_examples, tune.precision],
                "git": _git_sha()})
    primary = _primary(task_name)
    found = None if force else _find_run(key)
    stored = _load_predictions(found.info.run_id, eval_examples(examples, tune)) if found is not None else None
    if stored is not None:  # a run without stored predictions (older code) is redone: comparisons pair them
        test = {k[len("test_"):]: v for k, v in found.data.metrics.items() if k.startswith("test_")}
        return {"task": task_name, "method": ZERO_SHOT, "model": base, "metric": primary,
                "score": test.get(primary), **_interval_fields(test, _cuge().get_task(task_name).metrics, primary),
                "predictions": stored, "trainable_params": 0, "trainable_ratio": 0.0,
                "delta_bytes": 0, "delta_bytes_ratio": 0.0, "seconds": time.perf_counter() - t0, "reused": True,
                "run_id": found.info.run_id}
    tags = {T.STAGE: "delta", T.PARENT: base, TASK_TAG: task_name, METHOD_TAG: ZERO_SHOT,
            KIND_TAG: ZERO_SHOT, T.INPUTS_SHA256: key}
    with tracked_stage(tracking, f"zeroshot-{task_name}", tags=tags) as run:
        mlflow.log_params({"task": task_name, "method": ZERO_SHOT, "base": base, "eval_split": EVAL_SPLIT,
                           "eval_examples": len(examples), "task_data_sha256": data_sha})
        model, tok = load_pretrained(base_dir)
        mlflow.log_params({"max_len": _cuge().get_task(task_name).max_len,
                           "max_len_effective": _cuge().get_task(task_name).effective_max_len(model)})
        scored = score_examples(_cuge().get_task(task_name), model, tok, examples, tune, zero_shot=True)
        _log_predictions(scored, eval_examples(examples, tune))
        run.log_final(scored.interval_metrics())
    log_lines(f"zero-shot {base} on {task_name}: test {primary} {scored.metrics.get(primary)}",
              f"MLflow run {run.info.run_id}")
    return {"task": task_name, "method": ZERO_SHOT, "model": base, "metric": primary,
            "score": scored.metrics.get(primary), **_scored_fields(scored, primary),
            "trainable_params": 0, "trainable_ratio": 0.0, "delta_bytes": 0,
            "delta_bytes_ratio": 0.0, "seconds": time.perf_counter() - t0, "reused": False,
            "run_id": run.info.run_id}


# ---- one delta ------------------------------------------------------------------------------------------------
def _tune_run_name() -> str:
    """tune-<task>-<method>: what the task run does."""
    from prefect.runtime import task_run

    p = task_run.parameters
    return f"tune-{p.get('task_name', 'task')}-{p.get('method', 'method')}"


class TuneCallbacks:
    """The tuning loop's callbacks (cpmant.delta.train.tune): each step's loss through the batched logger
    (step = optimizer step), each epoch's task metrics as `eval_<metric>` at step = epoch."""

    def __init__(self, logger: AsyncMetricLogger, run_id: str):
        self.logger, self.run_id = logger, run_id
        self.epochs: list[tuple[int, dict]] = []

    def on_step(self, step: int, loss: float) -> None:
        self.logger.log(int(step), {"loss": float(loss)})

    def on_eval(self, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        named = {(k if k.startswith("eval_") else f"eval_{k}"): float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float))}
        self.epochs.append((int(epoch), named))
        ts = int(time.time() * 1000)
        MlflowClient().log_batch(self.run_id, metrics=[Metric(k, v, ts, int(epoch))
                                                       for k, v in finite(named).items()], synchronous=True)


def delta_name(base_name: str, task_name: str, method: str) -> str:
    """`<model>-<task>-<method>`, e.g. cpm-ant-tiny-demo-ccpm-lora."""
    return f"{base_name}-{task_name}-{method}"


def _reused(uri: str, task_name: str, method: str, t0: float, examples=None) -> dict:
    """The row of a registered delta made from the same inputs, with its stored test predictions (None when its
    run stored none: its comparisons are then left out)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name, version = uri[len("models:/"):].rsplit("/", 1)
    mv = MlflowClient().get_model_version(name, version)
    row = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/tune_report.json")
    log_lines(f"reusing {uri} (same base, task data, settings and code): {mv.description or ''}")
    return {**row, "model": uri, "run_id": mv.run_id, "reused": True, "seconds": time.perf_counter() - t0,
            "predictions": _load_predictions(mv.run_id, examples)}


class _Recorded:
    """Callbacks of one lr of a sweep, kept until the sweep chooses: only the chosen run's are logged."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []

    def on_step(self, *args) -> None:
        self.calls.append(("on_step", args))

    def on_eval(self, *args) -> None:
        self.calls.append(("on_eval", args))

    def replay(self, target) -> None:
        for name, args in self.calls:
            getattr(target, name)(*args)


SWEEP_COLUMNS = ["lr", "metric", "valid_score", "best_epoch", "epochs_run", "diverged", "seconds"]


def _run_tuning(tune: TuneConfig, task_obj, splits: dict, method: str, base_dir: Path, callbacks):
    """(TuneResult, tokenizer): the tuning loop at the method's lr, or with tune.sweep_lr one run per lr of its
    grid, the best on the valid split kept (params `lr_grid`, `lr_chosen`; the table `lr_sweep.json`: lr, best
    valid score, best epoch; only the chosen run's loss and eval metrics are logged). Logs `max_len` and
    `max_len_effective` (the task's, capped by the model's positions)."""
    import mlflow

    from cpmant.checkpoint import load_pretrained
    from cpmant.delta.train import sweep_lr, tune as tune_loop

    model, tok = load_pretrained(base_dir)
    mlflow.log_params({"max_len": task_obj.max_len, "max_len_effective": task_obj.effective_max_len(model)})
    progress = sys.stderr.isatty()
    if not tune.sweep_lr:
        return tune_loop(model, tok, task_obj, splits["train"], splits["valid"], method, tune,
                         callbacks=callbacks, progress=progress), tok
    fresh = [model]  # the first lr tunes the model loaded above; each later one a fresh copy of the base
    recorded: dict[float, _Recorded] = {}
    sweep = sweep_lr(lambda: fresh.pop() if fresh else load_pretrained(base_dir)[0], tok, task_obj,
                     splits["train"], splits["valid"], method, tune,
                     callbacks_for=lambda lr: recorded.setdefault(lr, _Recorded()), progress=progress)
    recorded[sweep.lr].replay(callbacks)
    mlflow.log_params({"lr_grid": json.dumps(list(sweep.grid)), "lr_chosen": sweep.lr})
    mlflow.log_table({c: [r[c] for r in sweep.rows] for c in SWEEP_COLUMNS}, "lr_sweep.json")
    return sweep.best, tok


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


@task(name="tune-delta", task_run_name=_tune_run_name, cache_policy=NONE)
def tune_delta(tune: TuneConfig, tracking: TrackingConfig, base_uri: str, task_name: str, method: str,
               force: bool = False) -> dict:
    """Tune `method` on `task_name` from `base_uri` in a tracked MLflow run, score it on the test split and register
    `<model>-<task>-<method>` (only the delta's weights, naming its base; `full` saves every weight). A version made
    from the same inputs (base version and checkpoint, the task's examples, method and settings, code) is returned
    instead, unless `force`."""
    import mlflow

    from cpmant.checkpoint import read_meta
    from cpmant.delta.checkpoint import save_delta
    from cpmant.delta.evaluation import eval_examples, score_examples
    from registry.register import find_version, register_checkpoint

    t0 = time.perf_counter()
    base_name, base, base_dir, base_sha = _base(base_uri, tracking)
    name = delta_name(base_name, task_name, method)
    task_obj = _cuge().get_task(task_name)
    splits = {s: load_split(task_name, s, tune) for s in ("train", "valid", EVAL_SPLIT)}
    data_sha = _sha({s: examples_sha256(ex) for s, ex in splits.items()})
    settings = _tune_settings(tune, method)
    key = _sha({"kind": "delta", "base": base, "base_sha": base_sha, "task": task_name, "data": data_sha,
                "method": method, "settings": settings, "git": _git_sha()})
    if not force:
        found = find_version(name, {T.INPUTS_SHA256: key, T.PARENT: base})
        if found:
            return _reused(found, task_name, method, t0, eval_examples(splits[EVAL_SPLIT], tune))
    out = subdir("runs", f"tune-{base_name}") / f"{task_name}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    primary = str(task_obj.primary_metric)
    tags = {T.STAGE: "delta", T.PARENT: base, TASK_TAG: task_name, METHOD_TAG: method,
            KIND_TAG: "delta"}
    with tracked_stage(tracking, f"tune-{task_name}-{method}", tags=tags) as run:
        mlflow.log_params({**_flat("tune.", settings), "task": task_name, "method": method, "base": base,
                           "task_data_sha256": data_sha, "data.dir": str(tune.data or ""),
                           **{f"examples.{s}": len(ex) for s, ex in splits.items()}})
        logger = AsyncMetricLogger(run.info.run_id, tracking.metric_flush_steps)
        callbacks = TuneCallbacks(logger, run.info.run_id)
        try:
            res, tok = _run_tuning(tune, task_obj, splits, method, base_dir, callbacks)
        finally:
            logger.close()
        rep = res.report
        mlflow.log_params({f"method.{k}": str(v)[:500] for k, v in (rep.get("params") or {}).items()
                           if k != "name"} | {"method.lr": rep.get("lr")})
        # the model holds the best epoch's delta: its score on the test split (with intervals, the predictions
        # stored for paired comparisons) is the comparison table's
        scored = score_examples(task_obj, res.handle.model, tok, splits[EVAL_SPLIT], tune)
        _log_predictions(scored, eval_examples(splits[EVAL_SPLIT], tune))
        metrics = scored.metrics
        # the contract's hashes for the version's tags: the tuning config (method and settings) and the data it was
        # trained on (the task's examples); `data` carries the base's corpus lineage forward
        meta = {"config_sha256": _sha({"method": method, "settings": settings}), "data_sha256": data_sha,
                "stage": "delta", "task": task_name, "data": read_meta(base_dir).get("data")}
        save_delta(out, res.handle, base_dir, base_uri=base, task=task_name, metrics=metrics,
                   state_dict=res.best_state, meta=meta)
        trainable, ratio = int(rep["trainable_params"]), float(rep["trainable_ratio"])
        delta_bytes, base_bytes = _weights_bytes(out), _weights_bytes(base_dir)
        run.final_step = int(rep.get("epochs_run") or 0)
        final = {"trainable_params": trainable, "trainable_ratio": ratio, "delta_bytes": delta_bytes,
                 "delta_bytes_ratio": delta_bytes / base_bytes if base_bytes else 0.0,
                 "best_epoch": rep.get("best_epoch"), "examples_per_second": rep.get("examples_per_second"),
                 **scored.interval_metrics()}
        run.log_final(final)
        fields = _scored_fields(scored, primary)
        row = {"task": task_name, "method": method, "metric": primary, "score": metrics.get(primary),
               **{k: v for k, v in fields.items() if k != "predictions"}, "trainable_params": trainable,
               "trainable_ratio": ratio,
               "delta_bytes": delta_bytes, "delta_bytes_ratio": final["delta_bytes_ratio"], "base_bytes": base_bytes,
               "best_epoch": rep.get("best_epoch"), "epochs": rep.get("history"), "base": base}
        mlflow.log_dict(row, "tune_report.json")
        description = f"{method} delta of {base} on {task_name}" + (f" ({DEMO_NOTE})" if _is_demo(task_name)
                                                                      else "")
        if row["score"] is not None:
            description += f": test {primary} {row['score']:.4g}"
        description += f", {trainable:,} trainable parameters ({ratio:.3%}), {delta_bytes:,} bytes"
        reg = register_checkpoint(out, name, stage="delta", parent=base, step=run.final_step,
                                  extra_tags={T.INPUTS_SHA256: key, TASK_TAG: task_name, METHOD_TAG: method,
                                              TASK_DATA_TAG: data_sha},
                                  description=description, alias=new_version_alias(tracking, name))
    log_lines(f"{reg.uri}: {description}", f"MLflow run {run.info.run_id}")  # the task run's log in Prefect
    return {**row, "model": reg.uri, "run_id": run.info.run_id, "reused": False, "predictions": fields["predictions"],
            "seconds": time.perf_counter() - t0, "description": description}


# ---- the comparison table ---------------------------------------------------------------------------------------
def _table_run_name() -> str:
    from prefect.runtime import task_run

    return f"compare-{task_run.parameters.get('task_name', 'task')}"


def paired_comparisons(task_name: str, zero: dict | None, rows: list[dict], examples) -> dict[str, dict]:
    """Per method: `vs_zero_shot_<primary>` (method minus zero-shot, points) and, for methods other than full where
    full was tuned, `vs_full_<primary>` and `ratio_to_full_<primary>`, each with `_ci_low/_ci_high`: paired 95%
    bootstrap intervals over the same test examples (`Task.paired_intervals` / `paired_ratio`). A row without
    stored predictions (or with predictions of other examples) gets no comparison, and `note` says why."""
    from cpmant.delta.evaluation import compare

    task = _cuge().get_task(task_name)
    ex = list(examples)
    full = next((r for r in rows if r["method"] == FULL and r.get("predictions") is not None), None)
    zero_pred = (zero or {}).get("predictions")
    out: dict[str, dict] = {}
    for r in rows:
        pred, got = r.get("predictions"), {}
        try:
            if pred is not None and zero_pred is not None:
                got.update(compare(task, pred, zero_pred, ex, "vs_zero_shot"))
            if pred is not None and full is not None and r["method"] != FULL:
                got.update(compare(task, pred, full["predictions"], ex, "vs_full", "ratio_to_full"))
        except CpmantError as e:
            got = {"note": f"not paired: {e.problem}"}
        if pred is None:
            got["note"] = "not paired: its run stored no test predictions (rerun with force)"
        out[r["method"]] = got
    return out


def table_rows(zero: dict | None, rows: list[dict], comparisons: dict | None = None) -> list[dict]:
    """zero-shot first, then each method, full last; each score with its interval; `vs_zero_shot` / `vs_full`
    (points) and `ratio_to_full` with paired intervals from `comparisons` (paired_comparisons); without them
    `ratio_to_full` is the ratio of the scores and the intervals are empty."""
    ordered = ([zero] if zero else []) + [r for r in rows if r["method"] != FULL] + [r for r in rows
                                                                                     if r["method"] == FULL]
    full = next((r.get("score") for r in rows if r["method"] == FULL), None)
    out = []
    for r in ordered:
        s, cmp = r.get("score"), (comparisons or {}).get(r["method"], {})
        row = {"task": r["task"], "method": r["method"], "model": r["model"], "metric": r["metric"], "score": s,
               "score_ci_low": r.get("score_ci_low"), "score_ci_high": r.get("score_ci_high")}
        for name in ("vs_zero_shot", "vs_full", "ratio_to_full"):
            key = f"{name}_{r['metric']}"
            row.update({name: cmp.get(key), f"{name}_ci_low": cmp.get(f"{key}_ci_low"),
                        f"{name}_ci_high": cmp.get(f"{key}_ci_high")})
        if row["ratio_to_full"] is None and r["method"] not in (ZERO_SHOT, FULL) and s is not None and full:
            row["ratio_to_full"] = s / full
        row.update({"trainable_params": r.get("trainable_params"), "trainable_ratio": r.get("trainable_ratio"),
                    "delta_bytes": r.get("delta_bytes"), "delta_bytes_ratio": r.get("delta_bytes_ratio"),
                    "seconds": round(float(r.get("seconds") or 0.0), 1), "reused": bool(r.get("reused"))})
        out.append(row)
    weak = all(r["score"] == 0 and (r["score_ci_high"] or 0) == 0 for r in out)
    for row, r in zip(out, ordered):
        row["reading"] = reading(row, weak, (comparisons or {}).get(r["method"], {}).get("note"))
    return out


def _side(low, high, above: str, below: str, same: str) -> str:
    return above if low > 0 else below if high < 0 else same


def reading(row: dict, weak: bool = False, note: str | None = None) -> str:
    """What a row's intervals say, in words: whether the method beats zero-shot and where it stands against full
    (a paired interval that excludes 0 is not noise; one that holds 0 cannot tell the two apart)."""
    if weak:
        return "every model scores 0 on this task: the base is too weak for it, the rows compare nothing"
    if note:
        return note
    parts = []
    if row.get("vs_zero_shot_ci_low") is not None:
        parts.append(_side(row["vs_zero_shot_ci_low"], row["vs_zero_shot_ci_high"], "above zero-shot",
                           "below zero-shot", "not distinguishable from zero-shot"))
    if row.get("vs_full_ci_low") is not None:
        parts.append(_side(row["vs_full_ci_low"], row["vs_full_ci_high"], "above full", "below full",
                           "not distinguishable from full"))
    if row.get("ratio_to_full_ci_low") is not None:
        parts.append(f"at least {row['ratio_to_full_ci_low']:.0%} of full's score (95% lower bound)")
    return "; ".join(parts)


def _with_interval(value, low, high, points: bool = False) -> str:
    """`30.2 [26.1, 34.4]` (`+1.3 [...]` for a difference); an empty cell when there is no value."""
    if value is None:
        return ""
    fmt = (lambda v: f"{v:+.3g}") if points else (lambda v: f"{v:.4g}")
    return fmt(value) + (f" [{fmt(low)}, {fmt(high)}]" if low is not None and high is not None else "")


def artifact_rows(table: list[dict]) -> list[dict]:
    """The Prefect artifact's rows: each score and comparison as `value [low, high]`."""
    out = []
    for r in table:
        out.append({"task": r["task"], "method": r["method"], "model": r["model"], "metric": r["metric"],
                    "score [95% CI]": _with_interval(r["score"], r["score_ci_low"], r["score_ci_high"]),
                    "vs zero-shot (points)": _with_interval(r["vs_zero_shot"], r["vs_zero_shot_ci_low"],
                                                            r["vs_zero_shot_ci_high"], points=True),
                    "vs full (points)": _with_interval(r["vs_full"], r["vs_full_ci_low"], r["vs_full_ci_high"],
                                                       points=True),
                    "ratio to full": _with_interval(r["ratio_to_full"], r["ratio_to_full_ci_low"],
                                                    r["ratio_to_full_ci_high"]),
                    **{c: _fmt(r[c]) for c in ("trainable_params", "trainable_ratio", "delta_bytes_ratio",
                                               "seconds", "reused", "reading")}})
    return out


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else v


def _log_on_runs(rows: list[dict], comparisons: dict) -> None:
    """Each method's paired comparisons on its own tuning run too (`vs_zero_shot_<primary>`, ...)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    ts = int(time.time() * 1000)
    for r in rows:
        values = finite({k: v for k, v in comparisons.get(r["method"], {}).items() if k != "note"})
        if values and r.get("run_id"):
            MlflowClient().log_batch(r["run_id"], metrics=[Metric(k, float(v), ts, 0) for k, v in values.items()],
                                     synchronous=True)


@task(name="comparison-table", task_run_name=_table_run_name, cache_policy=NONE)
def comparison_table(tracking: TrackingConfig, base_uri: str, task_name: str, zero: dict | None,
                     rows: list[dict], tune: TuneConfig | None = None) -> list[dict]:
    """Zero-shot, each method and full side by side on the task's test split, each score with its interval and
    the paired comparisons (`paired_comparisons`, logged on each method's run and, prefixed by the method, e.g.
    `lora_vs_full_<primary>`, on a `compare-<task>` run): an MLflow table and plot and a Prefect table artifact
    `tune-<task>`. Nothing new is logged when every row was reused."""
    import mlflow

    from cpmant.delta.evaluation import eval_examples

    from .plots import plot_comparison

    tune = tune or TuneConfig()
    paired = [r for r in ([zero] if zero else []) + rows if r.get("predictions") is not None]
    comparisons = (paired_comparisons(task_name, zero, rows, eval_examples(load_split(task_name, EVAL_SPLIT, tune),
                                                                           tune)) if paired else {})
    table = table_rows(zero, rows, comparisons)
    if not table or all(r["reused"] for r in table):
        return table
    demo = _is_demo(task_name)
    key = f"tune-{task_name}".lower()
    tags = {T.STAGE: "delta", T.PARENT: zero["model"] if zero else base_uri,
            TASK_TAG: task_name, KIND_TAG: "comparison"}
    _log_on_runs(rows, comparisons)
    with tracked_stage(tracking, f"compare-{task_name}", tags=tags) as run:
        mlflow.log_table({c: [r[c] for r in table] for c in TABLE_COLUMNS}, f"comparison-{task_name}.json")
        run.log_final(finite({f"{m}_{k}": v for m, got in comparisons.items() for k, v in got.items()
                              if k != "note"}))
        notes = {f"{m}.note": got["note"] for m, got in comparisons.items() if "note" in got}
        if notes:
            mlflow.log_params(notes)
        png = plot_comparison(table, subdir("runs") / f"comparison-{task_name}.png",
                              title=f"{task_name}{' (demo task)' if demo else ''}")
        if png:
            mlflow.log_artifact(str(png), artifact_path="plots")
    create_table_artifact(artifact_rows(table), key=key,
                          description=f"Delta tuning on {task_name} from {base_uri}"
                                      + (f" ({DEMO_NOTE})" if demo else ""))
    return table
