"""Server mode: the registry through an MLflow tracking server on PostgreSQL with proxied artifacts.

One server per module, started with the real scripts (infra/postgres.sh, infra/mlflow-server.sh) on free ports,
its data in a temporary folder, torn down at the end. Skipped, with the fix, where PostgreSQL is not installed
(CPMANT_PG_BIN names another folder of its binaries; CPMANT_PG_BIN=/nonexistent forces the skip).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.flow

REPO = Path(__file__).resolve().parents[1]
CONTRACT_TAGS = ("cpmant.stage", "cpmant.parent", "cpmant.checkpoint_sha256", "cpmant.config_sha256",
                 "cpmant.data_sha256", "cpmant.git_sha")
HEALTH_DEADLINE_S = 90


def pg_bindir() -> str | None:
    """The folder holding initdb: $CPMANT_PG_BIN, else the newest /usr/lib/postgresql/*/bin, else PATH."""
    if os.environ.get("CPMANT_PG_BIN"):
        d = os.environ["CPMANT_PG_BIN"]
        return d if os.access(os.path.join(d, "initdb"), os.X_OK) else None
    found = [os.path.dirname(p) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb") if os.access(p, os.X_OK)]
    if found:
        return max(found, key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    on_path = shutil.which("initdb")
    return os.path.dirname(on_path) if on_path else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    uri: str
    artifacts: Path  # the server's --artifacts-destination
    pg_port: int
    log: Path


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server():
    bindir = pg_bindir()
    if bindir is None:
        where = (f"CPMANT_PG_BIN={os.environ['CPMANT_PG_BIN']} holds no initdb" if os.environ.get("CPMANT_PG_BIN")
                 else "no initdb under /usr/lib/postgresql/*/bin or on PATH")
        pytest.skip(f"PostgreSQL is not installed ({where}): run `bash infra/postgres.sh install` "
                    "(as root; it runs apt-get install -y postgresql)")
    # not under pytest's tmp_path: /tmp/pytest-of-root is closed (0700) to the `postgres` OS user
    base = Path(tempfile.mkdtemp(prefix="cpmant-server-"))
    base.chmod(0o755)
    pg_port, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PGHOST", "PGUSER", "PGDATABASE")}
    env.update(CPMANT_HOME=str(base / "home"), PGDATA=str(base / "pg"), PGPORT=str(pg_port), CPMANT_PG_BIN=bindir,
               MLFLOW_PORT=str(port), MLFLOW_ARTIFACTS_DESTINATION=str(base / "artifacts"),
               MLFLOW_BIN=str(Path(sys.executable).parent / "mlflow"), MLFLOW_WORKERS="2")
    pg_script, server_script = str(REPO / "infra" / "postgres.sh"), str(REPO / "infra" / "mlflow-server.sh")
    log = base / "mlflow-server.log"
    proc = None
    try:
        r = subprocess.run(["bash", pg_script, "start"], env=env, capture_output=True, text=True, timeout=180,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            pytest.fail(f"infra/postgres.sh failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", server_script], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + HEALTH_DEADLINE_S
        while not _healthy(uri):
            if proc.poll() is not None:
                pytest.fail(f"the MLflow server exited (rc {proc.returncode}):\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the MLflow server did not answer /health in {HEALTH_DEADLINE_S} s:\n"
                            f"{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield Server(uri, base / "artifacts", pg_port, log)
    finally:
        if proc is not None:  # the whole group: uvicorn's workers too
            _kill_group(proc)
        subprocess.run(["bash", pg_script, "stop"], env=env, capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # the uvicorn workers may outlive the group leader for a moment
            time.sleep(0.5)
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def at_server(server, monkeypatch):
    """MLFLOW_TRACKING_URI points at the module's server for one test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    yield server
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _pg_rows(server: Server, name: str) -> list[tuple[str, int]]:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=server.pg_port, user="mlflow", password="mlflow", dbname="mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute("select name, version from model_versions where name = %s order by version", (name,))
            return cur.fetchall()
    finally:
        conn.close()


def test_register_and_pull_through_server(at_server, micro_pretrain_cfg, tmp_path):
    import mlflow
    import yaml
    from mlflow.tracking import MlflowClient

    from cpmant.checkpoint import WEIGHTS_FILE, sha256_file
    from cpmant.training.loop import pretrain
    from registry.register import register_checkpoint

    model_dir = pretrain(micro_pretrain_cfg(), progress=False).model_dir
    name = "cpm-ant-micro-server"
    reg = register_checkpoint(model_dir, name)
    assert (reg.version, reg.alias, reg.uri) == (1, "candidate", f"models:/{name}/1")

    client = MlflowClient(at_server.uri, registry_uri=at_server.uri)
    mv = client.get_model_version(name, "1")
    assert set(CONTRACT_TAGS) <= set(mv.tags)
    assert (mv.tags["cpmant.stage"], mv.tags["cpmant.parent"]) == ("pretrain", "")
    want = mv.tags["cpmant.checkpoint_sha256"]
    assert want == sha256_file(Path(model_dir) / WEIGHTS_FILE)
    assert client.get_model_version_by_alias(name, "candidate").version == "1"
    # the run's artifacts are proxied by the server, not written by the client
    assert client.get_run(reg.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")

    pulled = Path(mlflow.artifacts.download_artifacts(artifact_uri=reg.uri, dst_path=str(tmp_path / "pulled")))
    mlmodel = yaml.safe_load((pulled / "MLmodel").read_text())
    ck = pulled / mlmodel["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
    assert sha256_file(ck / WEIGHTS_FILE) == want

    stored = list(at_server.artifacts.rglob(WEIGHTS_FILE))
    assert stored, f"no {WEIGHTS_FILE} under the server's artifact destination {at_server.artifacts}"
    assert all(sha256_file(p) == want for p in stored)
    assert _pg_rows(at_server, name) == [(name, 1)]

    from registry import find_version  # reuse works through the server too

    assert find_version(name, {"cpmant.checkpoint_sha256": want, "cpmant.stage": "pretrain"}) == reg.uri
    assert find_version(name, {"cpmant.checkpoint_sha256": "0" * 64}) is None
    assert find_version("cpm-ant-no-such-model", {}) is None


HELPER = """
import sys
from registry.register import register_checkpoint
model_dir, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("READY", flush=True)
sys.stdin.readline()  # GO: both processes start registering at the same moment
for _ in range(n):
    print("VERSION", register_checkpoint(model_dir, name).version, flush=True)
"""


def test_concurrent_registration_loses_nothing(at_server, micro_pretrain_cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    from cpmant.training.loop import pretrain

    model_dir = pretrain(micro_pretrain_cfg(), progress=False).model_dir
    name, per_process = "cpm-ant-micro-race", 3
    helper = tmp_path / "register_many.py"
    helper.write_text(HELPER)
    procs = [subprocess.Popen([sys.executable, str(helper), str(model_dir), name, str(per_process)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
    for p in procs:
        p.stdin.write("GO\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"a registering process failed:\n{out}\n{err[-4000:]}"
    got = sorted(int(line.split()[1]) for out, _ in outs for line in out.splitlines() if line.startswith("VERSION"))
    assert got == [1, 2, 3, 4, 5, 6]

    client = MlflowClient(at_server.uri, registry_uri=at_server.uri)
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == got
    assert all(set(CONTRACT_TAGS) <= set(v.tags) for v in versions)
    assert int(client.get_model_version_by_alias(name, "candidate").version) in got
    assert _pg_rows(at_server, name) == [(name, v) for v in got]
