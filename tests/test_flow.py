"""The pretrain flow end to end on a temporary MLflow store and Prefect's test harness: the run's metrics and
artifacts, the registered version's contract tags and alias, generation from the registry URI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MICRO_MODEL

pytestmark = pytest.mark.flow

CONTRACT_TAGS = ("cpmant.stage", "cpmant.parent", "cpmant.checkpoint_sha256", "cpmant.config_sha256",
                 "cpmant.data_sha256", "cpmant.git_sha")


def _config(corpus, out, steps=16):
    return {"pretrain": {"preset": "tiny", "model_overrides": MICRO_MODEL, "corpus": str(corpus), "vocab_size": 600,
                         "seq_len": 64, "micro_batch_size": 4, "max_steps": steps, "warmup_steps": 4, "lr": 0.05,
                         "eval_interval": 8, "eval_rows": 8, "save_interval": 8, "output_dir": str(out),
                         "encode_workers": 1, "min_piece_tokens": 4},
            "tracking": {"measure_power_secs": 1, "metric_flush_steps": 5}}


def test_pretrain_flow_tracks_and_registers(prefect_harness, mlflow_store, fixture_corpus, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from cpmant.checkpoint import sha256_file
    from flows.pretrain import pretrain_flow

    out = pretrain_flow(_config(fixture_corpus, tmp_path / "run"))
    assert out["model_uri"] == "models:/cpm-ant-tiny/1" and out["reused"] is False
    assert out["valid_loss_end"] < out["valid_loss_start"]

    client = MlflowClient()
    assert mlflow.get_tracking_uri() == f"sqlite:///{mlflow_store / 'mlflow.db'}"
    run = client.get_run(out["run_id"])
    m = run.data.metrics
    for key in ("energy_kwh", "emissions_kg_co2e", "cost_rmb", "duration_s", "tokens_per_second", "mfu", "loss",
                "valid_loss"):
        assert key in m, key
    assert m["energy_kwh"] > 0 and m["emissions_kg_co2e"] > 0 and m["cost_rmb"] > 0 and m["duration_s"] > 0
    assert 0 < m["mfu"] < 1
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(h.step for h in history) == list(range(1, 17))  # every step, batched, none lost
    assert run.data.params["preset"] == "tiny" and run.data.params["max_steps"] == "16"
    # params are the config as it ran: the corpus's real path, the vocab the corpus gave, the device used
    vocab = len((tmp_path / "run" / "model" / "vocab.txt").read_text(encoding="utf-8").splitlines())
    assert run.data.params["corpus"] == str(Path(fixture_corpus).resolve())
    assert run.data.params["vocab_size"] == str(vocab) and run.data.params["device"] == "cpu"
    # the precision as used (auto resolves on this machine's CPU) beside the setting
    from cpmant.precision import resolve_precision

    assert run.data.params["precision_setting"] == "auto"
    assert run.data.params["precision"] == resolve_precision("auto", "cpu") == out["precision"]
    # summary values sit at the final step, beside the last loss; a step's throughput has its own name
    assert [(h.step, h.value) for h in client.get_metric_history(run.info.run_id, "tokens_per_second")] == [
        (16, pytest.approx(out["tokens_per_second"]))]
    assert len(client.get_metric_history(run.info.run_id, "step_tokens_per_second")) == 16
    assert {h.step for h in client.get_metric_history(run.info.run_id, "energy_kwh")} == {16}
    arts = {a.path for d in ("config", "emissions", "plots", "logs") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"config/config.yaml", "emissions/emissions.csv", "plots/loss.png", "logs/train_log.jsonl"} <= arts

    mv = client.get_model_version_by_alias("cpm-ant-tiny", "candidate")
    assert int(mv.version) == 1 and mv.run_id == out["run_id"]  # logged and registered in its training run
    assert mv.description.startswith("cpm-ant-tiny: pretrained 16 steps on ")
    assert set(CONTRACT_TAGS) <= set(mv.tags)
    assert mv.tags["cpmant.stage"] == "pretrain" and mv.tags["cpmant.parent"] == ""
    assert mv.tags["cpmant.checkpoint_sha256"] == sha256_file(tmp_path / "run" / "model" / "model.safetensors")
    assert len(mv.tags["cpmant.data_sha256"]) == 64 and len(mv.tags["cpmant.config_sha256"]) == 64
    assert mv.tags["cpmant.git_sha"]
    # the reuse key: on the version, on its run and beside the result in the run folder; the decision says why
    key = json.loads((tmp_path / "run" / "inputs.json").read_text())["inputs_sha256"]
    assert mv.tags["cpmant.inputs_sha256"] == run.data.tags["cpmant.inputs_sha256"] == key and len(key) == 64
    assert out["reason"] == f"pretrain: made anew: no result of cpm-ant-tiny has key {key[:12]}"
    assert out["summary"][0]["reason"] == out["reason"]

    # the user's path: the console script in a new process, on the same store (CPMANT_HOME is inherited)
    proc = subprocess.run([str(Path(sys.executable).with_name("cpmant")), "generate", "models:/cpm-ant-tiny@candidate",
                           "床前明月光", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.strip()
    assert printed.startswith("床前明月光") and len(printed) > len("床前明月光")

    # --force trains again and registers a new version even though version 1 matches
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    forced = pretrain_flow(_config(fixture_corpus, tmp_path / "run"), force=True)
    assert forced["model_uri"] == "models:/cpm-ant-tiny/2" and forced["reused"] is False
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before + 1
    # a stage run outside the lifecycle does not move `candidate` (the version a lifecycle validates): the new
    # version is the `challenger`
    assert int(client.get_model_version_by_alias("cpm-ant-tiny", "candidate").version) == 1
    assert int(client.get_model_version_by_alias("cpm-ant-tiny", "challenger").version) == 2

    # the logged model shows the final values (before: the step-0 valid_loss from before training)
    (logged,) = mlflow.search_logged_models(filter_string=f"source_run_id = '{out['run_id']}'", output_format="list")
    model_metrics = {m.key: m for m in logged.metrics}
    assert model_metrics["valid_loss"].step == 16
    assert model_metrics["valid_loss"].value == pytest.approx(out["valid_loss_end"])
    assert model_metrics["tokens_per_second"].value == pytest.approx(out["tokens_per_second"])


def test_cli_rerun_reuses_and_prints_a_summary(prefect_harness, mlflow_store, fixture_corpus, tmp_path, capsys):
    """A second `cpmant pretrain` on the same home registers nothing and trains nothing; the CLI ends with a
    summary table (stage, model, key metric, time, reused), and --json prints the result instead."""
    import mlflow
    import yaml
    from mlflow.tracking import MlflowClient

    from cpmant_cli.main import main

    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump(_config(fixture_corpus, tmp_path / "run", steps=8)))
    assert main(["pretrain", "--config", str(cfg)]) == 0
    first = capsys.readouterr().out
    assert not first.lstrip().startswith("{")
    head, _, row = first.strip().splitlines()[:3]
    assert head.split()[:2] == ["stage", "model"] and "reused" in head
    assert row.split()[:2] == ["pretrain", "models:/cpm-ant-tiny/1"] and row.split()[-1] == "no"
    runs = len(mlflow.search_runs(search_all_experiments=True))

    assert main(["pretrain", "--config", str(cfg), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["model_uri"] == "models:/cpm-ant-tiny/1" and again["reused"] is True
    assert again["valid_loss_end"] is not None
    key = MlflowClient().get_model_version("cpm-ant-tiny", "1").tags["cpmant.inputs_sha256"]
    assert again["reason"] == again["summary"][0]["reason"] == (
        f"pretrain: reused models:/cpm-ant-tiny/1: same key {key[:12]}")
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs  # no new run, no training
    assert [int(v.version) for v in MlflowClient().search_model_versions("name = 'cpm-ant-tiny'")] == [1]


def test_one_reuse_key_decides_pretraining_reuse(prefect_harness, mlflow_store, fixture_corpus, tmp_path):
    """The key alone decides: a training whose registration failed is registered (in its run) without training
    again, a rerun reuses the version, a deleted version is made anew (from the finished training on disk), and
    another seed misses."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cpmant.errors import CpmantError
    from flows.pretrain import pretrain_flow

    def mlflow_runs():
        return mlflow.search_runs(search_all_experiments=True, output_format="list")

    def runs():
        return len(mlflow_runs())

    cfg = _config(fixture_corpus, tmp_path / "run", steps=4)
    refused = {**cfg, "tracking": {**cfg["tracking"], "register_alias": "champion"}}  # refused at registration
    with pytest.raises(CpmantError, match="champion"):
        pretrain_flow(refused)
    (trained,) = mlflow_runs()
    client = MlflowClient()  # on the store the flow set up
    key = json.loads((tmp_path / "run" / "inputs.json").read_text())["inputs_sha256"]
    assert not client.search_model_versions("name = 'cpm-ant-tiny'")

    first = pretrain_flow(cfg)
    assert first["model_uri"] == "models:/cpm-ant-tiny/1" and first["run_id"] == trained.info.run_id
    assert runs() == 1  # no training, no new run
    assert first["reason"] == (f"pretrain: registering the finished training in {tmp_path / 'run'} (MLflow run "
                               f"{trained.info.run_id}): same key {key[:12]}")
    mv = client.get_model_version("cpm-ant-tiny", "1")
    assert mv.run_id == trained.info.run_id and mv.tags["cpmant.inputs_sha256"] == key
    assert len(client.get_metric_history(trained.info.run_id, "loss")) == 4  # trained once

    again = pretrain_flow(cfg)
    assert (again["model_uri"], again["reused"]) == ("models:/cpm-ant-tiny/1", True)
    assert again["reason"] == f"pretrain: reused models:/cpm-ant-tiny/1: same key {key[:12]}"

    client.delete_model_version("cpm-ant-tiny", "1")
    remade = pretrain_flow(cfg)
    assert (remade["model_uri"], remade["reused"]) == ("models:/cpm-ant-tiny/2", False)
    assert "same key" in remade["reason"] and runs() == 1

    seed = _config(fixture_corpus, tmp_path / "run-seed", steps=4)
    seed["pretrain"]["seed"] = 7
    other = pretrain_flow(seed)
    other_key = json.loads((tmp_path / "run-seed" / "inputs.json").read_text())["inputs_sha256"]
    assert other_key != key and runs() == 2
    assert (other["model_uri"], other["reused"]) == ("models:/cpm-ant-tiny/3", False)
    assert other["reason"] == f"pretrain: made anew: no result of cpm-ant-tiny has key {other_key[:12]}"


def test_ctrl_c_stops_keeps_the_checkpoint_and_says_how_to_resume(fixture_corpus, tmp_path):
    """Ctrl+C (SIGINT to the terminal's whole process group) during `cpmant pretrain` stops within seconds with exit
    130, keeps the checkpoints and names --resume auto. Before: Prefect's temporary server died with the signal and
    the client retried for about 2.5 minutes, then printed an httpx traceback."""
    import yaml

    from cpmant.checkpoint import list_complete_checkpoints

    run = tmp_path / "run"
    cfg = _config(fixture_corpus, run, steps=100000)
    cfg["pretrain"].update(save_interval=2, eval_interval=100000)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "CPMANT_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("cpmant")), "pretrain", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own group, as a shell gives a foreground job
    try:
        deadline = time.monotonic() + 300
        while not list_complete_checkpoints(run / "checkpoints"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert took < 20, took
    assert "--resume auto" in err and str(run) in err
    assert "Traceback" not in err and "Crash detected" not in err, err[-3000:]
    assert list_complete_checkpoints(run / "checkpoints")


def test_unreachable_server_keeps_checkpoint(micro_pretrain_cfg, monkeypatch):
    from cpmant.errors import CpmantError
    from cpmant.training.loop import pretrain
    from registry.register import register_checkpoint

    res = pretrain(micro_pretrain_cfg(max_steps=2, save_interval=2, eval_interval=2), progress=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(CpmantError) as e:
        register_checkpoint(res.model_dir, "cpm-ant-tiny")
    msg = str(e.value)
    assert "unreachable" in msg and f"cpmant register {res.model_dir}" in msg
    assert (res.model_dir / "model.safetensors").exists() and (res.model_dir / "cpmant_meta.json").exists()


def test_cli_lists_the_verbs(capsys):
    from cpmant_cli.main import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for verb in ("lifecycle", "pretrain", "generate", "convert", "register"):
        assert verb in text
