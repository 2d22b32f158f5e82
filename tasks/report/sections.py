"""The HTML of each section but the projection (projection_section.py): loss curves, the size ladder and the
base's held-out losses, delta tuning, validation gates, costs per stage, lineage. Each takes collect()'s data."""

from __future__ import annotations

from registry import tags as T

from .collect import COST_METRICS
from .markup import NOT_RUN, esc, img, missing, table
from .plots import plot_ladder_vs_published, plot_loss_curves, plot_stage_costs, plot_task_scores
from .scores import DEMO_NOTE, NO_INTERVAL, is_demo, validation_summary

PUB_COLS = ("published_lm_loss", "published_loss_increase")
PUB_LABELS = {"published_lm_loss": "published LM loss (CPM-Ant)",
              "published_loss_increase": "published loss increase (CPM-Ant 10B ladder)"}
LADDER_COLUMNS = ["model", "attention_layers", "ffn_layers", "num_heads", "dim_ff", "params", "bytes_on_disk",
                  "lm_loss", "loss_increase", "published_loss_increase", "generation_tokens_per_second", "reading"]
DELTA_COLUMNS = ["method", "score", "vs zero-shot", "vs full", "ratio to full", "trainable share", "reading"]
DELTA_LEGEND = ("Scores are on each task's test split with a 95% bootstrap interval over examples, written "
                "value [low, high]. <i>vs zero-shot</i> and <i>vs full</i> are paired differences in points (the "
                "method minus the reference, both scored on the same examples, one paired bootstrap); <i>ratio to "
                "full</i> is the method's score over full fine-tuning's. A result logged without an interval (an "
                f"older run) reads &ldquo;{NO_INTERVAL}&rdquo;. Where a tuned model is below zero-shot or a delta "
                "above full fine-tuning, the reading says whether the paired interval contains 0 (noise) or not.")
# a validation run's param `promote` is whether promotion was asked for, not whether it happened (cpmant.promoted)
DECISION_LABELS = {"promote": "promotion asked for (if every gate passes)", T.PROMOTED: "promoted to champion"}


def loss_html(curves: list[dict]) -> str:
    if not curves:
        return missing(f"pretraining: {NOT_RUN}")
    rows = [{"run": c["run"], "run_id": c["run_id"], "steps": c["steps"][-1], "first loss": c["loss"][0],
             "last loss": c["loss"][-1], "held-out loss": c["valid_loss"][-1] if c["valid_loss"] else None}
            for c in curves]
    return img(plot_loss_curves(curves), "pretraining loss curves") + table(rows)


def ladder_html(lad: dict | None, heldout: dict | None, published: list[dict]) -> str:
    """Our ladder (plot, table, the base's held-out losses) above CPM-Ant's published one."""
    if lad:
        body = img(plot_ladder_vs_published(lad["rows"]), "size ladder against the published ladder")
        body += "<p>Ours (run <code>" + esc(lad["run_id"]) + "</code>):</p>"
        body += table(lad["rows"], LADDER_COLUMNS, PUB_LABELS, PUB_COLS)
        body += ('<p class="note">Held-out losses are single measurements on the held-out rows: a difference '
                 "between two of them has no interval.</p>")
        body += heldout_html(heldout)
    else:
        body = missing(f"compression ladder: {NOT_RUN}")
    body += "<p>CPM-Ant's published ladder (reference figures, not measurements):</p>"
    return body + table(published, None, PUB_LABELS, PUB_COLS)


def heldout_html(h: dict | None) -> str:
    """The base's held-out loss as the ladder, pretraining and validation logged it; a visible warning when they
    differ by more than the tolerance."""
    if not h:
        return ""
    cls = "note" if h["agree"] else "warn"
    lead = "" if h["agree"] else "<b>Held-out losses disagree.</b> "
    return (f'<p class="{cls}">{lead}{esc(h["message"][0].upper() + h["message"][1:])}.</p>'
            + table([{**r, "held-out loss": f"{r['held-out loss']:.6f}"} for r in h["rows"]],
                    ["measurement", "held-out loss"]))


def _task_html(name: str, t: dict, logged: dict | None) -> str:
    """One task: a demo label where it is one, the notes, the rows with intervals and readings; the comparison
    table as the tune stage logged it below."""
    badge = f' <span class="demo">{esc(DEMO_NOTE)}</span>' if t["demo"] else ""
    body = f"<h3>{esc(name)}{badge}</h3>"
    body += "".join(f'<p class="note">{esc(n)}</p>' for n in t["notes"] if n != DEMO_NOTE)
    body += img(plot_task_scores(t), f"{name}: each score with its 95% interval")
    body += table(t["rows"], DELTA_COLUMNS,
                  {"score": f"test {t['metric']} [95% interval]", "trainable share": "trained share"})
    if logged:
        body += ("<details><summary>the comparison table as logged (run <code>" + esc(logged["run_id"])
                 + "</code>)</summary>" + table(logged["rows"]) + "</details>")
    return body


def deltas_html(d: dict) -> str:
    body = "".join(_task_html(name, t, d["tables"].get(name)) for name, t in sorted(d.get("tasks", {}).items()))
    body = f'<p class="note">{DELTA_LEGEND}</p>' + body if body else ""
    if d["versions"]:
        body += "<p>Registered deltas:</p>" + table(d["versions"], ["uri", "parent", "aliases", "run_id"])
    return body or missing(f"delta tuning: {NOT_RUN}")


def _validation_summary_html(validations: list[dict]) -> str:
    sm = validation_summary(validations)
    head = (f"<p class='vsummary'><b>{len(sm['passed'])} passed, {len(sm['failed'])} failed</b>"
            + (f", {len(sm['other'])} without a verdict" if sm["other"] else "")
            + f" (the newest validation of each of {sum(map(len, sm.values()))} models; {len(validations)} "
            "validation runs in all).</p>")
    if sm["failed"]:
        items = "".join(f"<li><code>{esc(v['model'])}</code>: {esc(v['failures'] or 'no failed gate recorded')}"
                        f" (run <a href='#v-{esc(v['run_id'])}'>{esc(v['run'])}</a>)</li>" for v in sm["failed"])
        head += f'<div class="warn"><b>Failed:</b><ul>{items}</ul></div>'
    return head


def _validation_block(v: dict) -> str:
    """One validation run as a collapsible block headed by the model validated and its verdict; open if failed."""
    failed = v["verdict"] == "failed"
    badge = f' <span class="demo">{esc(DEMO_NOTE)}</span>' if v["task"] and is_demo(v["task"]) else ""
    verdict = f'<span class="{"fail" if failed else "ok"}">{esc(v["verdict"].upper())}</span> ' if v["verdict"] else ""
    inner = f'<p class="warn">Failed gates: {esc(v["failures"] or "none recorded")}</p>' if failed else ""
    if v["decisions"]:
        inner += table([{"gate / decision": DECISION_LABELS.get(k, k), "value": x}
                        for k, x in sorted(v["decisions"].items()) if x != ""])
    inner += table(v["metric_rows"], ["metric", "value", "reading"], {"value": "value [95% interval]"})
    for p, rows in v["tables"].items():
        inner += f"<p>{esc(p)}</p>" + table(rows)
    return (f'<details id="v-{esc(v["run_id"])}" class="{"vfail" if failed else "vrun"}"'
            f'{" open" if failed else ""}><summary><h3>{verdict}{esc(v["model"])} <small>run '
            f"{esc(v['run'])}</small>{badge}</h3></summary>{inner}</details>")


def validation_html(validations: list[dict]) -> str:
    """A summary (how many passed and failed, which failed and why), then one block per validation run,
    failures first (stable: newest first within each)."""
    if not validations:
        return missing(f"validation: {NOT_RUN}")
    blocks = sorted(validations, key=lambda v: v["verdict"] != "failed")
    return _validation_summary_html(validations) + "".join(_validation_block(v) for v in blocks)


def costs_html(stages: list[dict], runs: list[dict]) -> str:
    body = img(plot_stage_costs(stages), "energy, emissions and cost per stage")
    body += table(stages, ["stage", "runs", *COST_METRICS])
    if runs:
        body += "<details><summary>every run</summary>" + table(
            runs, ["run", "stage", "status", *COST_METRICS, "run_id"]) + "</details>"
    return body


def _chain_html(chain: list[dict]) -> str:
    if chain[0].get("error"):
        return (f'<p class="warn"><code>{esc(chain[0]["uri"])}</code>: its lineage cannot be read: '
                f"{esc(chain[0]['error'])}</p>")
    base = chain[-1]
    steps = [f"corpus data:{esc(base['data_sha256'][:16])}"]
    for c in reversed(chain):
        alias = f", @{esc(','.join(c['aliases']))}" if c["aliases"] else ""
        steps.append(f"<code>{esc(c['uri'])}</code> ({esc(c['stage'])}{alias})")
    return f"<p class='chain'>{' &rarr; '.join(steps)} <span class='note'>code {esc(base['git_sha'][:12])}</span></p>"


def lineage_html(chains: list[list[dict]]) -> str:
    """One line per chain, oldest first, under a count: the chains and the registered models they cover."""
    if not chains:
        return missing(f"registered models: {NOT_RUN}")
    names = {c["name"] for chain in chains for c in chain}
    body = (f'<p class="note lineage-count">{len(chains)} chain{"s" if len(chains) != 1 else ""}, one per version '
            f"nobody descends from, covering {len(names)} registered models.</p>")
    return body + "".join(_chain_html(chain) for chain in chains)
