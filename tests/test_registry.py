"""The registry on the embedded SQLite store: the three-line pull, sha256 refusal of tampered or truncated files,
the pyfunc model in a fresh process, HTTP serving, lineage, aliases, concurrent registration, NaN-safe logging."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import registered_micro_model

pytestmark = pytest.mark.flow
REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("cpmant"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, fixture_corpus):
    """A store with cpm-ant-tiny version 1 registered from a freshly trained micro checkpoint."""
    home = tmp_path_factory.mktemp("registry_home")
    mp, model_dir, reg = registered_micro_model(home, fixture_corpus)
    assert reg.uri == "models:/cpm-ant-tiny/1"
    yield {"home": home, "model_dir": model_dir, "uri": f"sqlite:///{home / 'mlflow.db'}"}
    mp.undo()
    import mlflow

    mlflow.set_tracking_uri(None)


def _stored_checkpoint_file(name: str, version: int, fname: str) -> Path:
    """The artifact store's copy of a checkpoint file (what a tamperer would change)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mv = MlflowClient().get_model_version(name, str(version))
    model_id = mv.model_id or mv.source.removeprefix("models:/")
    root = Path(mlflow.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    hits = [p for p in root.rglob(fname) if "checkpoint" in str(p.parent)] or list(root.rglob(fname))
    assert len(hits) == 1, hits
    return hits[0]


def test_three_line_pull_and_generate(store):
    from registry import promote, pull

    promote("models:/cpm-ant-tiny/1")
    model = pull("models:/cpm-ant-tiny@champion")
    out = model.generate("床前明月光", max_new_tokens=6)
    assert isinstance(out, str) and out
    assert model.generate(["春眠不觉晓", "白日依山尽"], max_new_tokens=4) == [
        model.generate("春眠不觉晓", max_new_tokens=4), model.generate("白日依山尽", max_new_tokens=4)]


def test_cli_pull_verifies_and_refuses_tampered_or_truncated(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from cpmant.checkpoint import sha256_file
    from cpmant.errors import CpmantError
    from registry.pull import checkpoint_dir, download

    run = lambda *a: subprocess.run([CLI, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    p = run("pull", "models:/cpm-ant-tiny/1", "--to", str(tmp_path / "good"))
    assert p.returncode == 0, p.stderr
    tags = MlflowClient().get_model_version("cpm-ant-tiny", "1").tags
    files = {f.name for f in (tmp_path / "good").iterdir()}
    assert files == {"model.safetensors", "config.json", "vocab.txt", "cpmant_meta.json", "training_config.yaml"}
    for f in files:
        assert tags[f"cpmant.file_sha256.{f}"] == sha256_file(tmp_path / "good" / f)
    assert run("pull", "models:/cpm-ant-tiny/1", "--to", str(tmp_path / "good")).returncode == 2  # not empty

    stored = _stored_checkpoint_file("cpm-ant-tiny", 1, "model.safetensors")
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one flipped bit
        p = run("pull", "models:/cpm-ant-tiny/1", "--to", str(tmp_path / "tampered"))
        assert p.returncode == 2 and "does not match its registered sha256" in p.stderr, p.stderr
        stored.write_bytes(original[: len(original) // 2])  # truncated
        with pytest.raises(CpmantError, match="model.safetensors does not match"):
            download("models:/cpm-ant-tiny/1", tmp_path / "truncated")
        cache_root = store["home"] / "cache" / "models" / "cpm-ant-tiny"
        for c in cache_root.glob("1-*"):
            shutil.rmtree(c)  # an earlier, verified download would be used as is
        with pytest.raises(CpmantError, match="does not match"):
            checkpoint_dir("models:/cpm-ant-tiny/1")  # the load path refuses it too (and caches nothing bad)
        assert not list(cache_root.glob("1-*"))
    finally:
        stored.write_bytes(original)
    assert download("models:/cpm-ant-tiny/1", tmp_path / "restored").is_dir()
    # the local cache is checked too: a cached file changed after its verification is refused on the next load
    cached = checkpoint_dir("models:/cpm-ant-tiny/1")
    with open(cached / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("extra\n")
    with pytest.raises(CpmantError, match="vocab.txt does not match"):
        checkpoint_dir("models:/cpm-ant-tiny/1")
    assert checkpoint_dir("models:/cpm-ant-tiny/1").is_dir()  # the bad copy was dropped; a fresh one is fetched


def test_pyfunc_in_a_fresh_process(store):
    code = textwrap.dedent("""
        import json, mlflow
        m = mlflow.pyfunc.load_model("models:/cpm-ant-tiny/1")
        out = m.predict(["床前明月光"], params={"max_new_tokens": 5})
        print(json.dumps({"out": list(out), "sig": str(m.metadata.signature)}))
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=store["home"])
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(res["out"]) == 1 and isinstance(res["out"][0], str) and res["out"][0]
    for param in ("max_new_tokens", "temperature", "top_p", "num_beams"):
        assert param in res["sig"]

    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    import mlflow

    mv = MlflowClient().get_model_version("cpm-ant-tiny", "1")
    meta = Model.load(mlflow.artifacts.download_artifacts(f"models:/cpm-ant-tiny/1/MLmodel"))
    assert "python_model.pkl" not in json.dumps(meta.to_dict())  # models-from-code: no pickled object
    assert meta.saved_input_example_info is not None and mv.run_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_invocations(store):
    port = _free_port()
    proc = subprocess.Popen([CLI, "serve", "models:/cpm-ant-tiny/1", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, ok = time.time() + 180, False
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    ok = r.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        assert ok, proc.stdout.read() if proc.poll() is not None else "server did not answer /ping"
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [["床前明月光"], ["春眠不觉晓"]]},
                           "params": {"max_new_tokens": 4}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            preds = json.loads(r.read())["predictions"]
        assert len(preds) == 2 and all(isinstance(p, str) and p for p in preds)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_lineage_and_aliases(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from registry import get_alias, lineage, set_alias
    from registry.register import register_checkpoint

    child = register_checkpoint(store["model_dir"], "cpm-ant-tiny-demo", stage="compress",
                                parent="models:/cpm-ant-tiny/1")
    chain = lineage(child.uri)
    assert [c["uri"] for c in chain] == ["models:/cpm-ant-tiny-demo/1", "models:/cpm-ant-tiny/1"]
    assert chain[0]["stage"] == "compress" and chain[1]["stage"] == "pretrain" and chain[1]["parent"] == ""
    base_tags = MlflowClient().get_model_version("cpm-ant-tiny", "1").tags
    p = subprocess.run([CLI, "lineage", child.uri], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "models:/cpm-ant-tiny-demo/1" in p.stdout and "models:/cpm-ant-tiny/1" in p.stdout
    assert base_tags["cpmant.data_sha256"] in p.stdout and base_tags["cpmant.git_sha"][:12] in p.stdout
    tag = MlflowClient().get_model_version("cpm-ant-tiny-demo", "1").tags["cpmant.lineage"]
    assert tag.startswith("models:/cpm-ant-tiny-demo/1 <- models:/cpm-ant-tiny/1 <- data:")

    # aliases move; stages are never used
    second = register_checkpoint(store["model_dir"], "cpm-ant-tiny-demo", stage="compress",
                                 parent="models:/cpm-ant-tiny/1")
    assert get_alias("cpm-ant-tiny-demo", "candidate") == 2
    set_alias("models:/cpm-ant-tiny-demo/1", "champion")
    set_alias(second.uri, "champion")
    assert get_alias("cpm-ant-tiny-demo", "champion") == 2
    assert all(v.current_stage in (None, "None") for v in
               MlflowClient().search_model_versions("name='cpm-ant-tiny-demo'"))


def test_concurrent_registration_gets_distinct_versions(store, tmp_path):
    script = tmp_path / "reg.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from registry.register import register_checkpoint
        for _ in range(3):
            print(register_checkpoint({str(store['model_dir'])!r}, "cpm-ant-tiny-race").version, flush=True)
    """))
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    versions = sorted(int(v) for out, _ in outs for v in out.split())
    assert versions == [1, 2, 3, 4, 5, 6]
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient().search_model_versions("name='cpm-ant-tiny-race'")) == 6


def test_nan_metric_at_step_does_not_break_registration(store):
    import mlflow

    from registry.register import register_checkpoint
    from registry.tracking import setup_tracking
    from tasks.tracking import AsyncMetricLogger

    setup_tracking()
    with mlflow.start_run() as run:
        logger = AsyncMetricLogger(run.info.run_id, flush_steps=1)
        logger.log(0, {"loss": float("nan"), "valid_loss": 3.0})
        logger.log(0, {"valid_loss": 3.0})  # the same (key, step) again: not re-sent
        logger.close()
        reg = register_checkpoint(store["model_dir"], "cpm-ant-tiny-nan")
    hist = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "valid_loss")
    assert [h.step for h in hist] == [0] and reg.version == 1
    assert mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "loss") == []
