"""The browser check: the report and the MLflow UI's model-version page rendered in headless Chromium (Debian's
`chromium`), with the expected text and plots there. Without chromium the test is skipped locally and fails under
CI=true (.ci/run installs it: `apt-get install -y chromium fonts-noto-cjk`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
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


def test_mlflow_ui_model_version_page(lifecycle, tmp_path):
    port = _free_port()
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", lifecycle["tracking_uri"], "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              # no job runner and its 7 huey consumers: half the start-up time on 2 cores
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
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
            assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        # MLflow 3's UI: the model-version page is /#/models/NAME/versions/N (a JS app: rendered with virtual time)
        dom = _chromium("--virtual-time-budget=10000", "--dump-dom", f"{base}/#/models/cpm-ant-tiny/versions/1")
        assert "cpm-ant-tiny v1 - MLflow" in dom and "Version 1" in dom
        for text in ("cpmant.stage", "cpmant.data_sha256", "candidate", "pretrained 8 steps"):
            assert text in dom, text
        # the README's way into the classic "Model training" view: its sidebar lists the model registry
        home = _chromium("--virtual-time-budget=8000", "--dump-dom", f"{base}/#/?workflowType=machine_learning")
        assert "Model registry" in home
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
