"""The browser check: the report and the MLflow UI (infra/mlflow-ui.sh: its landing view, a deep link, the home page,
a model-version page) rendered in headless Chromium (Debian's `chromium`), with the expected text and plots there.
Without chromium the test is skipped locally and fails under CI=true (.ci/run installs it: `apt-get install -y
chromium fonts-noto-cjk`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from _micro_lifecycle import build

pytestmark = pytest.mark.flow
CHROMIUM = shutil.which("chromium")


def _need_chromium():
    if CHROMIUM:
        return
    msg = "chromium is not installed (apt-get install -y chromium fonts-noto-cjk)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{msg}: required under CI")
    pytest.skip(msg)


def _chromium(*args: str, timeout: int = 120) -> str:
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--hide-scrollbars", *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lifecycle(prefect_harness):
    _need_chromium()
    return build()


def test_report_renders_in_chromium(lifecycle, tmp_path, monkeypatch):
    import mlflow

    from tasks.report import build_report

    monkeypatch.setenv("CPMANT_HOME", str(lifecycle["home"]))
    try:
        path, _, _ = build_report(out=tmp_path / "report.html")
    finally:
        mlflow.set_tracking_uri(None)
    dom = _chromium("--dump-dom", path.as_uri())
    for text in ("CPM-Ant lifecycle report", "Projection of a full 10B pretraining run", "0.178 kWh per A100-hour",
                 "models:/cpm-ant-tiny-3b/1", "published LM loss (CPM-Ant)"):
        assert text in dom, text
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', dom)) >= 4
    shot = tmp_path / "report.png"
    _chromium("--window-size=1200,3000", f"--screenshot={shot}", path.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def _session_processes(sid: int) -> list[str]:
    """The command lines of the processes in session `sid` (the UI script and whatever it started)."""
    ps = subprocess.run(["ps", "--sid", str(sid), "-o", "args="], capture_output=True, text=True)
    return [line for line in ps.stdout.splitlines() if line.strip()]


def test_mlflow_ui_landing_view_and_model_version_page(lifecycle, tmp_path):
    """infra/mlflow-ui.sh as a newcomer meets it (a fresh browser profile per page): the root URL lands on the
    experiment's runs in the Model training view with the registry in the sidebar, not the GenAI overview; a deep
    link without `?workflowType` stays in that view; no telemetry notice; two processes, no job runner."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(lifecycle["tracking_uri"])
    exp_id = client.get_experiment_by_name("cpmant").experiment_id
    newest = client.search_runs([exp_id], max_results=1)[0].info.run_name  # the runs table's first row
    port = _free_port()
    script = Path(__file__).resolve().parents[1] / "infra" / "mlflow-ui.sh"
    server = subprocess.Popen([str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True,
                              env={**os.environ, "CPMANT_HOME": str(lifecycle["home"]), "MLFLOW_PORT": str(port)})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "mlflow-ui.sh did not start"
            time.sleep(0.5)
        procs = _session_processes(server.pid)
        assert len(procs) <= 2 and not any("huey" in p for p in procs), procs  # the CLI and one uvicorn worker

        landing = _chromium("--virtual-time-budget=15000", "--dump-dom", base + "/")
        assert f"<title>Runs - Experiment {exp_id} - MLflow</title>" in landing  # the runs page, not "Overview"
        assert 'href="#/models"' in landing and "Model registry" in landing  # the registry in the sidebar
        assert f">{newest}<" in landing  # the runs table lists the project's runs
        for genai in ("Evaluation runs", "Agent versions", "Information about UI telemetry"):
            assert genai not in landing, genai
        shot = tmp_path / "mlflow-landing.png"
        _chromium("--virtual-time-budget=15000", "--window-size=1400,900", f"--screenshot={shot}", base + "/")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

        deep = _chromium("--virtual-time-budget=12000", "--dump-dom", f"{base}/#/experiments/{exp_id}")
        assert f"Experiment {exp_id} - MLflow</title>" in deep and "Overview - Experiment" not in deep
        assert "Model registry" in deep and "Evaluation runs" not in deep
        home = _chromium("--virtual-time-budget=12000", "--dump-dom", f"{base}/#/?home")  # MLflow's home page
        assert "Welcome to MLflow" in home and "Information about UI telemetry" not in home

        # MLflow 3's UI: the model-version page is /#/models/NAME/versions/N (a JS app: rendered with virtual time)
        dom = _chromium("--virtual-time-budget=10000", "--dump-dom", f"{base}/#/models/cpm-ant-tiny/versions/1")
        assert "cpm-ant-tiny v1 - MLflow" in dom and "Version 1" in dom
        for text in ("cpmant.stage", "cpmant.data_sha256", "candidate", "pretrained 8 steps"):
            assert text in dom, text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
