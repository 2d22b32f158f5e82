"""The zero-shot task: the base's score on a task's test split without tuning, one tracked run per reuse key
(keys.zero_shot_key), reused on later calls unless forced."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NONE

from registry import runs, tune_records
from registry import tags as T

from ..config import TrackingConfig, TuneConfig
from ..outcomes import log_lines
from ..reuse import decide, reused_state
from ..metering import tracked_stage
from .keys import examples_sha256, load_split, zero_shot_key
from .names import EVAL_SPLIT, ZERO_SHOT, get_task
from .scores import NO_DELTA, interval_fields, log_predictions, scored_fields, stored_predictions


def _run_name() -> str:
    from prefect.runtime import task_run

    return f"zeroshot-{task_run.parameters.get('task_name', 'task')}"


def _stored(key: str, experiment: str, examples) -> tuple[str, dict, list] | None:
    """The zero-shot run recorded with `key` and its stored predictions of these examples (a run without them is
    no result to reuse: comparisons pair them)."""
    found = tune_records.zero_shot_run(key, experiment)
    if found is None:
        return None
    preds = stored_predictions(found[0], examples)
    return None if preds is None else (*found, preds)


def _score(tune, tracking, base, task_name: str, examples, tags: dict, data_sha: str):
    """Score the base in a tracked run: (scored, run id)."""
    from cpmant.checkpoint import load_pretrained
    from cpmant.delta.evaluation import eval_examples, score_examples

    task_obj = get_task(task_name)
    with tracked_stage(tracking, f"zeroshot-{task_name}", tags=tags) as run:
        runs.log_params({"task": task_name, "method": ZERO_SHOT, "base": base.uri, "eval_split": EVAL_SPLIT,
                         "eval_examples": len(examples), "task_data_sha256": data_sha})
        model, tok = load_pretrained(base.folder)
        runs.log_params({"max_len": task_obj.max_len, "max_len_effective": task_obj.effective_max_len(model)})
        scored = score_examples(task_obj, model, tok, examples, tune, zero_shot=True)
        log_predictions(scored, eval_examples(examples, tune))
        run.log_final(scored.interval_metrics())
    return scored, run.info.run_id


@task(name="zero-shot", task_run_name=_run_name, cache_policy=NONE)
def zero_shot(tune: TuneConfig, tracking: TrackingConfig, base_uri: str, task_name: str, force: bool = False):
    """The base's score on the task without tuning: one tracked run per reuse key (base version and checkpoint,
    the task's test examples, scoring settings, code), reused on later calls unless `force`."""
    from cpmant.delta.evaluation import eval_examples

    t0 = time.perf_counter()
    base = tune_records.base_version(base_uri, tracking.experiment)
    examples = load_split(task_name, EVAL_SPLIT, tune)
    data_sha = examples_sha256({EVAL_SPLIT: examples})
    key = zero_shot_key(base, task_name, data_sha, tune)
    primary = str(get_task(task_name).primary_metric)
    stored = None if force else _stored(key, tracking.experiment, eval_examples(examples, tune))
    reuse = decide(f"tune zero-shot {task_name}", key, f"runs:/{stored[0]}" if stored else None,
                   f"zero-shot runs of {base.uri} on {task_name}", force)
    row = {"task": task_name, "method": ZERO_SHOT, "model": base.uri, "metric": primary, **NO_DELTA,
           "reason": reuse.reason}
    if reuse.reused:
        run_id, test, preds = stored
        fields = interval_fields(test, get_task(task_name).metrics, primary)
        return reused_state(reuse, {**row, "score": test.get(primary), **fields, "predictions": preds,
                                    "seconds": time.perf_counter() - t0, "reused": True, "run_id": run_id})
    tags = {T.STAGE: "delta", T.PARENT: base.uri, T.TASK: task_name, T.METHOD: ZERO_SHOT, T.TUNE_KIND: ZERO_SHOT,
            T.INPUTS_SHA256: key, T.TASK_DATA_SHA256: data_sha}
    scored, run_id = _score(tune, tracking, base, task_name, examples, tags, data_sha)
    log_lines(f"zero-shot {base.uri} on {task_name}: test {primary} {scored.metrics.get(primary)}",
              f"MLflow run {run_id}")
    return {**row, "score": scored.metrics.get(primary), **scored_fields(scored, primary),
            "seconds": time.perf_counter() - t0, "reused": False, "run_id": run_id}
