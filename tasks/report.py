"""The lifecycle report: one self-contained HTML page (inline CSS, plots as inline base64 PNG, no external URL) read
from MLflow, written under CPMANT_HOME (or where asked), logged as an artifact of a `report` run and summarised as a
Prefect markdown artifact.

    collect(experiment) -> dict                   every section's data, read from the tracking store
    render_html(data) -> str                      the page
    render_markdown(data, path) -> str            the Prefect artifact's summary
    write_report(tracking, out=None) -> dict      the task: collect, render, write, log; {"path", "run_id", ...}

Sections: loss curves (pretraining runs' `loss` history), the size ladder beside CPM-Ant's published ladder, delta
tuning against full fine-tuning per task (scores with their intervals, demo tasks labelled, odd results read as
noise or significant: tasks/report_scores.py decides what is said), the validation gates and their decisions
(a summary of what passed and failed first, a collapsible block per run, failures first), energy / emissions / cost
per stage, the lineage from corpus to deltas (every chain, aliases as MLflow shows them), and the projection of a
full 10B pretraining run (cpmant.projection).
A section whose stage has not run yet says so. Published figures are labelled columns and run params, never
metrics.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from cpmant import projection as P
from registry import tags as T

from . import report_scores as RS
from .config import TrackingConfig

REPORT_STAGE = "report"  # the `report` run's cpmant.stage tag
NOT_STAGES = ("report", "lifecycle")  # runs that make nothing themselves: not summed per stage
COST_METRICS = ("energy_kwh", "emissions_kg_co2e", "cost_rmb", "duration_s")
PUBLISHED_LADDER_BASE_LOSS = 2.420  # CPM-Ant 10B's published LM loss (CPM-ANT.md)
MAX_CURVES = 6
NOT_RUN = "not run yet"


# ---- reading MLflow ------------------------------------------------------------------------------------------
def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _runs(exp_ids: list[str], stage: str | None = None, max_results: int = 500) -> list:
    flt = f"tags.`{T.STAGE}` = '{stage}'" if stage else ""
    return _client().search_runs(exp_ids, filter_string=flt, max_results=max_results,
                                 order_by=["attributes.start_time DESC"])


def _tables(run) -> dict[str, dict]:
    """The tables a run logged with mlflow.log_table (listed in its `mlflow.loggedArtifacts` tag): path -> table
    as {"columns": [...], "data": [[...]]}."""
    import mlflow

    try:
        listed = json.loads(run.data.tags.get("mlflow.loggedArtifacts", "[]"))
    except ValueError:
        return {}
    out = {}
    for a in listed:
        if a.get("type") == "table":
            try:
                out[a["path"]] = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{a['path']}")
            except Exception:  # an artifact store that lost it: the rest of the report still renders
                continue
    return out


def _rows(table: dict) -> list[dict]:
    cols = table.get("columns") or []
    return [dict(zip(cols, r)) for r in table.get("data") or []]


def _run_row(run) -> dict:
    return {"run": run.info.run_name, "run_id": run.info.run_id, "status": run.info.status,
            "stage": run.data.tags.get(T.STAGE, ""), "start": run.info.start_time,
            **{k: run.data.metrics.get(k) for k in COST_METRICS}}


def _loss_curves(runs) -> list[dict]:
    client = _client()
    out = []
    for r in runs[:MAX_CURVES]:
        hist = sorted(client.get_metric_history(r.info.run_id, "loss"), key=lambda m: m.step)
        valid = sorted(client.get_metric_history(r.info.run_id, "valid_loss"), key=lambda m: m.step)
        if hist:
            out.append({"run": r.info.run_name, "run_id": r.info.run_id,
                        "steps": [m.step for m in hist], "loss": [m.value for m in hist],
                        "valid_steps": [m.step for m in valid], "valid_loss": [m.value for m in valid]})
    return out


def published_ladder() -> list[dict]:
    """CPM-Ant's released ladder (CPM-ANT.md): shapes and LM losses, from the recipes' published figures."""
    from cpmant.compress.recipe import LADDER, RECIPES

    rows = [{"model": "10B", "attention_layers": 48, "ffn_layers": 48, "num_heads": 32, "dim_ff": 10240,
             "published_lm_loss": PUBLISHED_LADDER_BASE_LOSS, "published_loss_increase": 0.0}]
    for name in LADDER:
        r = RECIPES[name]
        shape = r.target_shape(_ten_b())
        rows.append({"model": name.upper(), "attention_layers": shape.get("att_layers"),
                     "ffn_layers": shape.get("ffn_layers"), "num_heads": shape.get("num_heads"),
                     "dim_ff": shape.get("dim_ff"),
                     "published_lm_loss": round(PUBLISHED_LADDER_BASE_LOSS * (1 + r.published_loss_increase), 3),
                     "published_loss_increase": r.published_loss_increase})
    return rows


def _ten_b():
    from cpmant.config import get_preset

    return get_preset("10b")


def _ladder(exp_ids, versions: list[dict]) -> dict | None:
    """The newest ladder table; each rung's run metrics read through its registered version, the parent's
    held-out loss as the rungs logged it (`parent_lm_loss`), and a reading beside a rung below its parent."""
    for r in _runs(exp_ids, "compress"):
        if r.info.run_name != "compress-ladder":
            continue
        t = _tables(r).get("ladder.json")
        if t:
            rows = [_ladder_row(row) for row in _rows(t)]
            by_uri = {v["uri"]: v for v in versions}
            rungs = {row.get("model"): _run_metrics(by_uri.get(row.get("model"), {}).get("run_id"))
                     for row in rows[1:]}
            parent = next((by_uri[u]["parent"] for u in rungs if u in by_uri and by_uri[u]["parent"]),
                          rows[0].get("model") if rows else "")
            parent_loss = next((m["parent_lm_loss"] for m in rungs.values() if "parent_lm_loss" in m),
                               rows[0].get("lm_loss") if rows else None)
            for row in rows[1:]:
                row["reading"] = RS.rung_reading(parent_loss, row, rungs.get(row.get("model"), {}))
            return {"run_id": r.info.run_id, "rows": rows, "parent": parent, "parent_lm_loss": parent_loss}
    return None


# counts: logged through a table whose column held a None they come back as floats (384.0); shown as integers
COUNT_COLUMNS = ("attention_layers", "ffn_layers", "num_heads", "dim_ff", "params", "bytes_on_disk")


def _ladder_row(row: dict) -> dict:
    """A ladder.json row with the published column under its key, counts as integers, and the short name."""
    from cpmant.compress.recipe import PUBLISHED_LABEL

    out = {("published_loss_increase" if k == PUBLISHED_LABEL else k): v for k, v in row.items()}
    for c in COUNT_COLUMNS:
        if isinstance(out.get(c), float) and out[c].is_integer():
            out[c] = int(out[c])
    out.setdefault("name", str(out.get("model", "")).removeprefix("models:/"))
    return out


def _run_metrics(run_id: str | None) -> dict:
    if not run_id:
        return {}
    try:
        return dict(_client().get_run(run_id).data.metrics)
    except Exception:  # a version whose run was deleted: its row still renders, without a reading
        return {}


def _heldout(ladder: dict | None, versions: list[dict], validation: list[dict]) -> dict | None:
    """The ladder parent's three held-out losses (ladder `parent_lm_loss`, pretraining `valid_loss_end`, the newest
    finished validation's `lm_loss`), checked to be one measurement."""
    if not ladder or not ladder.get("parent"):
        return None
    uri = ladder["parent"]
    version = next((v for v in versions if v["uri"] == uri), None)
    pre = _run_metrics(version["run_id"] if version else None).get("valid_loss_end")
    val = next((v["metrics"].get("lm_loss") for v in validation
                if v["model"] == uri and v["status"] == "FINISHED" and "lm_loss" in v["metrics"]), None)
    return RS.heldout(uri, ladder.get("parent_lm_loss"), pre, val)


def _deltas(exp_ids) -> dict:
    """Per task: the comparison table (zero-shot, each delta method, full fine-tuning) of the newest `compare-*`
    run; and the registered delta versions."""
    tables: dict[str, dict] = {}
    runs = _runs(exp_ids, "delta")
    for r in runs:
        for path, t in _tables(r).items():
            if path.startswith("comparison-"):
                task_name = r.data.tags.get("cpmant.task") or path[len("comparison-"):-len(".json")]
                tables.setdefault(task_name, {"run_id": r.info.run_id, "rows": _rows(t),
                                              "base": r.data.tags.get(T.PARENT, "")})
    tuned = RS.newest_tuning_runs(runs)
    tasks = {}
    for name in sorted(set(tuned) | set(tables)):
        runs_ = tuned.get(name, {}).get("runs", {})
        table = tables.get(name, {})
        same_base = not runs_ or table.get("base", "") in ("", tuned[name]["base"])  # a table of another base: left out
        tasks[name] = RS.task_rows(name, {m: dict(r.data.metrics) for m, r in runs_.items()},
                                   table.get("rows", []) if same_base else [])
    versions = [v for v in _all_versions() if v["stage"] == "delta"]
    return {"tables": tables, "tasks": tasks, "versions": versions, "runs": len(runs)}


def _validation(exp_ids, versions: list[dict]) -> list[dict]:
    """Each validation run: the version it validated (run tag cpmant.model), that version's task (a delta's),
    its gates and decisions, its metrics (scores with their intervals, as rows) and tables."""
    task_of = {v["uri"]: v["task"] for v in versions}
    out = []
    for r in _runs(exp_ids, "validate"):
        tags = {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.") and k != T.STAGE}
        decisions = {k: v for k, v in {**r.data.params, **tags}.items()
                     if any(w in k.lower() for w in ("gate", "decision", "pass", "verdict", "promot"))
                     or k in (T.VALIDATION, T.VALIDATION_FAILURES, T.VALIDATION_EVIDENCE)}
        model = (tags.get(T.MODEL) or r.data.params.get("model") or r.data.params.get("model_uri")
                 or tags.get(T.PARENT, ""))
        metrics = {k: v for k, v in sorted(r.data.metrics.items()) if k not in COST_METRICS}
        out.append({"run": r.info.run_name, "run_id": r.info.run_id, "status": r.info.status, "model": model,
                    "verdict": _verdict(r.info.status, tags), "failures": tags.get(T.VALIDATION_FAILURES, ""),
                    "promoted": tags.get("cpmant.promoted", ""), "start": r.info.start_time,
                    "task": task_of.get(model) or tags.get(T.TASK, ""), "metrics": metrics,
                    "metric_rows": RS.metric_rows(metrics, task_of.get(model) or tags.get(T.TASK, "")),
                    "decisions": decisions, "tables": {p: _rows(t) for p, t in _tables(r).items()}})
    return out


def _aliases() -> dict[tuple[str, str], list[str]]:
    """(name, version) -> its aliases, as MLflow's registry shows them. search_model_versions leaves a version's
    `aliases` empty (MLflow fills them in get_model_version only), so they are read from the registered models."""
    out: dict[tuple[str, str], list[str]] = {}
    for rm in _client().search_registered_models(max_results=1000):
        for alias, version in (rm.aliases or {}).items():
            out.setdefault((rm.name, str(version)), []).append(alias)
    return out


def _verdict(status: str, tags: dict) -> str:
    """passed | failed (the `cpmant.validation` tag), "did not finish" for a run that ended otherwise, "" when
    neither is known (a run from before the tag)."""
    if tags.get(T.VALIDATION) in ("passed", "failed"):
        return tags[T.VALIDATION]
    return "did not finish" if status in ("FAILED", "KILLED") else ""


def _all_versions() -> list[dict]:
    client = _client()
    aliases = _aliases()
    out = []
    for mv in client.search_model_versions(max_results=1000):
        t = mv.tags or {}
        out.append({"uri": f"models:/{mv.name}/{mv.version}", "name": mv.name, "version": str(mv.version),
                    "stage": t.get(T.STAGE, ""), "parent": t.get(T.PARENT, ""), "run_id": mv.run_id,
                    "task": t.get(T.TASK, ""), "aliases": aliases.get((mv.name, str(mv.version)), [])})
    return out


def _lineages(versions: list[dict]) -> list[list[dict]]:
    """The chain of every version nobody descends from (deltas first, then variants, then bases), none left out:
    a chain that cannot be read (a broken parent tag) is a one-step chain whose `error` says why."""
    from registry.ancestry import lineage

    parents = {v["parent"] for v in versions if v["parent"]}
    leaves = [v for v in versions if v["uri"] not in parents]
    order = {"delta": 0, "compress": 1, "pretrain": 2}
    leaves.sort(key=lambda v: (order.get(v["stage"], 3), v["name"], -int(v["version"])))
    out = []
    for v in leaves:
        try:
            out.append(lineage(v["uri"]))
        except Exception as e:  # shown as such on the page, never dropped
            out.append([{**v, "error": str(e), "data_sha256": "", "git_sha": ""}])
    return out


def _measured_flops_per_token(metrics: dict, params: dict) -> float | None:
    """The FLOPs per token training counted (cpmant.flops.flops_per_token with the run's share of projected
    positions), read back from its MFU: mfu = FLOPs per token x tokens/s / processes / peak. None without an MFU."""
    processes = int(params.get("nproc", "1") or 1) * int(params.get("nnodes", "1") or 1)
    return P.flops_per_token_from_mfu(metrics.get("mfu"), metrics.get("peak_flops"),
                                      metrics.get("tokens_per_second"), processes)


def _measured(pretrain_runs) -> dict | None:
    """The newest finished pretraining run's throughput and energy (the projection's measured input)."""
    from .config import TrackingConfig as _TC

    for r in pretrain_runs:
        m = r.data.metrics
        if r.info.status != "FINISHED" or not m.get("tokens_per_second") or not m.get("num_parameters"):
            continue
        out = {"run_id": r.info.run_id, "run": r.info.run_name, "tokens_per_second": m["tokens_per_second"],
               "num_parameters": m["num_parameters"], "mfu": m.get("mfu"), "peak_flops": m.get("peak_flops")}
        dur, kwh = m.get("duration_s"), m.get("energy_kwh")
        if dur and kwh:
            out["device_power_w"] = kwh * 1000.0 / (dur / 3600.0) / max(int(r.data.params.get(
                "tracking.devices", "1") or 1), 1)
            if m.get("emissions_kg_co2e"):
                out["grid_g_per_kwh"] = m["emissions_kg_co2e"] / kwh * 1000.0
        device = r.data.params.get("tracking.device", "cpu")
        out["price_rmb_per_hour"] = _TC().device_hour_rmb.get(device)
        out["device"] = device
        out["flops_per_token"] = _measured_flops_per_token(m, r.data.params)
        return out
    return None


def collect(experiment: str = "cpmant") -> dict:
    """Every section's data from the current tracking store (registry.tracking's URI)."""
    import mlflow

    from registry.tracking import setup_tracking

    setup_tracking(experiment)
    exp_ids = [e.experiment_id for e in _client().search_experiments()]
    staged = [r for r in _runs(exp_ids, None, 2000) if r.data.tags.get(T.STAGE)]
    pretrain_runs = [r for r in staged if r.data.tags.get(T.STAGE) == "pretrain"]
    per_stage: dict[str, dict] = {}
    for r in staged:
        s = r.data.tags[T.STAGE]
        if s in NOT_STAGES:
            continue
        agg = per_stage.setdefault(s, {"stage": s, "runs": 0, **{k: 0.0 for k in COST_METRICS}})
        agg["runs"] += 1
        for k in COST_METRICS:
            agg[k] += float(r.data.metrics.get(k) or 0.0)
    versions = _all_versions()
    measured = _measured(pretrain_runs)
    ladder, validation = _ladder(exp_ids, versions), _validation(exp_ids, versions)
    return {
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tracking_uri": mlflow.get_tracking_uri(),
        "loss_curves": _loss_curves(pretrain_runs),
        "ladder": ladder,
        "heldout": _heldout(ladder, versions, validation),
        "published_ladder": published_ladder(),
        "deltas": _deltas(exp_ids),
        "validation": validation,
        "stages": list(per_stage.values()),
        "runs": [_run_row(r) for r in staged if r.data.tags[T.STAGE] not in NOT_STAGES][:200],
        "versions": versions,
        "lineages": _lineages(versions),
        "measured": measured,
        "projection": [p.row() for p in P.project_10b(measured)],
        "published": P.published_rows(),
        "emissions_readings": P.emissions_readings(),
        "profiles": {k: {"name": p.name, "peak_flops": p.peak_flops, "board_power_w": p.board_power_w,
                         "pue": p.pue, "grid_g_per_kwh": p.grid_g_per_kwh,
                         "price_rmb_per_hour": p.price_rmb_per_hour, "sources": p.sources()}
                     for k, p in P.PROFILES.items()},
    }


# ---- plots (matplotlib, inline PNG) ---------------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(curves: list[dict]) -> str | None:
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=90)
    for c in curves:
        ax.plot(c["steps"], c["loss"], lw=1, label=f"{c['run']} ({c['run_id'][:8]}) train")
        if c["valid_steps"]:
            ax.plot(c["valid_steps"], c["valid_loss"], "o--", ms=3, lw=0.8, label=f"{c['run_id'][:8]} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_ladder_vs_published(rows: list[dict]) -> str | None:
    """tasks/plots.py's ladder (structured rungs as a line, int8 / MoE as markers, points labelled), inline."""
    from .plots import draw_ladder

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=90)
    if not draw_ladder(ax, rows):
        plt.close(fig)
        return None
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_task_scores(t: dict) -> str | None:
    """A task's scores with their 95% intervals as error bars (tasks/plots.py's comparison plot, inline)."""
    from .plots import plot_comparison

    if not t.get("plot"):
        return None
    _plt()
    buf = io.BytesIO()
    title = f"{t['task']} (demo task: not a CUGE score)" if t["demo"] else t["task"]
    return base64.b64encode(buf.getvalue()).decode("ascii") if plot_comparison(t["plot"], buf, title) else None


def plot_stage_costs(stages: list[dict]) -> str | None:
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.8), dpi=90)
    names = [s["stage"] for s in stages]
    for ax, (k, label) in zip(axes, (("energy_kwh", "kWh"), ("emissions_kg_co2e", "kg CO2e"), ("cost_rmb", "RMB"))):
        ax.bar(names, [s[k] for s in stages], color="#4c72b0")
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    return _png(fig)


def plot_projection(rows: list[dict]) -> str | None:
    # CPM-Ant's own figures and each profile at the published utilisation (an MFU measured on another kind of
    # device, "if a GPU reached the MFU measured here", is in the table, not on this scale)
    rows = [r for r in rows if r.get("cost_rmb") and r["device"] != "this machine" and "measured" not in r["label"]]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=90)
    labels = [r["label"] for r in rows] + ["CPM-Ant published"]
    ax.barh(labels, [r["cost_rmb"] / 1e3 for r in rows] + [P.CPM_ANT_COST_RMB / 1e3],
            color=["#4c72b0"] * len(rows) + ["#dd8452"])
    ax.set_xlabel("thousand RMB for 200 B tokens of the 10B")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


# ---- HTML -------------------------------------------------------------------------------------------------
CSS = """
body{font-family:"Noto Sans CJK SC","Noto Sans",system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;
line-height:1.45;padding:0 1em}
h1{font-size:1.6em;border-bottom:2px solid #4c72b0;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;
color:#2b4a80}table{border-collapse:collapse;margin:.6em 0;font-size:.85em}th,td{border:1px solid #ccc;
padding:.25em .5em;text-align:right}th{background:#eef2f8}td.l,th.l{text-align:left}
.note{color:#555;font-size:.9em}.missing{color:#a33;font-style:italic}img{max-width:100%}
.pub{background:#fff4e6}code{background:#f3f3f3;padding:0 .2em}
.warn{color:#a33;background:#fdecea;border-left:4px solid #a33;padding:.3em .6em}
details.vrun,details.vfail{border:1px solid #ddd;border-radius:4px;margin:.3em 0;padding:0 .6em}
details.vfail{border:2px solid #a33;background:#fffafa}summary h3{display:inline;font-size:1em;margin:.3em 0}
.fail{color:#fff;background:#a33;padding:0 .4em;border-radius:3px}.ok{color:#fff;background:#2e7d32;padding:0 .4em;
border-radius:3px}
.demo{background:#fff4e6;color:#8a4b00;font-size:.8em;padding:0 .4em;border:1px solid #e0b070;border-radius:3px}
"""


def _esc(v) -> str:
    return html.escape(str(v))


_fmt = RS.fmt  # one number format for the page and its interval texts


def _table(rows: list[dict], cols: list[str] | None = None, labels: dict | None = None,
           pub_cols: tuple = ()) -> str:
    if not rows:
        return f'<p class="missing">{NOT_RUN}</p>'
    cols = cols or list(rows[0])
    labels = labels or {}
    head = "".join(f'<th class="{"pub" if c in pub_cols else "l"}">{_esc(labels.get(c, c))}</th>' for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cls = "pub" if c in pub_cols else ("l" if isinstance(v, (str, list, tuple)) or v is None else "")
            text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else _fmt(v)  # aliases: MLflow's way
            cells.append(f'<td class="{cls}">{_esc(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(b64: str | None, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""


def _section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title, quote=False)}</h2>{body}</section>'


def render_html(data: dict) -> str:
    s = []
    curves = data["loss_curves"]
    s.append(_section("Loss curves", "loss", (
        _img(plot_loss_curves(curves), "pretraining loss curves")
        + _table([{"run": c["run"], "run_id": c["run_id"], "steps": c["steps"][-1], "first loss": c["loss"][0],
                   "last loss": c["loss"][-1],
                   "held-out loss": c["valid_loss"][-1] if c["valid_loss"] else None} for c in curves]))
        if curves else f'<p class="missing">pretraining: {NOT_RUN}</p>'))

    lad = data["ladder"]
    pub_cols = ("published_lm_loss", "published_loss_increase")
    pub_labels = {"published_lm_loss": "published LM loss (CPM-Ant)",
                  "published_loss_increase": "published loss increase (CPM-Ant 10B ladder)"}
    body = ""
    if lad:
        body += _img(plot_ladder_vs_published(lad["rows"]), "size ladder against the published ladder")
        body += "<p>Ours (run <code>" + _esc(lad["run_id"]) + "</code>):</p>"
        body += _table(lad["rows"], ["model", "attention_layers", "ffn_layers", "num_heads", "dim_ff", "params",
                                     "bytes_on_disk", "lm_loss", "loss_increase", "published_loss_increase",
                                     "generation_tokens_per_second", "reading"], pub_labels, pub_cols)
        body += ('<p class="note">Held-out losses are single measurements on the held-out rows: a difference '
                 "between two of them has no interval.</p>")
        body += _heldout_html(data.get("heldout"))
    else:
        body += f'<p class="missing">compression ladder: {NOT_RUN}</p>'
    body += "<p>CPM-Ant's published ladder (reference figures, not measurements):</p>"
    body += _table(data["published_ladder"], None, pub_labels, pub_cols)
    s.append(_section("Size ladder beside CPM-Ant's published ladder", "ladder", body))

    d = data["deltas"]
    body = _deltas_html(d)
    if d["versions"]:
        body += "<p>Registered deltas:</p>" + _table(d["versions"], ["uri", "parent", "aliases", "run_id"])
    if not body:
        body = f'<p class="missing">delta tuning: {NOT_RUN}</p>'
    s.append(_section("Delta tuning against full fine-tuning", "deltas", body))

    s.append(_section("Validation gates and decisions", "validation", _validation_html(data["validation"])))

    body = _img(plot_stage_costs(data["stages"]), "energy, emissions and cost per stage")
    body += _table(data["stages"], ["stage", "runs", *COST_METRICS])
    if data["runs"]:
        body += "<details><summary>every run</summary>" + _table(
            data["runs"], ["run", "stage", "status", *COST_METRICS, "run_id"]) + "</details>"
    s.append(_section("Energy, emissions and cost per stage", "costs", body))

    s.append(_section("Lineage from corpus to deltas", "lineage", _lineage_html(data["lineages"])))

    s.append(_section("Projection of a full 10B pretraining run", "projection", _projection_html(data)))
    toc = " · ".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("loss", "loss"), ("ladder", "ladder"), ("deltas", "deltas"), ("validation", "validation"),
        ("costs", "costs"), ("lineage", "lineage"), ("projection", "10B projection")))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>CPM-Ant lifecycle report</title>'
            f"<style>{CSS}</style></head><body><h1>CPM-Ant lifecycle report</h1>"
            f'<p class="note">generated {_esc(data["generated"])} from <code>{_esc(data["tracking_uri"])}</code></p>'
            f"<p>{toc}</p>{''.join(s)}</body></html>")


DELTA_COLUMNS = ["method", "score", "vs zero-shot", "vs full", "ratio to full", "trainable share", "reading"]
DELTA_LEGEND = ("Scores are on each task's test split with a 95% bootstrap interval over examples, written "
                "value [low, high]. <i>vs zero-shot</i> and <i>vs full</i> are paired differences in points (the "
                "method minus the reference, both scored on the same examples, one paired bootstrap); <i>ratio to "
                "full</i> is the method's score over full fine-tuning's. A result logged without an interval (an "
                f"older run) reads &ldquo;{RS.NO_INTERVAL}&rdquo;. Where a tuned model is below zero-shot or a delta "
                "above full fine-tuning, the reading says whether the paired interval contains 0 (noise) or not.")


def _deltas_html(d: dict) -> str:
    """Per task: a demo label where it is one, the notes, and the rows with intervals and readings; the
    comparison table as the tune stage logged it below."""
    body = ""
    for name, t in sorted(d.get("tasks", {}).items()):
        badge = f' <span class="demo">{_esc(RS.DEMO_NOTE)}</span>' if t["demo"] else ""
        body += f"<h3>{_esc(name)}{badge}</h3>"
        body += "".join(f'<p class="note">{_esc(n)}</p>' for n in t["notes"] if n != RS.DEMO_NOTE)
        body += _img(plot_task_scores(t), f"{name}: each score with its 95% interval")
        body += _table(t["rows"], DELTA_COLUMNS,
                       {"score": f"test {t['metric']} [95% interval]", "trainable share": "trained share"})
        logged = d["tables"].get(name)
        if logged:
            body += ("<details><summary>the comparison table as logged (run <code>" + _esc(logged["run_id"])
                     + "</code>)</summary>" + _table(logged["rows"]) + "</details>")
    return (f'<p class="note">{DELTA_LEGEND}</p>' + body) if body else ""


# a validation run's param `promote` is whether promotion was asked for, not whether it happened (cpmant.promoted)
DECISION_LABELS = {"promote": "promotion asked for (if every gate passes)", "cpmant.promoted": "promoted to champion"}


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


def _validation_summary_html(validations: list[dict]) -> str:
    sm = validation_summary(validations)
    head = (f"<p class='vsummary'><b>{len(sm['passed'])} passed, {len(sm['failed'])} failed</b>"
            + (f", {len(sm['other'])} without a verdict" if sm["other"] else "")
            + f" (the newest validation of each of {sum(map(len, sm.values()))} models; {len(validations)} "
            "validation runs in all).</p>")
    if sm["failed"]:
        items = "".join(f"<li><code>{_esc(v['model'])}</code>: {_esc(v['failures'] or 'no failed gate recorded')}"
                        f" (run <a href='#v-{_esc(v['run_id'])}'>{_esc(v['run'])}</a>)</li>" for v in sm["failed"])
        head += f'<div class="warn"><b>Failed:</b><ul>{items}</ul></div>'
    return head


def _validation_html(validations: list[dict]) -> str:
    """A summary (how many passed and failed, which failed and why), then one collapsible block per validation
    run, failures first and open, each headed by the model validated and its verdict."""
    if not validations:
        return f'<p class="missing">validation: {NOT_RUN}</p>'
    body = _validation_summary_html(validations)
    for v in sorted(validations, key=lambda v: v["verdict"] != "failed"):  # stable: newest first within each
        failed = v["verdict"] == "failed"
        badge = f' <span class="demo">{_esc(RS.DEMO_NOTE)}</span>' if v["task"] and RS.is_demo(v["task"]) else ""
        verdict = (f'<span class="{"fail" if failed else "ok"}">{_esc(v["verdict"].upper())}</span> '
                   if v["verdict"] else "")
        inner = ""
        if failed:
            inner += f'<p class="warn">Failed gates: {_esc(v["failures"] or "none recorded")}</p>'
        if v["decisions"]:
            inner += _table([{"gate / decision": DECISION_LABELS.get(k, k), "value": x}
                             for k, x in sorted(v["decisions"].items()) if x != ""])
        inner += _table(v["metric_rows"], ["metric", "value", "reading"], {"value": "value [95% interval]"})
        for p, rows in v["tables"].items():
            inner += f"<p>{_esc(p)}</p>" + _table(rows)
        body += (f'<details id="v-{_esc(v["run_id"])}" class="{"vfail" if failed else "vrun"}"'
                 f'{" open" if failed else ""}><summary><h3>{verdict}{_esc(v["model"])} <small>run '
                 f"{_esc(v['run'])}</small>{badge}</h3></summary>{inner}</details>")
    return body


def _lineage_html(chains: list[list[dict]]) -> str:
    """One line per chain, oldest first, under a count: the chains and the registered models they cover."""
    if not chains:
        return f'<p class="missing">registered models: {NOT_RUN}</p>'
    names = {c["name"] for chain in chains for c in chain}
    body = (f'<p class="note lineage-count">{len(chains)} chain{"s" if len(chains) != 1 else ""}, one per version '
            f"nobody descends from, covering {len(names)} registered models.</p>")
    for chain in chains:
        if chain[0].get("error"):
            body += (f'<p class="warn"><code>{_esc(chain[0]["uri"])}</code>: its lineage cannot be read: '
                     f"{_esc(chain[0]['error'])}</p>")
            continue
        base = chain[-1]
        steps = [f"corpus data:{_esc(base['data_sha256'][:16])}"]
        for c in reversed(chain):
            alias = f", @{_esc(','.join(c['aliases']))}" if c["aliases"] else ""
            steps.append(f"<code>{_esc(c['uri'])}</code> ({_esc(c['stage'])}{alias})")
        body += (f"<p class='chain'>{' &rarr; '.join(steps)} <span class='note'>code {_esc(base['git_sha'][:12])}"
                 "</span></p>")
    return body


def _heldout_html(h: dict | None) -> str:
    """The base's held-out loss as the ladder, pretraining and validation logged it; a visible warning when they
    differ by more than the tolerance."""
    if not h:
        return ""
    cls = "note" if h["agree"] else "warn"
    lead = "" if h["agree"] else "<b>Held-out losses disagree.</b> "
    return (f'<p class="{cls}">{lead}{_esc(h["message"][0].upper() + h["message"][1:])}.</p>'
            + _table([{**r, "held-out loss": f"{r['held-out loss']:.6f}"} for r in h["rows"]],
                     ["measurement", "held-out loss"]))


def _projection_html(data: dict) -> str:
    e = data["emissions_readings"]
    m = data["measured"]
    rows = data["projection"]
    cols = ["label", "device", "basis", "tokens_per_second_per_device", "devices", "device_hours", "wall_days",
            "energy_kwh", "emissions_kg_co2e", "cost_rmb"]
    labels = {"tokens_per_second_per_device": "tokens/s per device", "device_hours": "device-hours",
              "wall_days": "days", "energy_kwh": "kWh", "emissions_kg_co2e": "kg CO2e", "cost_rmb": "RMB"}
    check = rows[0]
    fpt = P.cpm_ant_flops_per_token()
    body = (f"<p>200 B tokens (CPM-Ant's run) on {P.CPM_ANT_PARAMS / 1e9:.2f} B parameters, 32 devices, "
            f"{fpt / 1e9:.1f} GFLOP per token (counted as training counts its MFU: 6 &times; the matmul parameters "
            f"+ attention scores at length {P.CPM_ANT_SEQ_LEN}, every position projected onto the vocabulary). On a "
            "GPU profile the rate is peak &times; utilisation / FLOPs per token, at CPM-Ant's own utilisation of the "
            f"A100 ({P.published_utilisation():.1%}: 1,181 tokens/s &times; {fpt / 1e9:.1f} GFLOP / 312 TFLOP/s); "
            "a row at the MFU our pretraining measured is \"our measured MFU\" only where it was measured on that "
            "kind of device, else \"if a GPU reached the MFU measured here\" (hypothetical: a CPU's MFU says "
            "nothing of a GPU's). On this machine the FLOP/s our pretraining reached (its tokens/s &times; its own "
            "FLOPs per token) is divided by the 10B's FLOPs per token. Energy = device-hours &times; board power "
            "&times; PUE; cost = device-hours &times; the profile's price per device-hour (electricity "
            "included).</p>")
    if m:
        body += (f"<p>Measured: run <code>{_esc(m['run_id'])}</code>, {_fmt(m['tokens_per_second'])} tokens/s at "
                 f"{_fmt(m['num_parameters'])} parameters, {_fmt(m.get('flops_per_token'))} FLOPs per token, "
                 f"MFU {_fmt(m.get('mfu'))} on {_esc(m.get('device'))}.</p>")
        if not m.get("flops_per_token"):
            body += ('<p class="missing">the run recorded no MFU: its FLOPs per token are unknown, so the row '
                     '"this machine, measured" is left out</p>')
    else:
        body += f'<p class="missing">no finished pretraining run: the measured rows are {NOT_RUN}</p>'
    body += _img(plot_projection(rows), "projected cost of a 10B pretraining run")
    body += _table(rows, cols, labels)
    body += "<p>Published figures beside it (reference figures, never logged as metrics):</p>"
    body += _table(data["published"], ["label", "device_hours", "cost_rmb", "emissions_kg_co2e", "source"],
                   labels, ("device_hours", "cost_rmb", "emissions_kg_co2e"))
    dev = check["cost_rmb"] / P.CPM_ANT_COST_RMB - 1
    body += (f"<p><b>Check:</b> fed CPM-Ant's own figures (1,181 tokens/s per A100, 200 B tokens, 32 GPUs) the "
             f"projection gives {_fmt(check['device_hours'])} A100-hours and {_fmt(check['cost_rmb'])} RMB, "
             f"{dev:+.1%} from the published 430,000 RMB. {P.CIRCULARITY}</p>")
    body += ("<p><b>Two readings of the published emissions.</b> "
             f"(1) As published: {_fmt(e['published_emissions_kg'])} kg CO2e at China's grid "
             f"({_fmt(e['grid_g_per_kwh'])} g/kWh) is {_fmt(e['implied_energy_kwh'])} kWh over "
             f"{_fmt(e['gpu_hours'])} A100-hours: <b>{e['implied_kwh_per_gpu_hour']:.3f} kWh per A100-hour</b>, "
             f"an average draw of {e['implied_kwh_per_gpu_hour'] * 1000:.0f} W, "
             f"{e['implied_share_of_board_power']:.0%} of an A100's {_fmt(e['board_power_w'])} W board power, "
             "under half of it, with no data-centre overhead. "
             # (2) quotes the table's first row, so that the text and the table show one value
             f"(2) At the board power and PUE {e['pue']}: the table's first row, {_fmt(check['device_hours'])} "
             f"A100-hours, uses {_fmt(check['energy_kwh'])} kWh and emits <b>{_fmt(check['emissions_kg_co2e'])} kg "
             f"CO2e</b>; the published total would need a grid of {_fmt(e['grid_needed_at_board_power_g_per_kwh'])} "
             "g/kWh at the board power alone. T5-11B's published 46.7 t stays about "
             f"{P.T5_11B_EMISSIONS_KG / check['emissions_kg_co2e']:.1f}&times; the second reading.</p>")
    src = []
    for k, p in data["profiles"].items():
        items = "".join(f"<li>{_esc(n)}: {_esc(v)}</li>" for n, v in p["sources"].items())
        src.append(f"<li><b>{_esc(p['name'])}</b>: {_fmt(p['peak_flops'] / 1e12)} TFLOP/s, "
                   f"{_fmt(p['board_power_w'])} W, PUE {p['pue']}, {_fmt(p['grid_g_per_kwh'])} g/kWh, "
                   f"{_fmt(p['price_rmb_per_hour'])} RMB per device-hour<ul>{items}</ul></li>")
    body += "<p>Hardware profiles and their sources:</p><ul>" + "".join(src) + "</ul>"
    return body


def render_markdown(data: dict, path: str) -> str:
    """The Prefect artifact: where the page is, and the headline figures."""
    check = data["projection"][0]
    lines = [f"# CPM-Ant lifecycle report", "", f"Full page: `{path}`", "",
             "| stage | runs | kWh | kg CO2e | RMB | s |", "|---|---|---|---|---|---|"]
    for st in data["stages"]:
        lines.append(f"| {st['stage']} | {st['runs']} | {_fmt(st['energy_kwh'])} | {_fmt(st['emissions_kg_co2e'])} "
                     f"| {_fmt(st['cost_rmb'])} | {_fmt(st['duration_s'])} |")
    if data["validation"]:
        sm = validation_summary(data["validation"])
        lines += ["", f"**Validation: {len(sm['passed'])} passed, {len(sm['failed'])} failed**"]
        lines += [f"- failed: `{v['model']}`: {v['failures'] or 'no failed gate recorded'}" for v in sm["failed"]]
    lines += _deltas_markdown(data)
    lines += ["", "## 10B projection (200 B tokens)", "", "| row | device-hours | RMB | kg CO2e |", "|---|---|---|---|"]
    for r in data["projection"]:
        lines.append(f"| {r['label']} | {_fmt(r['device_hours'])} | {_fmt(r['cost_rmb'])} | "
                     f"{_fmt(r['emissions_kg_co2e'])} |")
    lines += [f"| CPM-Ant published | {_fmt(P.CPM_ANT_GPU_HOURS)} | {_fmt(P.CPM_ANT_COST_RMB)} | "
              f"{_fmt(P.CPM_ANT_EMISSIONS_KG)} |", f"| T5-11B published | | | {_fmt(P.T5_11B_EMISSIONS_KG)} |", "",
              f"CPM-Ant's own figures give {check['cost_rmb'] / P.CPM_ANT_COST_RMB - 1:+.1%} against the published "
              "cost (circular: 1,181 tokens/s is derived from the published 47,040 A100-hours).", "",
              "Sections not run yet: " + (", ".join(k for k, v in (
                  ("pretraining", data["loss_curves"]), ("ladder", data["ladder"]),
                  ("delta tuning", data["deltas"]["tables"] or data["deltas"].get("tasks")
                   or data["deltas"]["versions"]),
                  ("validation", data["validation"])) if not v) or "none")]
    return "\n".join(lines)


def _deltas_markdown(data: dict) -> list[str]:
    """Delta tuning in the Prefect artifact (each score with its interval, demo tasks labelled, the readings) and
    a held-out disagreement, if any."""
    tasks = data["deltas"].get("tasks") or {}
    head = ["", "## Delta tuning (test split, 95% intervals)", "",
            "| task | method | score | vs zero-shot | vs full | reading |", "|---|---|---|---|---|---|"]
    lines = head if tasks else []
    for name, t in sorted(tasks.items()):
        label = f"{name} ({RS.DEMO_NOTE})" if t["demo"] else name
        for r in t["rows"]:
            lines.append(f"| {label} | {r['method']} | {r['score']} | {r['vs zero-shot']} | {r['vs full']} | "
                         f"{r['reading']} |")
    h = data.get("heldout")
    if h and not h["agree"]:
        lines += ["", f"**Held-out losses disagree**: {h['message']}."]
    return lines


def default_path() -> Path:
    from cpmant.paths import subdir

    return subdir("reports") / "report.html"


def build_report(experiment: str = "cpmant", out: str | Path | None = None) -> tuple[Path, dict, str]:
    """Collect, render and write the page (atomically); (path, data, html). No run is logged."""
    from cpmant.fsutil import atomic_write_text

    data = collect(experiment)
    page = render_html(data)
    path = Path(out).expanduser().resolve() if out else default_path()
    if path.is_dir():  # --out DIR: the page goes in it under its default name
        path = path / default_path().name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    return path, data, page


def _log_report(tracking: TrackingConfig, path: Path, data: dict) -> str:
    """A `report` run holding the page, the projection table, and the published figures as params."""
    import mlflow

    from registry.tracking import setup_tracking

    setup_tracking(tracking.experiment)
    tags = {**tracking.parent_tags(), T.STAGE: REPORT_STAGE}  # nested under the lifecycle's run
    with mlflow.start_run(run_name="report", tags=tags) as run:
        mlflow.log_artifact(str(path), artifact_path="report")
        rows = data["projection"]
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "projection.json")
        mlflow.log_params({"published.cpm_ant_cost_rmb": P.CPM_ANT_COST_RMB,
                           "published.cpm_ant_emissions_kg_co2e": P.CPM_ANT_EMISSIONS_KG,
                           "published.cpm_ant_gpu_hours": P.CPM_ANT_GPU_HOURS,
                           "published.cpm_ant_tokens_per_second": P.CPM_ANT_TOKENS_PER_SECOND,
                           "published.t5_11b_emissions_kg_co2e": P.T5_11B_EMISSIONS_KG,
                           "published.source": P.PUBLISHED_SOURCE[:500]})
    return run.info.run_id


@task(name="report", task_run_name="report", cache_policy=NONE)
def write_report(tracking: TrackingConfig, out: str | None = None) -> dict:
    """Write the page (default $CPMANT_HOME/reports/report.html), log it as an artifact of a `report` run and as a
    Prefect markdown artifact `lifecycle-report`. Returns {"path", "run_id", "sections"}."""
    from prefect.artifacts import create_markdown_artifact

    path, data, _ = build_report(tracking.experiment, out)
    run_id = _log_report(tracking, path, data)
    create_markdown_artifact(render_markdown(data, str(path)), key="lifecycle-report",
                             description="CPM-Ant lifecycle report")
    sections = {"loss_curves": bool(data["loss_curves"]), "ladder": bool(data["ladder"]),
                "deltas": bool(data["deltas"]["tables"] or data["deltas"].get("tasks") or data["deltas"]["versions"]),
                "validation": bool(data["validation"]), "lineage": bool(data["lineages"]),
                "projection": True}
    return {"path": str(path), "run_id": run_id, "sections": sections,
            "projection": data["projection"], "measured": data["measured"]}
