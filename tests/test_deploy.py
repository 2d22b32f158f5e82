"""Deployments on real servers: infra/up.sh starts PostgreSQL, the MLflow server, the Prefect server, creates the
work pool (queues and training limits) before deploying, deploys the pretrain deployment of prefect.yaml and starts
a process worker; a run of the deployment with tiny parameters goes through the worker end to end and registers
cpm-ant-tiny on the MLflow server; infra/down.sh stops everything. Skipped, with the fix, without PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest

from conftest import MICRO_MODEL
from test_registry_server import free_port, pg_bindir

pytestmark = pytest.mark.flow

REPO = Path(__file__).resolve().parents[1]


def test_deployment_runs_through_a_real_worker(fixture_corpus):
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed: run `bash infra/postgres.sh install` (as root)")
    base = Path(tempfile.mkdtemp(prefix="cpmant-deploy-"))  # open to the `postgres` OS user, unlike tmp_path
    base.chmod(0o755)
    drop = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "PGHOST", "PGUSER", "PGDATABASE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    mlflow_port, prefect_port = free_port(), free_port()
    env.update(CPMANT_HOME=str(base / "home"), PGDATA=str(base / "pg"), PGPORT=str(free_port()),
               CPMANT_PG_BIN=bindir, MLFLOW_PORT=str(mlflow_port), PREFECT_PORT=str(prefect_port),
               MLFLOW_ARTIFACTS_DESTINATION=str(base / "artifacts"), MLFLOW_WORKERS="1", CPMANT_DEPLOY="pretrain",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_UI_ENABLED="false", CPMANT_REPO=str(REPO))
    prefect = str(REPO / ".venv" / "bin" / "prefect")
    api = f"http://127.0.0.1:{prefect_port}/api"
    try:
        up = subprocess.run(["bash", str(REPO / "infra" / "up.sh")], env=env, capture_output=True, text=True,
                            timeout=240, stdin=subprocess.DEVNULL)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "deployed: Deployment 'pretrain/pretrain'" in up.stdout
        run_env = {**env, "PREFECT_API_URL": api}
        with urllib.request.urlopen(f"{api}/work_pools/cpmant-process/queues/training", timeout=30) as r:
            assert json.loads(r.read())["concurrency_limit"] == 1  # one training at a time

        config = {"pretrain": {"preset": "tiny", "model_overrides": MICRO_MODEL, "corpus": str(fixture_corpus),
                               "vocab_size": 600, "seq_len": 64, "micro_batch_size": 4, "max_steps": 4,
                               "warmup_steps": 2, "eval_interval": 4, "eval_rows": 4, "save_interval": 4,
                               "output_dir": str(base / "run"), "encode_workers": 1, "min_piece_tokens": 4,
                               "num_threads": 1},
                  "tracking": {"measure_power_secs": 1}}
        run = subprocess.run([prefect, "deployment", "run", "pretrain/pretrain", "--params",
                              json.dumps({"config": config}), "--watch", "--watch-interval", "1"],
                             env=run_env, capture_output=True, text=True, timeout=240)
        worker_log = (base / "home" / "logs" / "worker.log")
        detail = run.stdout + run.stderr + (worker_log.read_text()[-4000:] if worker_log.exists() else "")
        assert run.returncode == 0 and "COMPLETED" in run.stdout.upper(), detail

        from mlflow.tracking import MlflowClient

        uri = f"http://127.0.0.1:{mlflow_port}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        mv = client.get_model_version_by_alias("cpm-ant-tiny", "candidate")
        assert int(mv.version) == 1 and mv.tags["cpmant.stage"] == "pretrain"
        run_data = client.get_run(mv.run_id).data
        assert run_data.params["max_steps"] == "4" and "loss" in run_data.metrics
    finally:
        down = subprocess.run(["bash", str(REPO / "infra" / "down.sh")], env=env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
