"""What the report says about its numbers (tasks/report/page.py renders it): every score with its 95% interval, demo
tasks labelled as such, a sentence beside each result that looks odd saying whether it is noise, and the check that
a base's three held-out losses are one measurement. Plain data here (rows of text, sentences); no HTML.

    Shown.of(metrics, name) -> Shown | None         `name` with `name_ci_low` / `name_ci_high` when logged
    is_demo(task) / demo_note(task)                 a demo task's label (never a CUGE score)
    tuning(runs, tables) -> {task: {...}}           per task: zero-shot and each method, scores and paired differences
    ladder_readings(rows, rung_metrics) -> rows     a "reading" for each rung with lower loss than its parent
    heldout(base_uri, ladder_parent, pretrain_metrics, validate_metrics) -> dict
    metric_rows(metrics, demo) -> rows              a validation run's metrics, intervals folded into one cell
    validation_summary(validations) -> dict         the newest validation of each model: passed / failed / other

The names read are the contract's (ARCHITECTURE.md, issue 16): a tuning run's `test_<metric>` and its
`_ci_low/_ci_high`; the paired differences `vs_zero_shot_<primary>`, `vs_full_<primary>` (points, method minus
reference) and `ratio_to_full_<primary>`; a validation run's `task_score`, `task_vs_zero_shot`,
`task_vs_champion`; the held-out loss as the ladder's `parent_lm_loss`, pretraining's `valid_loss_end` and
validation's `lm_loss`. A value logged without an interval (an older run) is shown with "(no interval)", never with
an interval made up here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from registry import tags as T

NO_INTERVAL = "(no interval)"
NOISE = "within noise (interval contains 0)"
SIGNIFICANT = "significant"
UNKNOWN_NOISE = "no paired interval was logged (an older run), so whether it is noise is not known"
HELDOUT_TOLERANCE = 1e-4  # the three held-out losses of one model must agree to this (issue 16, item 1)
ZERO_SHOT, FULL = "zero-shot", "full"
DEMO_NOTE = "demo task built from the installed corpus: not a CUGE score"  # tasks/tune.py says the same
# a validation metric that is a score or a paired difference of scores: shown with its interval or "(no interval)"
SCORE_PREFIXES = ("task_score", "task_vs_", "test_", "vs_", "ratio_to_")
CI_SUFFIXES = ("_ci_low", "_ci_high")


def fmt(v) -> str:
    """One number format for the whole page: 4 significant digits, thousands separated from 100,000 up."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a >= 1e5:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:,.1f}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class Shown:
    """A logged value and its 95% interval, when one was logged."""

    value: float | None
    low: float | None = None
    high: float | None = None

    @classmethod
    def of(cls, metrics: dict, name: str) -> "Shown | None":
        value, low, high = (_num(metrics.get(name + s)) for s in ("", *CI_SUFFIXES))
        if value is None and (low is None or high is None):
            return None
        return cls(value, low, high)

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def contains_zero(self) -> bool:
        return self.has_interval and self.low <= 0.0 <= self.high

    @property
    def interval(self) -> str:
        return f"[{fmt(self.low)}, {fmt(self.high)}]"

    def text(self) -> str:
        """"value [low, high]", or "value (no interval)" where no interval was logged."""
        if not self.has_interval:
            return f"{fmt(self.value)} {NO_INTERVAL}"
        return f"{fmt(self.value)} {self.interval}" if self.value is not None else self.interval


def points(x: float) -> str:
    return f"{fmt(x)} point{'' if x == 1 else 's'}"


def noise(what: str, diff: Shown) -> str:
    """`what` (e.g. "below zero-shot by 9.7 points") and whether the paired interval says it is noise."""
    if not diff.has_interval:
        return f"{what}: {UNKNOWN_NOISE}"
    if diff.contains_zero:
        return f"{what}: {NOISE}"
    return f"{what}: {SIGNIFICANT} (interval {diff.interval} excludes 0)"


# ---- tasks -------------------------------------------------------------------------------------------------
def _task(name: str):
    """The registered CUGE or demo task, or None for a name this code does not know (an older store)."""
    from cpmant.errors import CpmantError

    try:
        from cpmant.cuge import get_task

        return get_task(name)
    except CpmantError:
        return None


def is_demo(task_name: str) -> bool:
    t = _task(task_name)
    # cpmant.cuge names every demo task demo-* (task_names' include_demo uses the same rule)
    return bool(t.is_demo) if t is not None else task_name.startswith("demo-")


def demo_note(task_name: str) -> str:
    return DEMO_NOTE if is_demo(task_name) else ""


def primary_metric(task_name: str, metrics: list[dict], table: list[dict]) -> str | None:
    """The task's primary metric (cpmant.cuge), else the comparison table's, else the only `test_` score logged."""
    t = _task(task_name)
    if t is not None:
        return str(t.primary_metric)
    named = {r.get("metric") for r in table if r.get("metric")}
    if len(named) == 1:
        return named.pop()
    scores = {k[len("test_"):] for m in metrics for k in m if k.startswith("test_") and not k.endswith(CI_SUFFIXES)}
    return scores.pop() if len(scores) == 1 else None


# ---- delta tuning ------------------------------------------------------------------------------------------
def newest_tuning_runs(runs) -> dict[str, dict]:
    """Per task: {"base", "runs": {method: run}}, the newest finished zero-shot and delta run of each method on the
    base most recently tuned on that task (runs: registry.report_queries.RunRecord, newest first)."""
    out: dict[str, dict] = {}
    for r in runs:
        tags = r.tags
        if tags.get(T.TUNE_KIND) not in (ZERO_SHOT, "delta") or r.status != "FINISHED":
            continue
        task_name, base, method = tags.get(T.TASK), tags.get(T.PARENT, ""), tags.get(T.METHOD)
        if not task_name or not method:
            continue
        entry = out.setdefault(task_name, {"base": base, "runs": {}})
        if entry["base"] == base:
            entry["runs"].setdefault(method, r)
    return out


def _ordered(methods) -> list[str]:
    rest = sorted(m for m in methods if m not in (ZERO_SHOT, FULL))
    return [m for m in (ZERO_SHOT,) if m in methods] + rest + [m for m in (FULL,) if m in methods]


def _difference(metrics: dict, name: str, score: Shown | None, ref: Shown | None) -> Shown | None:
    """The paired difference as logged; else the plain difference of the two scores, with no interval."""
    d = Shown.of(metrics, name)
    plain = (score.value - ref.value if score and ref and score.value is not None and ref.value is not None
             else None)
    if d is None:
        return Shown(plain) if plain is not None else None
    return d if d.value is not None or plain is None else Shown(plain, d.low, d.high)


def _readings(method: str, vs_zero: Shown | None, vs_full: Shown | None) -> list[str]:
    """A sentence for each odd result: a tuned model below zero-shot, a delta method above full fine-tuning."""
    out = []
    if method != ZERO_SHOT and vs_zero and vs_zero.value is not None and vs_zero.value < 0:
        out.append(noise(f"below zero-shot by {points(-vs_zero.value)}", vs_zero))
    if method not in (ZERO_SHOT, FULL) and vs_full and vs_full.value is not None and vs_full.value > 0:
        out.append(noise(f"above full fine-tuning by {points(vs_full.value)}", vs_full))
    return out


def _from_table(row: dict, primary: str) -> dict:
    """A comparison-table row (tasks/tune.py) in the tuning runs' metric names: `score` -> `test_<primary>`,
    `vs_zero_shot` -> `vs_zero_shot_<primary>`, ..., each with its `_ci_low/_ci_high`. A table from before the
    intervals (no `ratio_to_full` column) held the ratio to full in `vs_full`."""
    ratio_in_vs_full = bool(row) and "ratio_to_full" not in row
    names = {"score": f"test_{primary}", "vs_zero_shot": f"vs_zero_shot_{primary}",
             "vs_full": f"{'ratio_to_full' if ratio_in_vs_full else 'vs_full'}_{primary}",
             "ratio_to_full": f"ratio_to_full_{primary}", "trainable_ratio": "trainable_ratio"}
    return {name + s: v for col, name in names.items() for s in ("", *CI_SUFFIXES)
            if (v := _num(row.get(col + s))) is not None}


def task_rows(task_name: str, per_method: dict[str, dict], table: list[dict]) -> dict:
    """One task's rows: score [low, high], the paired differences against zero-shot and full, the ratio to full,
    the share of parameters trained, and the readings. per_method: {method: run metrics}; table: the comparison
    table's rows (their columns fill in what an older run did not log)."""
    by_method = {r.get("method"): r for r in table if r.get("method")}
    methods = _ordered(set(per_method) | set(by_method))
    primary = primary_metric(task_name, list(per_method.values()), table) or "score"
    merged = {m: {**_from_table(by_method.get(m, {}), primary), **per_method.get(m, {})} for m in methods}
    scores = {m: Shown.of(merged[m], f"test_{primary}") for m in methods}
    rows = []
    for m in methods:
        x, s = merged[m], scores[m]
        vs_zero = None if m == ZERO_SHOT else _difference(x, f"vs_zero_shot_{primary}", s, scores.get(ZERO_SHOT))
        vs_full = None if m in (ZERO_SHOT, FULL) else _difference(x, f"vs_full_{primary}", s, scores.get(FULL))
        ratio = None if m in (ZERO_SHOT, FULL) else Shown.of(x, f"ratio_to_full_{primary}")
        rows.append({"method": m, "score": s.text() if s else "", "vs zero-shot": vs_zero.text() if vs_zero else "",
                     "vs full": vs_full.text() if vs_full else "", "ratio to full": ratio.text() if ratio else "",
                     "trainable share": f"{share:.2%}" if (share := _num(x.get("trainable_ratio"))) is not None
                     else "",
                     "reading": "; ".join(_readings(m, vs_zero, vs_full))})
    values = [s.value for s in scores.values() if s and s.value is not None]
    plot = [{"method": m, "metric": primary, "score": s.value, "score_ci_low": s.low, "score_ci_high": s.high,
             "trainable_ratio": _num(merged[m].get("trainable_ratio"))}
            for m, s in scores.items() if s and s.value is not None]
    notes = [n for n in (demo_note(task_name),) if n]
    if values and all(v == 0 for v in values):
        notes.append(f"every model scores 0 on {primary}: the base is too weak for this task at its size, so the "
                     "rows say nothing about the methods")
    return {"task": task_name, "metric": primary, "rows": rows, "notes": notes, "demo": is_demo(task_name),
            "plot": plot}


# ---- the ladder and the held-out loss --------------------------------------------------------------------
def rung_reading(parent_loss: float | None, row: dict, rung_metrics: dict) -> str:
    """A rung whose held-out loss is below its parent's: a single measurement, no interval; how many tokens."""
    loss = _num(row.get("lm_loss"))
    if parent_loss is None or loss is None or loss >= parent_loss:
        return ""
    tokens = _num(rung_metrics.get("eval_tokens"))
    basis = (f"measured on {fmt(int(tokens))} held-out tokens" if tokens is not None
             else "a single measurement (the number of held-out tokens was not logged)")
    return (f"held-out loss {fmt(parent_loss - loss)} below its parent's: the held-out loss difference has no "
            f"interval; {basis}")


def heldout(base_uri: str, ladder_parent: float | None, pretrain: float | None, validate: float | None) -> dict:
    """The base's held-out loss as the ladder's parent row (`parent_lm_loss`), pretraining's `valid_loss_end` and
    validation's `lm_loss`: one measurement, so they must agree to HELDOUT_TOLERANCE; the message says so."""
    named = [("ladder parent row (parent_lm_loss)", ladder_parent), ("pretraining (valid_loss_end)", pretrain),
             ("validation (lm_loss)", validate)]
    rows = [{"measurement": n, "held-out loss": v} for n, v in named if v is not None]
    values = [r["held-out loss"] for r in rows]
    spread = max(values) - min(values) if len(values) > 1 else 0.0
    agree = spread <= HELDOUT_TOLERANCE
    if len(values) < 2:
        msg = f"only one held-out loss of {base_uri} is logged so far: nothing to compare"
    elif agree:
        msg = f"the held-out losses of {base_uri} agree (spread {spread:.2g} <= {HELDOUT_TOLERANCE:g})"
    else:
        msg = (f"the held-out losses of {base_uri} differ by {fmt(spread)} (more than {HELDOUT_TOLERANCE:g}): they "
               "are not one measurement, so the ladder's loss increases and the validation gates are not "
               "measured against the same number")
    return {"model": base_uri, "rows": rows, "spread": spread, "agree": agree or len(values) < 2, "message": msg}


# ---- validation ------------------------------------------------------------------------------------------
def _is_score(name: str) -> bool:
    return name.startswith(SCORE_PREFIXES)


def _base_name(key: str) -> str:
    return next((key[: -len(s)] for s in CI_SUFFIXES if key.endswith(s)), key)


def metric_rows(metrics: dict, task_name: str = "") -> list[dict]:
    """A validation run's metrics as rows of {metric, value, reading}: an interval folded into its value
    ("v [low, high]"; a score logged without one: "v (no interval)"), a negative paired difference read as noise or
    significant, a demo task's score labelled."""
    rows = []
    for n in sorted({_base_name(k) for k in metrics}):
        shown = Shown.of(metrics, n)
        if shown is None:  # half an interval and no value: nothing to show
            continue
        if not shown.has_interval and not _is_score(n):  # a measurement that never has an interval (lm_loss)
            rows.append({"metric": n, "value": fmt(metrics.get(n)), "reading": ""})
            continue
        reading = ""
        ref = {"task_vs_zero_shot": "the base's zero-shot", "task_vs_champion": "the champion"}.get(n)
        if ref and shown.value is not None and shown.value < 0:
            reading = noise(f"below {ref} by {points(-shown.value)}", shown)
        elif ref and shown.value is None and shown.has_interval and shown.high < 0:
            reading = noise(f"below {ref}", shown)
        if n == "task_score" and task_name and is_demo(task_name):
            reading = f"{task_name}: {DEMO_NOTE}" + (f"; {reading}" if reading else "")
        rows.append({"metric": n, "value": shown.text(), "reading": reading})
    return rows


def validation_summary(validations: list[dict]) -> dict:
    """The newest validation of each model: {"passed": [...], "failed": [...], "other": [...]} (each a validation
    as collect() gives it), newest first."""
    newest: dict[str, dict] = {}
    for v in validations:  # newest first already
        newest.setdefault(v["model"], v)
    out: dict[str, list] = {"passed": [], "failed": [], "other": []}
    for v in newest.values():
        out[v["verdict"] if v["verdict"] in ("passed", "failed") else "other"].append(v)
    return out
