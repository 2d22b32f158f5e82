"""The browser check: the report and the MLflow UI (infra/mlflow-ui.sh: its landing view, a deep link, the home page,
a model-version page) rendered in headless Chromium (Debian's `chromium`), with the expected text and plots there;
the Prefect UI of infra/prefect-server.sh on a port other than 4200 reaching its API; and the report's validation
headings, aliases and lineage count, read from the rendered page, against MLflow (a validated copy of the micro
lifecycle's home). Without chromium the test is skipped locally and fails under CI=true (.ci/run installs it:
`apt-get install -y chromium fonts-noto-cjk`)."""

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


def _wait_http(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Wait until `url` answers 200 while `server` runs; its log's tail in the failure otherwise."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert server.poll() is None and time.time() < deadline, f"did not start: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_prefect_ui_on_a_non_default_port(tmp_path):
    """infra/prefect-server.sh on a port other than 4200: the UI it serves calls the API on that port (its
    /ui-settings names it) and renders the dashboard, not "Unable to connect to Prefect server" (the v2 UI's words;
    the v1 UI's are "Can't connect to Server API"). The dashboard's empty state is drawn only from the API's answer."""
    import json

    _need_chromium()
    port = _free_port()
    assert port != 4200
    script = Path(__file__).resolve().parents[1] / "infra" / "prefect-server.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_UI_API_URL", "PREFECT_API_URL")}
    (tmp_path / "home" / "prefect").mkdir(parents=True)  # a fresh home, as a newcomer's: Prefect's database there
    env.update(CPMANT_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "home" / "prefect"),
               PREFECT_PORT=str(port))
    log = tmp_path / "prefect-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(base + "/api/health", server, log)
        with urllib.request.urlopen(base + "/ui-settings", timeout=10) as r:
            settings = json.load(r)
        assert settings["api_url"] == f"{base}/api", settings
        dom = _chromium("--virtual-time-budget=15000", "--dump-dom", base + "/")
        for broken in ("Unable to connect to Prefect server", "Can't connect to Server API"):
            assert broken not in dom, broken
        assert "<title>Dashboard • Prefect Server</title>" in dom
        assert "Run a task or flow to get started" in dom  # the dashboard's answer for a store with no runs yet
        shot = tmp_path / "prefect-dashboard.png"
        _chromium("--virtual-time-budget=15000", "--window-size=1400,900", f"--screenshot={shot}", base + "/")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


# a quick validation of a micro model: few prompts and tokens; the speed and smoke gates off (not under test here)
FAST_VALIDATION = {"validation": {"batch_size": 4, "prompts": ["床前明月光", "春眠不觉晓"], "max_new_tokens": 4,
                                  "speed_repeats": 1, "latency_repeats": 1,
                                  "gates": {"smoke_pass_rate": None, "tokens_per_second": None,
                                            "first_token_ms_p95": None}},
                   "tracking": {"measure_power_secs": 1}}


@pytest.fixture(scope="module")
def validated(lifecycle, tmp_path_factory):
    """A copy of the micro lifecycle's home (the shared one stays unvalidated for the other tests) with its base and
    its 3b variant validated (champion moved where every gate passed), a second variant without aliases, and the
    report written there. Returns {"home", "page" (the report as Chromium rendered it), "tracking_uri"}."""
    import mlflow

    from flows.validate import validate_flow
    from tasks.report import build_report

    home = tmp_path_factory.mktemp("browser") / "home"
    shutil.copytree(lifecycle["home"], home)
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        validate_flow([lifecycle["pretrain"]["model_uri"], "models:/cpm-ant-tiny-3b/1"], FAST_VALIDATION,
                      promote=True)
        _second_variant(f"sqlite:///{home / 'mlflow.db'}")
        path, _, _ = build_report(out=home.parent / "report.html")
    finally:
        mp.undo()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    return {"home": home, "page": _chromium("--dump-dom", path.as_uri()),
            "tracking_uri": f"sqlite:///{home / 'mlflow.db'}"}


def _second_variant(uri: str) -> None:
    """A second variant of the base beside 3b (as int8 is in the full lifecycle: two chains from one base, the case
    the report once cut to one), registered straight in MLflow from the 3b version's files and tags."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, uri)
    mv = client.get_model_version("cpm-ant-tiny-3b", "1")
    client.create_registered_model("cpm-ant-tiny-int8")
    client.create_model_version("cpm-ant-tiny-int8", mv.source, run_id=mv.run_id, tags=mv.tags)


def test_report_labels_aliases_and_lineage_match_mlflow(validated):
    """The rendered report against MLflow itself: each validation heading names the version that run validated
    (its cpmant.model tag), each version's aliases in the lineage read as MLflow's registry has them, and the lineage
    count is the number of versions nobody descends from and of registered models."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(validated["tracking_uri"], validated["tracking_uri"])
    page = validated["page"]
    exp_id = client.get_experiment_by_name("cpmant").experiment_id

    runs = client.search_runs([exp_id], "tags.`cpmant.stage` = 'validate'")
    validated_models = [r.data.tags["cpmant.model"] for r in runs]
    assert sorted(validated_models) == ["models:/cpm-ant-tiny-3b/1", "models:/cpm-ant-tiny/1"]
    section = page[page.index('<section id="validation">'):page.index('<section id="costs">')]
    headings = re.findall(r'<h3>(?:<span class="(?:ok|fail)">(\w+)</span> )?(models:/\S+) <small>run ', section)
    assert sorted(m for _, m in headings) == sorted(validated_models)
    verdicts = {r.data.tags["cpmant.model"]: r.data.tags["cpmant.validation"].upper() for r in runs}
    assert {m: v for v, m in headings} == verdicts

    shown = {uri: set(a.split(",")) if a else set() for uri, _, a in re.findall(
        r"<code>(models:/[^<]+)</code> \((\w+)(?:, @([^)]*))?\)", page)}
    versions = client.search_model_versions(max_results=1000)
    assert set(shown) == {f"models:/{v.name}/{v.version}" for v in versions}  # every version in some chain
    for name in {v.name for v in versions}:
        for version, alias_set in _aliases_by_version(client.get_registered_model(name).aliases).items():
            assert shown[f"models:/{name}/{version}"] == alias_set, (name, version)
    assert sum(map(len, shown.values())) == sum(len(client.get_registered_model(n).aliases)
                                                for n in {v.name for v in versions})
    assert any("champion" in a for a in shown.values())  # the validation moved champion: aliases are under test

    parents = {v.tags.get("cpmant.parent") for v in versions}
    leaves = [v for v in versions if f"models:/{v.name}/{v.version}" not in parents]
    names = {v.name for v in versions}
    count = re.search(r'<p class="note lineage-count">(\d+) chains?, one per version nobody descends from, '
                      r"covering (\d+) registered models\.</p>", page)
    assert count, "no lineage count on the page"
    assert (int(count[1]), int(count[2])) == (len(leaves), len(names)) == (2, 3)  # 3b and int8 from one base
    assert len(re.findall(r"<p class=\"chain\">", page)) == len(leaves)


def _aliases_by_version(aliases: dict[str, str]) -> dict[str, set[str]]:
    """MLflow's registered-model aliases (alias -> version) as version -> the set of its aliases."""
    out: dict[str, set[str]] = {}
    for alias, version in aliases.items():
        out.setdefault(str(version), set()).add(alias)
    return out
