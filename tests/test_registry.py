"""The registry on the embedded SQLite store: the three-line pull, sha256 refusal of tampered or truncated files,
the pyfunc model in a fresh process, HTTP serving, lineage, aliases, concurrent registration, NaN-safe logging."""

from __future__ import annotations

import contextlib
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
    from registry.pulling import checkpoint_dir, download

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


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_serve_answers_invocations_and_stops_its_whole_group(store):
    """`cpmant serve --port 0` prints the port it really listens on; killing `cpmant serve` by its PID (not its
    group) stops MLflow's server processes too."""
    import threading

    import psutil

    proc = subprocess.Popen([CLI, "serve", "models:/cpm-ant-tiny/1", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    children = []
    try:
        deadline, port, ok = time.time() + 180, None, False
        while time.time() < deadline and proc.poll() is None and not ok:
            if port is None:
                hit = [ln for ln in list(lines) if ln.startswith("serving ")]
                if hit:
                    assert "models:/cpm-ant-tiny/1 on http://127.0.0.1:" in hit[0], hit[0]
                    port = int(hit[0].split("http://127.0.0.1:")[1].split("/")[0])
                    assert port != 0
                time.sleep(0.2)
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    ok = r.status == 200
            except OSError:
                time.sleep(0.5)
        assert ok, "".join(lines)[-4000:] or "server did not answer /ping"
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [["床前明月光"], ["春眠不觉晓"]]},
                           "params": {"max_new_tokens": 4}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            preds = json.loads(r.read())["predictions"]
        assert len(preds) == 2 and all(isinstance(p, str) and p for p in preds)

        children = _descendants(proc.pid)
        assert children, "MLflow's server runs in child processes"
        os.kill(proc.pid, signal.SIGTERM)  # the PID only, as `kill PID` would
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(children, timeout=30)
        alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left running after `cpmant serve` was killed: {alive}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for c in children:
            with contextlib.suppress(Exception):
                c.kill()
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
    from tasks.metering import AsyncMetricLogger

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


# ---- issue 7: one name per thing, reuse, integrity, shared state, serving checks, clear errors ----------------
def test_registry_submodules_are_not_hidden_by_functions():
    import importlib
    import pkgutil
    import types

    import registry

    for m in pkgutil.iter_modules(registry.__path__):
        importlib.import_module(f"registry.{m.name}")
        assert isinstance(getattr(registry, m.name), types.ModuleType), f"registry.{m.name} is not the module"
    from registry import lineage, pull  # the README's three lines still work

    assert callable(pull) and callable(lineage)
    assert not isinstance(pull, types.ModuleType) and not isinstance(lineage, types.ModuleType)


def test_find_version_returns_the_newest_matching_version(store):
    """Reuse: the newest version whose tags hold every key of `match`; None for no model or no match."""
    from mlflow.tracking import MlflowClient

    from registry import find_version
    from registry.tags import INPUTS_SHA256, STAGE

    name = "cpm-ant-tiny-reuse"
    assert find_version(name, {INPUTS_SHA256: "a"}) is None  # no such model
    client = MlflowClient()
    base = client.get_model_version("cpm-ant-tiny", "1")
    client.create_registered_model(name)
    for inputs in ("a", "a", "b"):  # versions 1, 2, 3 (tags only: what find_version reads)
        client.create_model_version(name, base.source, run_id=base.run_id,
                                    tags={INPUTS_SHA256: inputs, STAGE: "compress"})
    assert find_version(name, {INPUTS_SHA256: "a"}) == f"models:/{name}/2"
    assert find_version(name, {INPUTS_SHA256: "b", STAGE: "compress"}) == f"models:/{name}/3"
    assert find_version(name, {INPUTS_SHA256: "b", STAGE: "pretrain"}) is None
    assert find_version(name, {INPUTS_SHA256: "c"}) is None
    assert find_version(name, {}) == f"models:/{name}/3"
    assert find_version("", {}) is None and find_version("a/b", {}) is None
    assert find_version("cpm-ant-tiny", {"cpmant.checkpoint_sha256": base.tags["cpmant.checkpoint_sha256"]}) \
        == "models:/cpm-ant-tiny/1"


def test_logged_model_named_after_registered_model_with_description(store):
    import mlflow
    from mlflow.tracking import MlflowClient

    from registry.register import logged_model_name, register_checkpoint

    text = "0.5x recipe of models:/cpm-ant-tiny/1"
    with mlflow.start_run() as run:
        for step in (0, 6):
            mlflow.log_metric("valid_loss", 9.0 - step, step=step)
        reg = register_checkpoint(store["model_dir"], "cpm-ant-tiny-0.5x", description=text, step=6)
    mv = MlflowClient().get_model_version(reg.name, str(reg.version))
    assert mv.description == text
    logged = mlflow.get_logged_model(mv.model_id or mv.source.removeprefix("models:/"))
    assert logged.name == logged_model_name(reg.name) == "cpm-ant-tiny-0-5x"  # not `model`; '.' is refused there
    assert reg.run_id == run.info.run_id
    assert {(m.key, m.step, m.value) for m in logged.metrics} >= {("valid_loss", 6, 3.0)}  # the final value


def _all_runs() -> int:
    import mlflow

    return len(mlflow.search_runs(search_all_experiments=True, output_format="list"))


def test_register_refuses_damaged_folder_and_bad_names_before_any_run(store, tmp_path):
    from cpmant.errors import CpmantError
    from registry import find_version
    from registry.register import register_checkpoint

    bad = tmp_path / "truncated"
    shutil.copytree(store["model_dir"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _all_runs()
    with pytest.raises(CpmantError) as e:
        register_checkpoint(bad, "cpm-ant-tiny-truncated")
    assert str(bad) in str(e.value) or "model.safetensors" in str(e.value)
    for name in ("", " ", "a/b", "a:b", "x@y", "it's"):
        with pytest.raises(CpmantError, match="name"):
            register_checkpoint(store["model_dir"], name)
    with pytest.raises(CpmantError, match="not a folder|does not exist"):
        register_checkpoint(weights, "cpm-ant-tiny-file")
    assert _all_runs() == before, "a refused registration left a run behind"
    assert find_version("cpm-ant-tiny-truncated", {}) is None


INIT_HELPER = """
import sys
from registry.tracking import setup_tracking
import mlflow
print("READY", flush=True)
sys.stdin.readline()
setup_tracking()
from mlflow.tracking import MlflowClient
MlflowClient().search_registered_models(max_results=1)
print("OK", flush=True)
"""


def test_fresh_store_initialised_by_concurrent_processes(tmp_path):
    """Two processes opening a fresh SQLite store at once: no schema race ("table ... already exists")."""
    helper = tmp_path / "init.py"
    helper.write_text(INIT_HELPER)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(CPMANT_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))  # this checkout's registry
    procs = [subprocess.Popen([sys.executable, str(helper)], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
    for p in procs:  # all at once
        p.stdin.write("GO\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "OK" in out, err[-3000:]


def test_new_store_version_1_never_gets_an_old_cached_folder(store, micro_pretrain_cfg, tmp_path, monkeypatch):
    """Deleting mlflow.db renumbers from 1: the load cache is keyed by what a version is (its files' sha256 tags,
    run and logged model), so version 1 of the new store (other weights) is not answered from the old one's."""
    import mlflow

    from cpmant.checkpoint import sha256_file
    from cpmant.training.loop import pretrain
    from registry.pulling import checkpoint_dir
    from registry.register import register_checkpoint

    other = pretrain(micro_pretrain_cfg(max_steps=2, eval_interval=2, save_interval=2), progress=False).model_dir
    first, second = (sha256_file(Path(d) / "model.safetensors") for d in (store["model_dir"], other))
    assert first != second
    home = tmp_path / "home"
    monkeypatch.setenv("CPMANT_HOME", str(home))
    try:
        for folder, want, uri in ((store["model_dir"], first, f"sqlite:///{home}/mlflow.db"),
                                  (other, second, f"sqlite:///{home}/./mlflow.db")):  # the same file, a fresh store
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # (spelled anew: MLflow caches a store per URI)
            reg = register_checkpoint(folder, "cpm-ant-tiny", alias=None)
            assert reg.uri == "models:/cpm-ant-tiny/1"
            assert sha256_file(checkpoint_dir(reg.uri) / "model.safetensors") == want
            (home / "mlflow.db").unlink()
    finally:
        mlflow.set_tracking_uri(None)
    cached = sorted((home / "cache" / "models" / "cpm-ant-tiny").glob("1-*"))
    assert len(cached) == 2 and {json.loads((c / "cpmant-cache-key.json").read_text())["checkpoint_sha256"]
                                 for c in cached} == {first, second}


def test_lineage_and_pull_answer_bad_input_clearly(store, tmp_path):
    from cpmant.errors import CpmantError
    from registry import download, lineage
    from registry.ancestry import format_lineage

    for uri in ("", "foo", "models:/", "models:/cpm-ant-tiny", "models:/cpm-ant-tiny/99", "models:/nope@champion"):
        with pytest.raises(CpmantError):
            lineage(uri)
    with pytest.raises(CpmantError):
        format_lineage([])
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(CpmantError, match="is a file"):
        download("models:/cpm-ant-tiny/1", a_file)
    with pytest.raises(CpmantError, match="is a file"):
        download("models:/cpm-ant-tiny/1", a_file / "sub")


def test_internal_downloads_print_no_progress_bars(store, tmp_path, capfd):
    from registry import download

    capfd.readouterr()
    download("models:/cpm-ant-tiny/1", tmp_path / "quiet")
    err = capfd.readouterr().err
    assert "Downloading artifacts" not in err and "%|" not in err, err


def test_aliases_use_the_contract_names(store):
    from cpmant.errors import CpmantError
    from registry import get_alias, promote, set_alias
    from registry.tags import ALIAS_CHAMPION

    assert promote("models:/cpm-ant-tiny/1") == 1 and get_alias("cpm-ant-tiny", ALIAS_CHAMPION) == 1
    for bad in ("", "a/b", "latest", "v3"):
        with pytest.raises(CpmantError, match="alias"):
            set_alias("models:/cpm-ant-tiny/1", bad)


class _NoServer:
    """Stands in for subprocess.Popen as serve's `launch`: records the command, or fails if a server would start."""

    def __init__(self, rc: int | None = 0):
        self.rc, self.cmds = rc, []

    def __call__(self, cmd, **kw):
        if self.rc is None:
            raise AssertionError(f"a server was started: {cmd}")
        self.cmds.append(cmd)
        return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({self.rc})"], start_new_session=True)


def test_serve_refuses_bad_arguments_before_serving(store, tmp_path):
    import registry.serve as srv
    from cpmant.errors import CpmantError

    never = _NoServer(rc=None)
    said: list[str] = []
    uri = "models:/cpm-ant-tiny/1"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(CpmantError, match="already in use"):
            srv.serve(uri, port=busy.getsockname()[1], say=said.append, launch=never)
    cases = [(dict(port=99999), "not a TCP port"), (dict(port=-1), "not a TCP port"),
             (dict(workers=0), "positive"), (dict(host="no-such-host.invalid"), "cannot listen")]
    for kw, match in cases:
        with pytest.raises(CpmantError, match=match):
            srv.serve(uri, **{"port": 0, **kw}, say=said.append, launch=never)
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for bad, match in (("foo", "not an existing folder"), ("runs:/abc/model", "runs: URI"), ("", "no model"),
                       (str(a_file), "is a file"), (str(tmp_path), "neither"),
                       ("models:/nope/1", "not in the registry")):
        with pytest.raises(CpmantError, match=match):
            srv.serve(bad, port=0, say=said.append, launch=never)
    assert said == []


def test_serve_refuses_a_bit_flipped_stored_model(store):
    import registry.serve as srv
    from cpmant.errors import CpmantError

    stored = _stored_checkpoint_file("cpm-ant-tiny", 1, "model.safetensors")
    original = stored.read_bytes()
    for c in (store["home"] / "cache" / "models" / "cpm-ant-tiny").glob("1-*"):
        shutil.rmtree(c)  # not a copy verified earlier
    try:
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(CpmantError, match="does not match its registered sha256"):
            srv.serve("models:/cpm-ant-tiny/1", port=0, say=print, launch=_NoServer(rc=None))
    finally:
        stored.write_bytes(original)


def test_serve_picks_a_free_port_warns_for_public_host_and_serves_verified_folders(store, tmp_path):
    import registry.serve as srv
    from cpmant.errors import CpmantError

    fake = _NoServer(rc=0)
    said: list[str] = []
    out = srv.serve("models:/cpm-ant-tiny@candidate", host="0.0.0.0", port=0, workers=2, say=said.append,
                    launch=fake)
    assert said[0].startswith("warning: --host 0.0.0.0") and len(said) == 2
    port = int(said[1].split("http://0.0.0.0:")[1].split("/")[0])
    cmd = fake.cmds[-1]
    assert port != 0 and cmd[cmd.index("--port") + 1] == str(port) and cmd[cmd.index("--workers") + 1] == "2"
    assert said[1].startswith("serving models:/cpm-ant-tiny/1 on ") and "stopped" in out
    served = Path(cmd[cmd.index("serve") + 2])
    assert (served / "MLmodel").is_file() and served.is_relative_to(store["home"] / "cache")  # the verified copy

    said.clear()
    srv.serve(str(store["model_dir"]), port=0, say=said.append, launch=fake)  # a checkpoint folder, wrapped
    assert len(said) == 1 and said[0].startswith(f"serving {store['model_dir']} on http://127.0.0.1:")
    wrapped = Path(fake.cmds[-1][fake.cmds[-1].index("serve") + 2])
    assert not wrapped.exists()  # the temporary wrapper is removed afterwards

    bad = tmp_path / "truncated"
    shutil.copytree(store["model_dir"], bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:100])
    n = len(fake.cmds)
    with pytest.raises(CpmantError):
        srv.serve(str(bad), port=0, say=said.append, launch=fake)
    assert len(fake.cmds) == n

    with pytest.raises(CpmantError, match="exited with code 3"):
        srv.serve("models:/cpm-ant-tiny/1", port=0, say=said.append, launch=_NoServer(rc=3))
