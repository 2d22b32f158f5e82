"""The lifecycle end to end on a micro model (tune, validate and report as stand-ins where their flows have not
landed): one MLflow parent run with a nested run per stage, the stages' runs under theirs, `candidate` pinned on
what it validates; a rerun reuses every stage and registers nothing; `--force STAGE` reruns that stage only; the
pretraining's reuse key misses when one input (a setting, the data) changes. The Dask task runner's rungs give
the serial run's numbers."""

from __future__ import annotations

import pytest
from prefect import flow

from conftest import MICRO_MODEL

pytestmark = pytest.mark.flow


def _config(corpus, out):
    model = {**MICRO_MODEL, "num_layers": 4, "num_heads": 4, "dim_ff": 96}  # room for the 3b rung to prune
    return {"pretrain": {"preset": "tiny", "model_overrides": model, "corpus": str(corpus), "vocab_size": 600,
                         "seq_len": 64, "micro_batch_size": 4, "max_steps": 6, "warmup_steps": 2, "lr": 0.05,
                         "eval_interval": 6, "eval_rows": 4, "save_interval": 6, "output_dir": str(out),
                         "encode_workers": 1, "min_piece_tokens": 4, "num_threads": 1,
                         "valid_fraction": 0.25},
            "compress": {"recipes": "3b,int8", "batch_size": 4, "gen_tokens": 2, "gen_repeats": 1,
                         "distill_steps": 2, "distill_batch_size": 4, "importance_rows": 4},
            "tracking": {"measure_power_secs": 1, "metric_flush_steps": 5},
            "orchestration": {"task_runner": "thread", "max_workers": 1}}  # serial: the reference for Dask


CALLS: dict[str, list] = {"tune": [], "validate": [], "report": []}


def _row(stage: str, model: str, metric: str, value, reused: bool) -> dict:
    """A stand-in stage's summary row with the reason tasks.reuse.decide would give."""
    from flows.summary import summary_row

    why = f"{stage}: reused {model}: same key 0123456789ab" if reused else f"{stage}: made anew: stand-in"
    return summary_row(stage, model, metric, value, 0.0, reused, reason=why)


@flow(name="tune")
def fake_tune(model_uri: str, tasks=None, methods=None, config=None, force=False) -> dict:
    CALLS["tune"].append((model_uri, force))
    return {"deltas": [], "tables": {}, "summary": [_row("tune demo", model_uri, "acc", 0.5,
                                                         len(CALLS["tune"]) > 1 and not force)]}


@flow(name="validate")
def fake_validate(uris: list[str], config=None, force=False, promote=None) -> dict:
    CALLS["validate"].append((list(uris), force, promote, config["tracking"]["parent_run_id"]))
    again = len(CALLS["validate"]) > 1 and not force
    return {"results": [{"model": u, "passed": True, "promoted": False, "failures": [], "run_id": ""} for u in uris],
            "summary": [_row("validate", u, "passed", 1.0, again) for u in uris]}


@flow(name="report")
def fake_report(config=None, out=None) -> dict:
    CALLS["report"].append(out)
    return {"path": "/tmp/report.html", "summary": [_row("report", "/tmp/report.html", "page", None,
                                                         len(CALLS["report"]) > 1)]}


@flow(name="lifecycle", log_prints=True)
def stand_in_lifecycle(config: dict, force=False) -> dict:
    """lifecycle_flow with the real pretrain and compress flows and stand-ins for tune, validate and report."""
    from flows.compress import compress_flow
    from flows.config import LifecycleConfig, check_force
    from flows.lifecycle import StageFlows, run_lifecycle
    from flows.pretrain import pretrain_flow

    flows = StageFlows(pretrain_flow, compress_flow, fake_tune, fake_validate, fake_report)
    return run_lifecycle(LifecycleConfig.model_validate(config), check_force(force), flows)


def test_lifecycle_nests_runs_reuses_and_forces_one_stage(prefect_harness, mlflow_store, fixture_corpus, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    cfg = _config(fixture_corpus, tmp_path / "run")

    out = stand_in_lifecycle(cfg)
    assert out["pretrain"]["model_uri"] == "models:/cpm-ant-tiny/1"
    assert out["compress"]["variants"] == ["models:/cpm-ant-tiny-3b/1", "models:/cpm-ant-tiny-int8/1"]
    assert out["reused_stages"] == []
    # validation got every candidate; stage configs nest runs under the stage's run
    uris, _, promote, stage_run = CALLS["validate"][0]
    assert uris == ["models:/cpm-ant-tiny/1", "models:/cpm-ant-tiny-3b/1", "models:/cpm-ant-tiny-int8/1"]
    assert promote is True

    client = MlflowClient()
    parent = client.get_run(out["lifecycle_run_id"])
    assert parent.info.run_name.startswith("lifecycle-tiny-") and parent.info.status == "FINISHED"
    stages = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in stages) == ["compress", "pretrain", "report", "tune", "validate"]
    by_name = {r.info.run_name: r for r in stages}
    assert by_name["validate"].info.run_id == stage_run
    # duration_s is wall time: the parent ran its stages one after another, so it lasted at least their sum
    assert parent.data.metrics["duration_s"] >= sum(r.data.metrics["duration_s"] for r in stages) > 0
    # the stages' own runs are children of their stage's run
    kids = lambda name: {r.info.run_name for r in mlflow.search_runs(  # noqa: E731
        search_all_experiments=True, output_format="list",
        filter_string=f"tags.`mlflow.parentRunId` = '{by_name[name].info.run_id}'")}
    assert kids("pretrain") == {"pretrain-tiny"}
    assert kids("compress") == {"compress-3b", "compress-int8", "compress-ladder"}
    # the lifecycle pins `candidate` on what it made
    assert int(client.get_model_version_by_alias("cpm-ant-tiny", "candidate").version) == 1
    # the logged model is named after its registered model
    logged = mlflow.search_logged_models(output_format="list")
    assert {m.name for m in logged} == {"cpm-ant-tiny", "cpm-ant-tiny-3b", "cpm-ant-tiny-int8"}
    # Prefect task runs are named by what they do
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:
        names = {t.name for t in pc.read_task_runs()}
    assert {"pretrain-tiny", "compress-3b", "compress-int8", "ladder-table"} <= names
    # the MLflow bookkeeping (open_run/close_run) is no task of its own in the flow-run graph
    assert not [n for n in names if n.startswith(("open-run", "close-run"))], names

    # a rerun: every stage reused, nothing registered; the compress rung came from Prefect's cache
    versions = lambda: sorted((v.name, int(v.version)) for v in client.search_model_versions())  # noqa: E731
    before = versions()
    again = stand_in_lifecycle(cfg)
    assert again["reused_stages"] == ["pretrain", "compress", "tune", "validate", "report"]
    assert versions() == before
    assert again["compress"]["summary"][0]["reused"] is True
    # each lifecycle's parent run has a name of its own; the rerun's says which stages it reused; `models` counts
    # the distinct registered versions (3), not the rows of every stage (the validate stage repeats them, the
    # report's row is a path)
    first, rerun = client.get_run(out["lifecycle_run_id"]), client.get_run(again["lifecycle_run_id"])
    assert first.info.run_name != rerun.info.run_name and rerun.info.run_name.startswith("lifecycle-tiny-")
    assert first.data.tags["cpmant.reused"] == "none"
    assert rerun.data.tags["cpmant.reused"] == "pretrain,compress,tune,validate,report"
    assert len(out["summary"]) > 3 and first.data.metrics["models"] == rerun.data.metrics["models"] == 3
    assert first.data.tags["cpmant.models"] == ", ".join(uris)

    assert all(r["reused"] for r in again["compress"]["summary"])
    # one reuse line per stage, with its rows' reasons, printed and kept as the stage run's description
    assert [ln.split(" (")[0] for ln in again["reuse_lines"]] == list(again["stages"])
    assert all(ln.startswith(f"{s} (reused): ") for s, ln in zip(again["stages"], again["reuse_lines"]))
    assert again["reuse_lines"][2] == "tune (reused): tune demo: reused models:/cpm-ant-tiny/1: same key 0123456789ab"
    rerun_stages = {r.info.run_name: r for r in mlflow.search_runs(
        search_all_experiments=True, output_format="list",
        filter_string=f"tags.`mlflow.parentRunId` = '{again['lifecycle_run_id']}'")}
    assert rerun_stages["tune"].data.tags["mlflow.note.content"] == again["reuse_lines"][2]

    # --force compress, on a 2-worker local Dask cluster (processes, one thread each): only that stage reruns
    # (new versions; pretrain reused) and its rungs give the serial run's numbers
    dask_cfg = {**cfg, "orchestration": {"task_runner": "dask", "dask_workers": 2}}
    forced = stand_in_lifecycle(dask_cfg, force=["compress"])
    assert forced["compress"]["variants"] == ["models:/cpm-ant-tiny-3b/2", "models:/cpm-ant-tiny-int8/2"]
    assert "pretrain" in forced["reused_stages"] and "compress" not in forced["reused_stages"]
    for a, b in zip(out["compress"]["ladder"][1:], forced["compress"]["ladder"][1:]):
        for m in ("lm_loss", "perplexity", "params", "bytes_on_disk", "loss_increase"):
            assert b[m] == pytest.approx(a[m], rel=1e-6, abs=1e-9), (a["model"], m)
    assert CALLS["tune"][-1] == ("models:/cpm-ant-tiny/1", False)
    # the lifecycle moves `candidate` to what it validates
    assert int(client.get_model_version_by_alias("cpm-ant-tiny-int8", "candidate").version) == 2

@pytest.mark.unit
def test_lifecycle_prints_one_reuse_line_per_stage_with_its_reasons(capsys):
    """Each stage prints whether it was reused (all rows), partly reused or ran, and why (its rows' reasons); the
    lines are the stage runs' descriptions and, together, the parent run's."""
    from flows.config import LifecycleConfig
    from flows.lifecycle import StageFlows, run_lifecycle

    closed: dict[str, dict] = {}

    class Record:  # where the runs would be recorded: kept here
        def open(self, name, parent_run_id=None, tags=None):
            return name

        def close(self, run_id, summary, **kw):
            closed[run_id] = kw

        def pin(self, candidates):
            closed["pins"] = {"candidates": candidates}

    def row(stage, model, reused):
        return _row(stage, model, "m", 1.0, reused)

    flows = StageFlows(
        pretrain=lambda config, force: {"model_uri": "models:/m/1", "summary": [row("pretrain", "models:/m/1", True)]},
        compress=lambda uri, recipes, config, force: {"variants": ["models:/m-3b/2"], "summary": [
            row("compress 3b", "models:/m-3b/2", False)]},
        tune=lambda uri, tasks, methods, config, force: {"deltas": ["models:/d/1"], "summary": [
            row("tune c3 lora", "models:/d/1", True), {**row("tune c3 bitfit", "models:/e/1", False), "reason": ""}]},
        validate=lambda uris, config, force, promote: {"summary": [row("validate", u, True) for u in uris]},
        report=lambda config: {"summary": []})
    out = run_lifecycle(LifecycleConfig(), False, flows, Record(), runner=lambda flow, orch: flow)
    printed = capsys.readouterr().out.splitlines()
    key = "same key 0123456789ab"
    assert printed == out["reuse_lines"] == [
        f"pretrain (reused): reused models:/m/1: {key}",
        "compress (ran): compress 3b: made anew: stand-in",
        f"tune (partly reused): tune c3 lora: reused models:/d/1: {key} | models:/e/1: made (no reason recorded)",
        "validate (reused): " + " | ".join(f"reused {u}: {key}"
                                           for u in ("models:/m/1", "models:/m-3b/2", "models:/d/1")),
        "report (ran): no rows"]
    assert out["reused_stages"] == ["pretrain", "validate"]
    assert closed["pins"]["candidates"] == ["models:/m/1", "models:/m-3b/2", "models:/d/1"]
    assert closed["tune"]["note"] == printed[2] and closed["tune"]["status"] == "FINISHED"
    assert closed[out["lifecycle_run_id"]]["note"] == "\n\n".join(printed)
    assert closed[out["lifecycle_run_id"]]["reused_stages"] == ["pretrain", "validate"]


@pytest.mark.unit
def test_pretrain_reuse_key_misses_when_any_input_changes(micro_pretrain_cfg, tmp_path):
    """The pretraining stage's one reuse key: the same inputs give the same key; a setting that shapes the weights
    or the reported numbers, the data or the vocab each give another; where it writes, threads, checkpoint cadence
    and how it resumes do not. The key is written beside the finished training, which is found by it."""
    from cpmant.checkpoint import META_FILE, git_sha
    from cpmant.hashing import sha256_json
    from cpmant.training.runs import finished, reuse_key, settings, write_finished

    cfg = micro_pretrain_cfg()
    data, vocab = "a" * 64, "b" * 64
    k = reuse_key(cfg, data, vocab)
    assert k == reuse_key(cfg, data, vocab) and len(k) == 64
    for same in ({"output_dir": str(tmp_path / "elsewhere")}, {"num_threads": 3}, {"resume": "never"},
                 {"save_interval": 2}):
        assert reuse_key(cfg.model_copy(update=same), data, vocab) == k, same
    for change in ({"seed": 7}, {"lr": 0.01}, {"max_steps": 13}, {"eval_rows": 4}):
        assert reuse_key(cfg.model_copy(update=change), data, vocab) != k, change
    assert reuse_key(cfg, "c" * 64, vocab) != k and reuse_key(cfg, data, "c" * 64) != k
    # the recipe: the hashed settings, the data and vocab hashes and the code version, in the one canonical form
    assert k == sha256_json({"stage": "pretrain", "settings": settings(cfg), "data_sha256": data,
                             "vocab_sha256": vocab, "git_sha": git_sha()})

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    write_finished(run, k, {"run_id": "r1", "result": {"steps": 12}})
    assert finished(run, k) is None  # no finished model folder: nothing to register
    (run / "model" / META_FILE).write_text("{}")
    assert finished(run, k) == {"inputs_sha256": k, "run_id": "r1", "result": {"steps": 12}}
    assert finished(run, reuse_key(cfg.model_copy(update={"seed": 7}), data, vocab)) is None


@pytest.mark.unit
def test_cli_force_stage_and_runner_flags(capsys):
    """`--force STAGE` names stages; a bad stage or Dask address is one error and one fix, exit 2, before any run."""
    from cpmant.errors import CpmantError
    from cpmant_cli.common import runner_overrides
    from cpmant_cli.main import build_parser, main

    args = build_parser().parse_args(["lifecycle", "--force", "compress", "tune", "--dask-address", "tcp://h:8786"])
    assert args.force == ["compress", "tune"]
    with pytest.raises(CpmantError, match=r"Dask scheduler at tcp://h:8786 is unreachable"):
        runner_overrides(args)  # checked before any flow starts (it took ~50 s and nine tracebacks before)
    assert runner_overrides(build_parser().parse_args(["lifecycle", "--task-runner", "thread"])) == {
        "orchestration": {"task_runner": "thread"}}
    assert build_parser().parse_args(["lifecycle", "--force"]).force == []  # every stage
    assert build_parser().parse_args(["lifecycle"]).force is None
    assert main(["lifecycle", "--force", "bogus"]) == 2
    assert main(["pretrain", "--dask-address", "h:8786"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "fix:" in err and "bogus" in err


@pytest.mark.unit
def test_force_stages():
    from cpmant.errors import CpmantError
    from flows.config import forced

    assert forced(True, "tune") and not forced(False, "tune")
    assert forced(["tune"], "tune") and not forced(["tune"], "pretrain")
    with pytest.raises(CpmantError):
        forced(["nope"], "tune")
