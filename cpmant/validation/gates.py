"""The promotion gates as checks (pure: no MLflow here; registry/promotion.py decides each check with MLflow's own
`mlflow.validate_evaluation_results` and `MetricThreshold`).

`plan_checks(cfg, stage, candidate, parent, champion)` turns every gate that applies to the model's stage into one
check per reference (its value threshold; its parent; the champion), each a MetricThreshold's arguments plus the
baseline value, and the limit the candidate's value must reach, computed with MLflow's formulas (so that a failure
names the metric, the value and the limit). A comparison whose reference is absent is skipped, with the reason.

`max_relative_regression` (a tolerance: at most x worse than the reference) has no MetricThreshold argument
(MLflow's changes must be positive improvements), so it becomes MLflow's value threshold at reference * (1 +/- x).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ValidateConfig

REFERENCES = ("threshold", "parent", "champion")
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


def plan_checks(cfg: ValidateConfig, stage: str, candidate: dict, parent: dict | None,
                champion: dict | None) -> tuple[list[Check], list[dict]]:
    """(checks to decide, skipped comparisons [{"metric", "against", "reason"}]). `parent` / `champion` are the
    references' metrics (None when there is none to compare with)."""
    checks: list[Check] = []
    skipped: list[dict] = []
    refs = {"parent": parent, "champion": champion}
    for metric, gate in cfg.gates.items():
        if not gate.enabled or stage not in gate.stages:
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
            base = None if ref is None else ref.get(metric)
            if base is None:
                why = f"no {against}" if ref is None else f"the {against} has no {metric}"
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


def describe_failure(check: Check) -> str:
    """`perplexity 512.3 > 300 (<= parent +300%: parent 75)`: the metric, its value and the limit."""
    if check.value is None:
        return f"{check.metric} missing (limit {check.rule})"
    bad = "<" if check.greater_is_better else ">"
    ref = "" if check.baseline is None else f": {check.against} {_fmt(check.baseline)}"
    return f"{check.metric} {_fmt(check.value)} {bad} {_fmt(check.limit)} ({check.rule}{ref})"
