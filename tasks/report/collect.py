"""What the report reads: every section's data from the tracking store, through registry.report_queries (runs,
tables, metric histories, versions and aliases) and registry.ancestry (lineage); plain dicts out, no HTML.

    collect(experiment) -> dict     every section's data; page.render_html and markdown.render_markdown take it
"""

from __future__ import annotations

import datetime as _dt

from cpmant import projection as P
from registry import report_queries as Q
from registry import tags as T
from registry.ancestry import lineage

from ..config import TrackingConfig
from .scores import heldout, metric_rows, newest_tuning_runs, rung_reading, task_rows

NOT_STAGES = ("report", "lifecycle")  # runs that make nothing themselves: not summed per stage
COST_METRICS = ("energy_kwh", "emissions_kg_co2e", "cost_rmb", "duration_s")
PUBLISHED_LADDER_BASE_LOSS = 2.420  # CPM-Ant 10B's published LM loss (CPM-ANT.md)
MAX_CURVES = 6
# counts: logged through a table whose column held a None they come back as floats (384.0); shown as integers
COUNT_COLUMNS = ("attention_layers", "ffn_layers", "num_heads", "dim_ff", "params", "bytes_on_disk")
# validation params and tags shown as its gates and decisions
DECISION_WORDS = ("gate", "decision", "pass", "verdict", "promot")


def _rows(table: dict) -> list[dict]:
    cols = table.get("columns") or []
    return [dict(zip(cols, r)) for r in table.get("data") or []]


def _run_row(run: Q.RunRecord) -> dict:
    return {"run": run.name, "run_id": run.run_id, "status": run.status, "stage": run.tags.get(T.STAGE, ""),
            "start": run.start, **{k: run.metrics.get(k) for k in COST_METRICS}}


# ---- loss curves -----------------------------------------------------------------------------------------------
def _loss_curves(runs: list[Q.RunRecord]) -> list[dict]:
    out = []
    for r in runs[:MAX_CURVES]:
        hist, valid = Q.metric_history(r.run_id, "loss"), Q.metric_history(r.run_id, "valid_loss")
        if hist:
            out.append({"run": r.name, "run_id": r.run_id, "steps": [s for s, _ in hist],
                        "loss": [v for _, v in hist], "valid_steps": [s for s, _ in valid],
                        "valid_loss": [v for _, v in valid]})
    return out


# ---- the size ladder -------------------------------------------------------------------------------------------
def published_ladder() -> list[dict]:
    """CPM-Ant's released ladder (CPM-ANT.md): shapes and LM losses, from the recipes' published figures."""
    from cpmant.compress.recipe import LADDER, RECIPES
    from cpmant.config import get_preset

    ten_b = get_preset("10b")
    rows = [{"model": "10B", "attention_layers": 48, "ffn_layers": 48, "num_heads": 32, "dim_ff": 10240,
             "published_lm_loss": PUBLISHED_LADDER_BASE_LOSS, "published_loss_increase": 0.0}]
    for name in LADDER:
        r = RECIPES[name]
        shape = r.target_shape(ten_b)
        rows.append({"model": name.upper(), "attention_layers": shape.get("att_layers"),
                     "ffn_layers": shape.get("ffn_layers"), "num_heads": shape.get("num_heads"),
                     "dim_ff": shape.get("dim_ff"),
                     "published_lm_loss": round(PUBLISHED_LADDER_BASE_LOSS * (1 + r.published_loss_increase), 3),
                     "published_loss_increase": r.published_loss_increase})
    return rows


def _ladder_row(row: dict) -> dict:
    """A ladder.json row with the published column under its key, counts as integers, and the short name."""
    from cpmant.compress.recipe import PUBLISHED_LABEL

    out = {("published_loss_increase" if k == PUBLISHED_LABEL else k): v for k, v in row.items()}
    for c in COUNT_COLUMNS:
        if isinstance(out.get(c), float) and out[c].is_integer():
            out[c] = int(out[c])
    out.setdefault("name", str(out.get("model", "")).removeprefix("models:/"))
    return out


def _ladder(compress_runs: list[Q.RunRecord], versions: list[dict]) -> dict | None:
    """The newest ladder table; each rung's run metrics read through its registered version, the parent's
    held-out loss as the rungs logged it (`parent_lm_loss`), and a reading beside a rung below its parent."""
    for r in compress_runs:
        t = Q.logged_tables(r).get("ladder.json") if r.name == "compress-ladder" else None
        if t:
            return _ladder_of(r.run_id, [_ladder_row(row) for row in _rows(t)], versions)
    return None


def _ladder_of(run_id: str, rows: list[dict], versions: list[dict]) -> dict:
    by_uri = {v["uri"]: v for v in versions}
    rungs = {row.get("model"): Q.run_metrics(by_uri.get(row.get("model"), {}).get("run_id")) for row in rows[1:]}
    parent = next((by_uri[u]["parent"] for u in rungs if u in by_uri and by_uri[u]["parent"]),
                  rows[0].get("model") if rows else "")
    parent_loss = next((m["parent_lm_loss"] for m in rungs.values() if "parent_lm_loss" in m),
                       rows[0].get("lm_loss") if rows else None)
    for row in rows[1:]:
        row["reading"] = rung_reading(parent_loss, row, rungs.get(row.get("model"), {}))
    return {"run_id": run_id, "rows": rows, "parent": parent, "parent_lm_loss": parent_loss}


def _heldout(ladder: dict | None, versions: list[dict], validation: list[dict]) -> dict | None:
    """The ladder parent's three held-out losses (ladder `parent_lm_loss`, pretraining `valid_loss_end`, the newest
    finished validation's `lm_loss`), checked to be one measurement."""
    if not ladder or not ladder.get("parent"):
        return None
    uri = ladder["parent"]
    version = next((v for v in versions if v["uri"] == uri), None)
    pre = Q.run_metrics(version["run_id"] if version else None).get("valid_loss_end")
    val = next((v["metrics"].get("lm_loss") for v in validation
                if v["model"] == uri and v["status"] == "FINISHED" and "lm_loss" in v["metrics"]), None)
    return heldout(uri, ladder.get("parent_lm_loss"), pre, val)


# ---- delta tuning ----------------------------------------------------------------------------------------------
def _comparison_tables(runs: list[Q.RunRecord]) -> dict[str, dict]:
    """Per task: the newest `comparison-<task>.json` table a delta run logged, with its run and base."""
    tables: dict[str, dict] = {}
    for r in runs:
        for path, t in Q.logged_tables(r).items():
            if path.startswith("comparison-"):
                task_name = r.tags.get(T.TASK) or path[len("comparison-"):-len(".json")]
                tables.setdefault(task_name, {"run_id": r.run_id, "rows": _rows(t), "base": r.tags.get(T.PARENT, "")})
    return tables


def _deltas(versions: list[dict]) -> dict:
    """Per task: the comparison table (zero-shot, each delta method, full fine-tuning) of the newest `compare-*`
    run, the rows the report shows; and the registered delta versions."""
    runs = Q.search_runs("delta")
    tables = _comparison_tables(runs)
    tuned = newest_tuning_runs(runs)
    tasks = {}
    for name in sorted(set(tuned) | set(tables)):
        runs_ = tuned.get(name, {}).get("runs", {})
        table = tables.get(name, {})
        same_base = not runs_ or table.get("base", "") in ("", tuned[name]["base"])  # a table of another base: left out
        tasks[name] = task_rows(name, {m: dict(r.metrics) for m, r in runs_.items()},
                                table.get("rows", []) if same_base else [])
    return {"tables": tables, "tasks": tasks, "versions": [v for v in versions if v["stage"] == "delta"],
            "runs": len(runs)}


# ---- validation ------------------------------------------------------------------------------------------------
def _verdict(status: str, tags: dict) -> str:
    """passed | failed (the `cpmant.validation` tag), "did not finish" for a run that ended otherwise, "" when
    neither is known (a run from before the tag)."""
    if tags.get(T.VALIDATION) in ("passed", "failed"):
        return tags[T.VALIDATION]
    return "did not finish" if status in ("FAILED", "KILLED") else ""


def _decisions(params: dict, tags: dict) -> dict:
    return {k: v for k, v in {**params, **tags}.items()
            if any(w in k.lower() for w in DECISION_WORDS)
            or k in (T.VALIDATION, T.VALIDATION_FAILURES, T.VALIDATION_EVIDENCE)}


def _validation_of(r: Q.RunRecord, task_of: dict[str, str]) -> dict:
    tags = {k: v for k, v in r.tags.items() if not k.startswith("mlflow.") and k != T.STAGE}
    model = tags.get(T.MODEL) or r.params.get("model") or r.params.get("model_uri") or tags.get(T.PARENT, "")
    metrics = {k: v for k, v in sorted(r.metrics.items()) if k not in COST_METRICS}
    task_name = task_of.get(model) or tags.get(T.TASK, "")
    return {"run": r.name, "run_id": r.run_id, "status": r.status, "model": model,
            "verdict": _verdict(r.status, tags), "failures": tags.get(T.VALIDATION_FAILURES, ""),
            "promoted": tags.get(T.PROMOTED, ""), "start": r.start, "task": task_name, "metrics": metrics,
            "metric_rows": metric_rows(metrics, task_name), "decisions": _decisions(r.params, tags),
            "tables": {p: _rows(t) for p, t in Q.logged_tables(r).items()}}


def _validation(versions: list[dict]) -> list[dict]:
    """Each validation run: the version it validated (run tag cpmant.model), that version's task (a delta's),
    its gates and decisions, its metrics (scores with their intervals, as rows) and tables."""
    task_of = {v["uri"]: v["task"] for v in versions}
    return [_validation_of(r, task_of) for r in Q.search_runs("validate")]


# ---- lineage ---------------------------------------------------------------------------------------------------
def _lineages(versions: list[dict]) -> list[list[dict]]:
    """The chain of every version nobody descends from (deltas first, then variants, then bases), none left out:
    a chain that cannot be read (a broken parent tag) is a one-step chain whose `error` says why."""
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


# ---- costs and the projection's measured input -----------------------------------------------------------------
def _per_stage(staged: list[Q.RunRecord]) -> list[dict]:
    """Runs and summed cost metrics per stage (report and lifecycle runs left out)."""
    per_stage: dict[str, dict] = {}
    for r in staged:
        s = r.tags[T.STAGE]
        if s in NOT_STAGES:
            continue
        agg = per_stage.setdefault(s, {"stage": s, "runs": 0, **{k: 0.0 for k in COST_METRICS}})
        agg["runs"] += 1
        for k in COST_METRICS:
            agg[k] += float(r.metrics.get(k) or 0.0)
    return list(per_stage.values())


def _measured_flops_per_token(metrics: dict, params: dict) -> float | None:
    """The FLOPs per token training counted (cpmant.flops.flops_per_token with the run's share of projected
    positions), read back from its MFU: mfu = FLOPs per token x tokens/s / processes / peak. None without an MFU."""
    processes = int(params.get("nproc", "1") or 1) * int(params.get("nnodes", "1") or 1)
    return P.flops_per_token_from_mfu(metrics.get("mfu"), metrics.get("peak_flops"),
                                      metrics.get("tokens_per_second"), processes)


def _energy(r: Q.RunRecord) -> dict:
    """A run's average power per device and its grid's intensity, from its energy, duration and emissions."""
    m = r.metrics
    dur, kwh = m.get("duration_s"), m.get("energy_kwh")
    if not (dur and kwh):
        return {}
    devices = max(int(r.params.get("tracking.devices", "1") or 1), 1)
    out = {"device_power_w": kwh * 1000.0 / (dur / 3600.0) / devices}
    if m.get("emissions_kg_co2e"):
        out["grid_g_per_kwh"] = m["emissions_kg_co2e"] / kwh * 1000.0
    return out


def _measured(pretrain_runs: list[Q.RunRecord]) -> dict | None:
    """The newest finished pretraining run's throughput and energy (the projection's measured input)."""
    for r in pretrain_runs:
        m = r.metrics
        if r.status != "FINISHED" or not m.get("tokens_per_second") or not m.get("num_parameters"):
            continue
        device = r.params.get("tracking.device", "cpu")
        return {"run_id": r.run_id, "run": r.name, "tokens_per_second": m["tokens_per_second"],
                "num_parameters": m["num_parameters"], "mfu": m.get("mfu"), "peak_flops": m.get("peak_flops"),
                **_energy(r), "price_rmb_per_hour": TrackingConfig().device_hour_rmb.get(device), "device": device,
                "flops_per_token": _measured_flops_per_token(m, r.params)}
    return None


def _profiles() -> dict:
    return {k: {"name": p.name, "peak_flops": p.peak_flops, "board_power_w": p.board_power_w, "pue": p.pue,
                "grid_g_per_kwh": p.grid_g_per_kwh, "price_rmb_per_hour": p.price_rmb_per_hour,
                "sources": p.sources()}
            for k, p in P.PROFILES.items()}


# ---- every section ---------------------------------------------------------------------------------------------
def collect(experiment: str = "cpmant") -> dict:
    """Every section's data from the current tracking store (registry.tracking's URI)."""
    uri = Q.open_store(experiment)
    staged = [r for r in Q.search_runs(None, 2000) if r.tags.get(T.STAGE)]
    pretrain_runs = [r for r in staged if r.tags.get(T.STAGE) == "pretrain"]
    versions = Q.model_versions()
    measured = _measured(pretrain_runs)
    ladder, validation = _ladder(Q.search_runs("compress"), versions), _validation(versions)
    return {
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tracking_uri": uri,
        "loss_curves": _loss_curves(pretrain_runs),
        "ladder": ladder,
        "heldout": _heldout(ladder, versions, validation),
        "published_ladder": published_ladder(),
        "deltas": _deltas(versions),
        "validation": validation,
        "stages": _per_stage(staged),
        "runs": [_run_row(r) for r in staged if r.tags[T.STAGE] not in NOT_STAGES][:200],
        "versions": versions,
        "lineages": _lineages(versions),
        "measured": measured,
        "projection": [p.row() for p in P.project_10b(measured)],
        "published": P.published_rows(),
        "emissions_readings": P.emissions_readings(),
        "profiles": _profiles(),
    }
