"""A validation's record as people read it: the three-way comparison (candidate, parent, champion), the interval
gates' evidence lines, the failed gates' tags and the markdown report (an MLflow artifact, the run's description via
tasks/notes.py, and a Prefect artifact).

    comparison_rows(candidate, parent, champion) -> [{"metric", "candidate", "parent", "champion"}]
    in_run_champion(champion, candidate) -> the champion's metrics with those measured beside the candidate
    evidence_lines(checks, decided, skipped) -> ["task_vs_zero_shot +3.1 [1.2, 5.0] > 0: pass", ...]
    gate_tags(failed) -> {cpmant.gate.<metric>.<against>: why}
    render_markdown(res, report, rows, decided, skipped) -> str
"""

from __future__ import annotations

from cpmant.validation.config import INTERVAL_GATES, TIMED_METRICS
from cpmant.validation.gates import describe_interval
from registry import tags as T

# the metrics the summary shows and the comparison table lists first
KEY_METRICS = ("perplexity", "lm_loss", "tokens_per_second", "first_token_ms_p50", "first_token_ms_p95",
               "peak_memory_mb", "smoke_pass_rate", "unk_rate", "loop_rate", "task_score")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def in_run_champion(champion: dict | None, candidate: dict) -> dict | None:
    """The champion's metrics with those measured beside the candidate in this run (timings, task score) in place
    of its recorded ones."""
    here = {m: candidate[f"champion_{m}"] for m in (*TIMED_METRICS, "task_score") if f"champion_{m}" in candidate}
    if champion is None and not here:
        return None
    return {**(champion or {}), **here}


def evidence_lines(checks: list, decided: list[dict], skipped: list[dict]) -> list[str]:
    """The interval gates' record: each difference with its 95% interval and the decision, or why it was
    skipped."""
    out = [f"{describe_interval(c)}: {'pass' if d['passed'] else 'FAIL'}"
           for c, d in zip(checks, decided) if c.interval is not None]
    out += [f"{s['metric']}: skipped ({s['reason']})" for s in skipped if s["metric"] in INTERVAL_GATES]
    return out


def comparison_rows(candidate: dict, parent: dict | None, champion: dict | None) -> list[dict]:
    """The three-way comparison: one row per metric the candidate has (key metrics first)."""
    names = [m for m in KEY_METRICS if m in candidate] + sorted(m for m in candidate if m not in KEY_METRICS)
    return [{"metric": m, "candidate": candidate.get(m), "parent": (parent or {}).get(m),
             "champion": (champion or {}).get(m)} for m in names]


def render_markdown(res: dict, report: dict, rows: list[dict], decided: list[dict], skipped: list[dict]) -> str:
    verdict = "PASSED" if res["passed"] else "FAILED"
    lines = [f"# Validation of {res['model']} ({report['kind']}): {verdict}", ""]
    lines.append(f"- parent: {res['parent'] or 'none'}; champion before: {res['champion'] or 'none'}")
    lines.append(f"- promoted to champion: {'yes' if res['promoted'] else 'no'}")
    if res["failures"]:
        lines += ["", "## Failed gates", ""] + [f"- {f}" for f in res["failures"]]
    lines += ["", "## Candidate, parent, champion", "", "| metric | candidate | parent | champion |",
              "|---|---|---|---|"]
    lines += [f"| {r['metric']} | {_fmt(r['candidate'])} | {_fmt(r['parent'])} | {_fmt(r['champion'])} |"
              for r in rows]
    lines += ["", "## Gates (MLflow MetricThreshold)", "", "| metric | against | rule | value | limit | result |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {d['metric']} | {d['against']} | {d.get('evidence') or d['rule']} | {_fmt(d['value'])} | "
              f"{_fmt(d['limit'])} | {'pass' if d['passed'] else 'FAIL'} |" for d in decided]
    lines += [f"| {s['metric']} | {s['against']} | skipped: {s['reason']} | | | |" for s in skipped]
    lines += ["", "## Sample generations", "", "| prompt | continuation | checks |", "|---|---|---|"]
    for s in report["samples"]:
        text = s["text"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s['prompt']} | {text} | {'ok' if s['passed'] else ', '.join(s['problems'])} |")
    if report.get("task"):
        t = report["task"]
        lines += ["", f"## Task {t['name']} ({t['examples']} test examples)", ""]
        lines += [f"- {k}: {_fmt(v)}{' (primary)' if k == t['primary_metric'] else ''}"
                  for k, v in t["metrics"].items()]
        m = res["metrics"]
        for name, what in (("task_score", "score"), ("task_vs_zero_shot", "minus its base zero-shot"),
                           ("task_vs_champion", "minus the champion")):
            if m.get(name) is not None:
                lines.append(f"- {name} ({what}, same examples): {_fmt(m[name])} "
                             f"[{_fmt(m.get(name + '_ci_low'))}, {_fmt(m.get(name + '_ci_high'))}] (95% interval)")
    secs = ", ".join(f"{k} {v:.2f} s" for k, v in report["seconds"].items())
    lines += ["", f"Time: {secs}.", ""]
    return "\n".join(lines)


def gate_tags(failed: list) -> dict[str, str]:
    """One run tag per failed gate (its interval, or its value against its limit); registry.runs cuts the values."""
    return {f"{T.GATE_PREFIX}{c.metric}.{c.against}": (
        f"failed: {describe_interval(c)}" if c.interval is not None else
        f"failed: {c.metric} {_fmt(c.value)}, limit {_fmt(c.limit)} ({c.rule})") for c in failed}
