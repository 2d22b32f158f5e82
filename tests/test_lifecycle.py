"""The lifecycle end to end on a micro model (tune, validate and report as stand-ins where their flows have not
landed): one MLflow parent run with a nested run per stage, the stages' runs under theirs, `candidate` pinned on
what it validates; a rerun reuses every stage and registers nothing; `--force STAGE` reruns that stage only; the
Prefect cache key misses when one input (a config value, a code file) changes. The Dask task runner's rungs give
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


@flow(name="tune")
def fake_tune(model_uri: str, tasks=None, methods=None, config=None, force=False) -> dict:
    from flows.summary import summary_row

    CALLS["tune"].append((model_uri, force))
    return {"deltas": [], "tables": {}, "summary": [summary_row("tune demo", model_uri, "acc", 0.5, 0.0,
                                                                len(CALLS["tune"]) > 1 and not force)]}


@flow(name="validate")
def fake_validate(uris: list[str], config=None, force=False, promote=None) -> dict:
    from flows.summary import summary_row

    CALLS["validate"].append((list(uris), force, promote, config["tracking"]["parent_run_id"]))
    again = len(CALLS["validate"]) > 1 and not force
    return {"results": [{"model": u, "passed": True, "promoted": False, "failures": [], "run_id": ""} for u in uris],
            "summary": [summary_row("validate", u, "passed", 1.0, 0.0, again) for u in uris]}


@flow(name="report")
def fake_report(config=None, out=None) -> dict:
    from flows.summary import summary_row

    CALLS["report"].append(out)
    return {"path": "/tmp/report.html", "summary": [summary_row("report", "/tmp/report.html", "page", None, 0.0,
                                                                len(CALLS["report"]) > 1)]}


def test_lifecycle_nests_runs_reuses_and_forces_one_stage(prefect_harness, mlflow_store, fixture_corpus, tmp_path,
                                                          monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    import flows.lifecycle as lc

    fakes = {"tune": fake_tune, "validate": fake_validate, "report": fake_report}
    monkeypatch.setattr(lc, "_stage_flow", lambda module, name: fakes[module])
    cfg = _config(fixture_corpus, tmp_path / "run")

    out = lc.lifecycle_flow(cfg)
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
    again = lc.lifecycle_flow(cfg)
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

    # --force compress, on a 2-worker local Dask cluster (processes, one thread each): only that stage reruns
    # (new versions; pretrain reused) and its rungs give the serial run's numbers
    dask_cfg = {**cfg, "orchestration": {"task_runner": "dask", "dask_workers": 2}}
    forced = lc.lifecycle_flow(dask_cfg, force=["compress"])
    assert forced["compress"]["variants"] == ["models:/cpm-ant-tiny-3b/2", "models:/cpm-ant-tiny-int8/2"]
    assert "pretrain" in forced["reused_stages"] and "compress" not in forced["reused_stages"]
    for a, b in zip(out["compress"]["ladder"][1:], forced["compress"]["ladder"][1:]):
        for m in ("lm_loss", "perplexity", "params", "bytes_on_disk", "loss_increase"):
            assert b[m] == pytest.approx(a[m], rel=1e-6, abs=1e-9), (a["model"], m)
    assert CALLS["tune"][-1] == ("models:/cpm-ant-tiny/1", False)
    # the lifecycle moves `candidate` to what it validates
    assert int(client.get_model_version_by_alias("cpm-ant-tiny-int8", "candidate").version) == 2

@pytest.mark.unit
def test_cache_key_misses_when_any_input_changes(tmp_path, monkeypatch):
    """The Prefect cache key of a task: the same inputs and code give the same key; one config value, one byte of
    a core module the task calls, or the data hash each give another; where runs are filed and `force` do not."""
    from types import SimpleNamespace

    import tasks.caching as caching
    from cpmant.compress.config import CompressConfig
    from tasks.config import TrackingConfig

    for rel in ("cpmant/__init__.py", "cpmant/model.py", "registry/__init__.py", "tasks/__init__.py",
                "tasks/tracking.py", "tasks/config.py", "tasks/plots.py", "tasks/caching.py", "tasks/compress.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    monkeypatch.setattr(caching, "ROOT", tmp_path)
    ctx = SimpleNamespace(task=SimpleNamespace(name="compress-variant",
                                               fn=SimpleNamespace(__module__="tasks.compress")))
    policy = caching.ContentHash()

    def key(compress=CompressConfig(), tracking=TrackingConfig(), **extra):
        return policy.compute_key(ctx, {"compress": compress, "tracking": tracking, "recipe": "int8", **extra}, {})

    k = key()
    assert k == key() and k.startswith("compress-variant-")
    # not results: the parent run, the alias rule, metric batching, force
    assert key(tracking=TrackingConfig(parent_run_id="abc", register_alias="candidate", metric_flush_steps=7),
               force=True) == k
    assert key(compress=CompressConfig(importance_rows=63)) != k  # a config value
    assert key(tracking=TrackingConfig(country_iso_code="FRA")) != k  # the grid shapes the emissions reported
    (tmp_path / "cpmant" / "model.py").write_text("# cpmant/model.py, edited\n")  # the core code the task runs
    k2 = key()
    assert k2 != k
    (tmp_path / "tasks" / "compress.py").write_text("# the task's own module, edited\n")
    assert key() != k2
    from cpmant.training.prepare import PreparedData

    data = lambda sha: PreparedData("c", sha, tmp_path, "v", {}, [], [])  # noqa: E731
    assert key(data=data("a" * 64)) == key(data=data("a" * 64)) != key(data=data("b" * 64))  # the data


@pytest.mark.unit
def test_cli_force_stage_and_runner_flags(capsys):
    """`--force STAGE` names stages; a bad stage or Dask address is one error and one fix, exit 2, before any run."""
    from cpmant.errors import CpmantError
    from cpmant_cli.main import build_parser, main, runner_overrides

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
