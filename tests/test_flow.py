"""The pretrain flow end to end on a temporary MLflow store and Prefect's test harness: the run's metrics and
artifacts, the registered version's contract tags and alias, generation from the registry URI."""

from __future__ import annotations

import subprocess
import sys
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
    assert out["model_uri"] == "models:/cpm-ant-tiny/1"
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
    arts = {a.path for d in ("config", "emissions", "plots", "logs") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"config/config.yaml", "emissions/emissions.csv", "plots/loss.png", "logs/train_log.jsonl"} <= arts

    mv = client.get_model_version_by_alias("cpm-ant-tiny", "candidate")
    assert int(mv.version) == 1 and mv.run_id == out["run_id"]
    assert set(CONTRACT_TAGS) <= set(mv.tags)
    assert mv.tags["cpmant.stage"] == "pretrain" and mv.tags["cpmant.parent"] == ""
    assert mv.tags["cpmant.checkpoint_sha256"] == sha256_file(tmp_path / "run" / "model" / "model.safetensors")
    assert len(mv.tags["cpmant.data_sha256"]) == 64 and len(mv.tags["cpmant.config_sha256"]) == 64
    assert mv.tags["cpmant.git_sha"]

    # the user's path: the console script in a new process, on the same store (CPMANT_HOME is inherited)
    proc = subprocess.run([str(Path(sys.executable).with_name("cpmant")), "generate", "models:/cpm-ant-tiny@candidate",
                           "床前明月光", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.strip()
    assert printed.startswith("床前明月光") and len(printed) > len("床前明月光")


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
