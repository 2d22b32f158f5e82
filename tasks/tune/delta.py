"""The tune-delta task: one tracked, registered delta per (base, task, method), or the version recorded with the
same reuse key (keys.delta_key). The core does the work (cpmant.delta: methods through OpenDelta, the tuning loop,
delta-only checkpoints); this records it: params, `trainable_params`, `trainable_ratio`, `delta_bytes`,
`eval_<metric>` per epoch (step = epoch), the test scores with their intervals and per-example predictions, and
registers `<model>-<task>-<method>` with `cpmant.stage=delta` and `cpmant.parent` = the base version."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from cpmant.paths import subdir
from registry import runs, tune_records
from registry import tags as T

from ..candidates import new_version_alias
from ..config import TrackingConfig, TuneConfig
from ..outcomes import log_lines
from ..reuse import decide, reused_state
from ..metering import AsyncMetricLogger, finite, tracked_stage
from .keys import config_sha256, delta_key, examples_sha256, load_splits, tune_settings
from .names import DEMO_NOTE, EVAL_SPLIT, delta_name, get_task
from .scores import log_predictions, scored_fields, stored_predictions

SWEEP_COLUMNS = ["lr", "metric", "valid_score", "best_epoch", "epochs_run", "diverged", "seconds"]


def _run_name() -> str:
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
        named = {(k if k.startswith("eval_") else f"eval_{k}"): float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float))}
        self.epochs.append((int(epoch), named))
        tune_records.log_epoch(self.run_id, finite(named), int(epoch))


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


def _run_tuning(tune: TuneConfig, task_obj, splits: dict, method: str, base_dir: Path, callbacks):
    """(TuneResult, tokenizer): the tuning loop at the method's lr, or with tune.sweep_lr one run per lr of its
    grid, the best on the valid split kept (params `lr_grid`, `lr_chosen`; the table `lr_sweep.json`: lr, best
    valid score, best epoch; only the chosen run's loss and eval metrics are logged). Logs `max_len` and
    `max_len_effective` (the task's, capped by the model's positions)."""
    from cpmant.checkpoint import load_pretrained
    from cpmant.delta.train import sweep_lr, tune as tune_loop

    model, tok = load_pretrained(base_dir)
    runs.log_params({"max_len": task_obj.max_len, "max_len_effective": task_obj.effective_max_len(model)})
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
    tune_records.log_sweep(sweep.grid, sweep.lr, sweep.rows, SWEEP_COLUMNS)
    return sweep.best, tok


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _reused(reuse, task_name: str, t0: float, examples) -> dict:
    """The row of the registered delta recorded with the same key, with its stored test predictions (None when its
    run stored none: its comparisons are then left out)."""
    rec = tune_records.delta_record(reuse.found)
    log_lines(f"{reuse.reason}: {rec.description}")
    return {**rec.row, "model": reuse.found, "run_id": rec.run_id, "reused": True, "reason": reuse.reason,
            "seconds": time.perf_counter() - t0, "predictions": stored_predictions(rec.run_id, examples)}


def _tune_and_save(tune, tracking, base, task_name, method, splits, settings, data_sha, out: Path, run):
    """Inside the tracked run: tune, score on the test split (intervals and stored predictions), save the delta to
    `out`; returns the row of the comparison table (with predictions) and the test metrics with intervals."""
    from cpmant.checkpoint import read_meta
    from cpmant.delta.checkpoint import save_delta
    from cpmant.delta.evaluation import eval_examples, score_examples

    task_obj = get_task(task_name)
    logger = AsyncMetricLogger(run.info.run_id, tracking.metric_flush_steps)
    try:
        res, tok = _run_tuning(tune, task_obj, splits, method, base.folder, TuneCallbacks(logger, run.info.run_id))
    finally:
        logger.close()
    rep = res.report
    runs.log_params({f"method.{k}": v for k, v in (rep.get("params") or {}).items() if k != "name"}
                    | {"method.lr": rep.get("lr")})
    # the model holds the best epoch's delta: its test score is the comparison table's
    scored = score_examples(task_obj, res.handle.model, tok, splits[EVAL_SPLIT], tune)
    log_predictions(scored, eval_examples(splits[EVAL_SPLIT], tune))
    # the contract's hashes for the version's tags: the tuning config and the data it was tuned on; `data` carries
    # the base's corpus lineage forward
    meta = {"config_sha256": config_sha256(method, settings), "data_sha256": data_sha, "stage": "delta",
            "task": task_name, "data": read_meta(base.folder).get("data")}
    save_delta(out, res.handle, base.folder, base_uri=base.uri, task=task_name, metrics=scored.metrics,
               state_dict=res.best_state, meta=meta)
    return _row(task_name, method, base, rep, scored, out), scored.interval_metrics()


def _row(task_name: str, method: str, base, rep: dict, scored, out: Path) -> dict:
    primary = str(get_task(task_name).primary_metric)
    delta_bytes, base_bytes = _weights_bytes(out), _weights_bytes(base.folder)
    return {"task": task_name, "method": method, "metric": primary, "score": scored.metrics.get(primary),
            **scored_fields(scored, primary), "trainable_params": int(rep["trainable_params"]),
            "trainable_ratio": float(rep["trainable_ratio"]), "delta_bytes": delta_bytes,
            "delta_bytes_ratio": delta_bytes / base_bytes if base_bytes else 0.0, "base_bytes": base_bytes,
            "best_epoch": rep.get("best_epoch"), "epochs": rep.get("history"), "base": base.uri,
            "examples_per_second": rep.get("examples_per_second"), "epochs_run": int(rep.get("epochs_run") or 0)}


def _description(row: dict, base_uri: str) -> str:
    task_name, method, primary = row["task"], row["method"], row["metric"]
    text = f"{method} delta of {base_uri} on {task_name}"
    text += f" ({DEMO_NOTE})" if get_task(task_name).is_demo else ""
    if row["score"] is not None:
        text += f": test {primary} {row['score']:.4g}"
    return text + (f", {row['trainable_params']:,} trainable parameters ({row['trainable_ratio']:.3%}), "
                   f"{row['delta_bytes']:,} bytes")


def _log_final(run, row: dict, test_metrics: dict) -> None:
    """The run's final values, at its last epoch: the delta's size and the test scores with their intervals."""
    run.final_step = row["epochs_run"]
    run.log_final({k: row[k] for k in ("trainable_params", "trainable_ratio", "delta_bytes", "delta_bytes_ratio",
                                       "best_epoch", "examples_per_second") if row[k] is not None} | test_metrics)


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested settings as dotted param names (`params.r`)."""
    out = {}
    for k, v in (d or {}).items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@task(name="tune-delta", task_run_name=_run_name, cache_policy=NONE)
def tune_delta(tune: TuneConfig, tracking: TrackingConfig, base_uri: str, task_name: str, method: str,
               force: bool = False):
    """Tune `method` on `task_name` from `base_uri` in a tracked MLflow run, score it on the test split and register
    `<model>-<task>-<method>` (only the delta's weights, naming its base; `full` saves every weight). The version
    recorded with the same reuse key is returned instead, unless `force`."""
    from cpmant.delta.evaluation import eval_examples
    from registry.register import find_version, register_checkpoint

    t0 = time.perf_counter()
    base = tune_records.base_version(base_uri, tracking.experiment)
    name = delta_name(base.name, task_name, method)
    splits = load_splits(task_name, tune)
    data_sha, settings = examples_sha256(splits), tune_settings(tune, method)
    key = delta_key(base, task_name, data_sha, method, settings)
    found = None if force else find_version(name, {T.INPUTS_SHA256: key})
    reuse = decide(f"tune {task_name} {method}", key, found, name, force)
    if reuse.reused:
        return reused_state(reuse, _reused(reuse, task_name, t0, eval_examples(splits[EVAL_SPLIT], tune)))
    out = subdir("runs", f"tune-{base.name}") / f"{task_name}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    tags = {T.STAGE: "delta", T.PARENT: base.uri, T.TASK: task_name, T.METHOD: method, T.TUNE_KIND: "delta",
            T.INPUTS_SHA256: key, T.TASK_DATA_SHA256: data_sha}
    with tracked_stage(tracking, f"tune-{task_name}-{method}", tags=tags) as run:
        runs.log_params(_flat(settings), prefix="tune.")
        runs.log_params({"task": task_name, "method": method, "base": base.uri, "task_data_sha256": data_sha,
                         "data.dir": str(tune.data or ""), **{f"examples.{s}": len(ex) for s, ex in splits.items()}})
        row, test_metrics = _tune_and_save(tune, tracking, base, task_name, method, splits, settings, data_sha, out,
                                           run)
        _log_final(run, row, test_metrics)
        runs.log_dict({k: v for k, v in row.items() if k != "predictions"}, "tune_report.json")
        description = _description(row, base.uri)
        reg = register_checkpoint(out, name, stage="delta", parent=base.uri, step=run.final_step,
                                  extra_tags={k: tags[k] for k in (T.INPUTS_SHA256, T.TASK, T.METHOD,
                                                                   T.TASK_DATA_SHA256)},
                                  description=description, alias=new_version_alias(tracking, name))
    log_lines(f"{reg.uri}: {description}", f"MLflow run {run.info.run_id}")  # the task run's log in Prefect
    return {**row, "model": reg.uri, "run_id": run.info.run_id, "reused": False, "reason": reuse.reason,
            "seconds": time.perf_counter() - t0, "description": description}
