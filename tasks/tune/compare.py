"""The comparison step of the delta-tuning stage: zero-shot, each method and full side by side on a task's test
split, each score with its 95% interval, and the paired comparisons over the same test examples
(`vs_zero_shot_<primary>`, `vs_full_<primary>` in points, method minus reference, `ratio_to_full_<primary>`, each
with `_ci_low` / `_ci_high`), with what the intervals say in words."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from cpmant.errors import CpmantError
from cpmant.paths import subdir
from registry import tune_records
from registry import tags as T

from ..config import TrackingConfig, TuneConfig
from ..metering import finite, tracked_stage
from .keys import load_split
from .names import DEMO_NOTE, EVAL_SPLIT, FULL, ZERO_SHOT, get_task

# the comparison table's columns: each score with its 95% interval; the paired differences (points, method minus
# zero-shot / full) and the ratio to full, each with the paired interval over the same test examples
TABLE_COLUMNS = ["task", "method", "model", "metric", "score", "score_ci_low", "score_ci_high",
                 "vs_zero_shot", "vs_zero_shot_ci_low", "vs_zero_shot_ci_high", "vs_full", "vs_full_ci_low",
                 "vs_full_ci_high", "ratio_to_full", "ratio_to_full_ci_low", "ratio_to_full_ci_high",
                 "trainable_params", "trainable_ratio", "delta_bytes", "delta_bytes_ratio", "seconds", "reused",
                 "reading"]


def _run_name() -> str:
    from prefect.runtime import task_run

    return f"compare-{task_run.parameters.get('task_name', 'task')}"


def paired_comparisons(task_name: str, zero: dict | None, rows: list[dict], examples) -> dict[str, dict]:
    """Per method: `vs_zero_shot_<primary>` (method minus zero-shot, points) and, for methods other than full where
    full was tuned, `vs_full_<primary>` and `ratio_to_full_<primary>`, each with `_ci_low/_ci_high`: paired 95%
    bootstrap intervals over the same test examples (`Task.paired_intervals` / `paired_ratio`). A row without
    stored predictions (or with predictions of other examples) gets no comparison, and `note` says why."""
    from cpmant.delta.evaluation import compare

    task = get_task(task_name)
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


def _log_comparison(tracking, base_uri, task_name, zero, rows, table, comparisons) -> None:
    """Each method's paired comparisons on its own tuning run, and a `compare-<task>` run with the table, the
    comparisons prefixed by the method (`lora_vs_full_<primary>`), why rows were not paired, and the plot."""
    from ..plots import plot_comparison

    tune_records.log_on_runs({r.get("run_id"): finite({k: v for k, v in comparisons.get(r["method"], {}).items()
                                                       if k != "note"}) for r in rows})
    tags = {T.STAGE: "delta", T.PARENT: zero["model"] if zero else base_uri, T.TASK: task_name,
            T.TUNE_KIND: "comparison"}
    demo = get_task(task_name).is_demo
    with tracked_stage(tracking, f"compare-{task_name}", tags=tags) as run:
        run.log_final(finite({f"{m}_{k}": v for m, got in comparisons.items() for k, v in got.items()
                              if k != "note"}))
        png = plot_comparison(table, subdir("runs") / f"comparison-{task_name}.png",
                              title=f"{task_name}{' (demo task)' if demo else ''}")
        tune_records.log_comparison(task_name, table, TABLE_COLUMNS,
                                    {f"{m}.note": got["note"] for m, got in comparisons.items() if "note" in got},
                                    png)


@task(name="comparison-table", task_run_name=_run_name, cache_policy=NONE)
def comparison_table(tracking: TrackingConfig, base_uri: str, task_name: str, zero: dict | None,
                     rows: list[dict], tune: TuneConfig | None = None) -> list[dict]:
    """Zero-shot, each method and full side by side on the task's test split, each score with its interval and
    the paired comparisons (`paired_comparisons`, logged on each method's run and, prefixed by the method, e.g.
    `lora_vs_full_<primary>`, on a `compare-<task>` run): an MLflow table and plot and a Prefect table artifact
    `tune-<task>`. Nothing new is logged when every row was reused."""
    from cpmant.delta.evaluation import eval_examples

    tune = tune or TuneConfig()
    paired = [r for r in ([zero] if zero else []) + rows if r.get("predictions") is not None]
    examples = eval_examples(load_split(task_name, EVAL_SPLIT, tune), tune) if paired else []
    comparisons = paired_comparisons(task_name, zero, rows, examples) if paired else {}
    table = table_rows(zero, rows, comparisons)
    if not table or all(r["reused"] for r in table):
        return table
    _log_comparison(tracking, base_uri, task_name, zero, rows, table, comparisons)
    create_table_artifact(artifact_rows(table), key=f"tune-{task_name}".lower(),
                          description=f"Delta tuning on {task_name} from {base_uri}"
                                      + (f" ({DEMO_NOTE})" if get_task(task_name).is_demo else ""))
    return table
