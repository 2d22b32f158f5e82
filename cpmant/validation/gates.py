"""The promotion gates as checks (pure: no MLflow here; registry/promotion.py decides each check with MLflow's own
`mlflow.validate_evaluation_results` and `MetricThreshold`).

`plan_checks(cfg, stage, candidate, parent, champion)` turns every gate that applies to the model's stage into one
check per reference (its value threshold; its parent; the champion), each a MetricThreshold's arguments plus the
baseline value, and the limit the candidate's value must reach, computed with MLflow's formulas (so that a failure
names the metric, the value and the limit). A comparison whose reference is absent is skipped, with the reason.

`max_relative_regression` (a tolerance: at most x worse than the reference) has no MetricThreshold argument
(MLflow's changes must be positive improvements), so it becomes MLflow's value threshold at reference * (1 +/- x).

References measured in the same validation run (config.py's module docstring):
- a timing gate's champion comparison takes its baseline from the candidate's report, `champion_<metric>` (the
  champion timed beside the candidate), never from a recorded run;
- an interval gate (`task_vs_zero_shot`, `task_vs_champion`) checks one bound of the paired difference's interval:
  `above` = `<metric>_ci_low` > threshold (MLflow's `>=` at the next float above it), `not_below` =
  `<metric>_ci_high` >= threshold.
Held-out metrics (`perplexity`, `lm_loss`) compare with a parent or champion only when both were measured on the
same held-out rows with the same vocab (the same `heldout_sha256` in their metrics); otherwise the comparison is
skipped with the reason.
A measurement the suite could not make is skipped with the suite's reason (`unmeasured`: metric -> why, e.g.
"no champion"); a missing measurement without a reason fails.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .config import INTERVAL_GATES, TIMED_METRICS, ValidateConfig

REFERENCES = ("threshold", "parent", "champion")
# measured on the held-out rows (cpmant/heldout.py): compared only with a reference measured on the same rows
HELDOUT_METRICS = ("perplexity", "lm_loss")
HELDOUT_ID = "heldout_sha256"  # the rows' identity, beside the metrics (data, vocab, spec)
_ZERO_EPS = 1e-10  # MLflow's fallback step when a relative change is asked of a zero baseline


@dataclass(frozen=True)
class Check:
    metric: str
    against: str  # threshold | parent | champion
    greater_is_better: bool
    value: float | None  # the candidate's
    baseline: float | None  # the reference's value (None for a value threshold)
    threshold: float | None = None  # MetricThreshold(threshold=)
    min_absolute_change: float | None = None  # MetricThreshold(min_absolute_change=)
    min_relative_change: float | None = None  # MetricThreshold(min_relative_change=)
    rule: str = ""  # the gate in words, e.g. "<= champion x 1.1"
    limit: float | None = None  # the strictest value that passes
    interval: tuple[float, float, float] | None = None  # an interval gate's (value, low, high)

    def to_dict(self) -> dict:
        return asdict(self)


def _limits(gib: bool, baseline: float, abs_change: float | None, rel_change: float | None) -> float:
    """MLflow's comparison: the value a candidate must reach to improve on `baseline` as asked (the stricter)."""
    sign = 1.0 if gib else -1.0
    lims = []
    if abs_change is not None:
        lims.append(baseline + sign * abs_change)
    if rel_change is not None:
        lims.append(baseline + sign * (rel_change * abs(baseline) if baseline != 0 else _ZERO_EPS))
    return max(lims) if gib else min(lims)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def interval_check(metric: str, gate, candidate: dict, unmeasured: dict) -> Check | dict:
    """The check of an interval gate, or the skipped comparison {"metric", "against", "reason"} when the suite
    could not measure the difference (no champion, no base)."""
    against = INTERVAL_GATES.get(metric, "threshold")
    value, low, high = (candidate.get(f"{metric}{s}") for s in ("", "_ci_low", "_ci_high"))
    if value is None and metric in unmeasured:
        return {"metric": metric, "against": against, "reason": unmeasured[metric]}
    t = float(gate.threshold)
    ref = against.replace("_", "-")
    if gate.interval == "above":  # strictly above: MLflow's >= at the next float above t
        name, bound, limit, rule = (f"{metric}_ci_low", low, math.nextafter(t, math.inf),
                                    f"95% interval above {_fmt(t)}: lower bound > {_fmt(t)} (better than {ref})")
    else:
        name, bound, limit, rule = (f"{metric}_ci_high", high, t,
                                    f"95% interval not below {_fmt(t)}: upper bound >= {_fmt(t)} (not worse than "
                                    f"{ref})")
    iv = None if None in (value, low, high) else (float(value), float(low), float(high))
    return Check(name, against, True, bound, None, threshold=limit, rule=rule, limit=t, interval=iv)


def heldout_mismatch(candidate: dict, ref: dict, against: str) -> str:
    """Why a held-out metric cannot be compared with `ref` ("" when it can): the two were measured on other rows or
    with another vocab (their heldout_sha256 differ), or a side does not say which rows it was measured on."""
    mine, theirs = candidate.get(HELDOUT_ID), ref.get(HELDOUT_ID)
    if not mine or not theirs:
        who = "the candidate's" if not mine else f"the {against}'s"
        return f"{who} measurement does not record its held-out rows ({HELDOUT_ID}): it may be on other rows"
    if mine != theirs:
        return (f"the {against} was measured on other held-out rows or with another vocab ({HELDOUT_ID} "
                f"{theirs[:12]} vs the candidate's {mine[:12]})")
    return ""


def _timed_baseline(metric: str, candidate: dict, unmeasured: dict, champion: dict | None) -> tuple[float | None, str]:
    """A timing's champion baseline: the champion measured beside the candidate in this run, or (None, why)."""
    base = candidate.get(f"champion_{metric}")
    if base is not None:
        return float(base), ""
    why = unmeasured.get(f"champion_{metric}") or ("no champion" if champion is None else
                                                   "the champion was not timed in this run")
    return None, why


def plan_checks(cfg: ValidateConfig, stage: str, candidate: dict, parent: dict | None,
                champion: dict | None, unmeasured: dict | None = None) -> tuple[list[Check], list[dict]]:
    """(checks to decide, skipped comparisons [{"metric", "against", "reason"}]). `parent` / `champion` are the
    references' metrics (None when there is none to compare with); `unmeasured`: what the suite could not measure
    and why (metric -> reason)."""
    checks: list[Check] = []
    skipped: list[dict] = []
    refs = {"parent": parent, "champion": champion}
    unmeasured = unmeasured or {}
    for metric, gate in cfg.gates.items():
        if not gate.enabled or stage not in gate.stages:
            continue
        if gate.interval is not None:
            got = interval_check(metric, gate, candidate, unmeasured)
            (checks if isinstance(got, Check) else skipped).append(got)
            continue
        gib = cfg.direction(metric)
        value = candidate.get(metric)
        op = ">=" if gib else "<="
        if gate.threshold is not None:
            checks.append(Check(metric, "threshold", gib, value, None, threshold=float(gate.threshold),
                                rule=f"{op} {_fmt(gate.threshold)}", limit=float(gate.threshold)))
        for against in ("parent", "champion"):
            comp = getattr(gate, against)
            if comp is None:
                continue
            ref = refs[against]
            if metric in TIMED_METRICS and against == "champion":
                base, why = _timed_baseline(metric, candidate, unmeasured, ref)
            else:
                base = None if ref is None else ref.get(metric)
                why = f"no {against}" if ref is None else f"the {against} has no {metric}"
                if base is not None and metric in HELDOUT_METRICS:
                    why = heldout_mismatch(candidate, ref, against)
                    base = None if why else base
            if base is None:
                skipped.append({"metric": metric, "against": against, "reason": why})
                continue
            base = float(base)
            if comp.min_absolute_change is not None or comp.min_relative_change is not None:
                parts = []
                if comp.min_absolute_change is not None:
                    parts.append(f"{'+' if gib else '-'}{_fmt(comp.min_absolute_change)}")
                if comp.min_relative_change is not None:
                    parts.append(f"{'+' if gib else '-'}{comp.min_relative_change:.1%}")
                checks.append(Check(metric, against, gib, value, base,
                                    min_absolute_change=comp.min_absolute_change,
                                    min_relative_change=comp.min_relative_change,
                                    rule=f"{op} {against} {' and '.join(parts)}",
                                    limit=_limits(gib, base, comp.min_absolute_change, comp.min_relative_change)))
            if comp.max_relative_regression is not None:
                x = comp.max_relative_regression
                limit = base + x * abs(base) if not gib else base - x * abs(base)
                checks.append(Check(metric, against, gib, value, base, threshold=float(limit),
                                    rule=f"{op} {against} {'+' if not gib else '-'}{x:.0%} (at most {x:.0%} worse)",
                                    limit=float(limit)))
    return checks, skipped


def describe_interval(check: Check) -> str:
    """`task_vs_zero_shot -2.1 [-6.3, 1.9] (95% interval above 0: ...)`: the difference, its interval, the rule."""
    v, lo, hi = check.interval
    name = check.metric.rsplit("_ci_", 1)[0]
    return f"{name} {_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}] ({check.rule})"


def describe_failure(check: Check) -> str:
    """`perplexity 512.3 > 300 (<= parent +300%: parent 75)`: the metric, its value and the limit."""
    if check.value is None:
        return f"{check.metric} missing (limit {check.rule})"
    if check.interval is not None:
        return f"{describe_interval(check)}: failed"
    bad = "<" if check.greater_is_better else ">"
    ref = "" if check.baseline is None else f": {check.against} {_fmt(check.baseline)}"
    return f"{check.metric} {_fmt(check.value)} {bad} {_fmt(check.limit)} ({check.rule}{ref})"
