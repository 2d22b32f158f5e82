"""Registered deltas: pulled in a fresh process they compose with their base (fetched and verified once through the
cache), `mlflow.pyfunc.load_model` and the scoring server compose too, `merge=True` gives a plain checkpoint with
the same logits, and a delta never loads onto a base other than the one it names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import DELTA_BASE, poems_vocab
from cpmant import checkpoint as ck
from cpmant.errors import CpmantError

pytestmark = pytest.mark.flow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Micro models: one intra-op thread is faster than two fighting the other tests for 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs():
    L, P = 10, 4
    inp = torch.arange(20, 20 + L)[None]
    inp[:, :P] = torch.arange(P)
    seg = torch.ones(1, L, dtype=torch.long)
    seg[:, :P] = 0
    return dict(input=inp, length=torch.tensor([L]), context=torch.ones(1, L, dtype=torch.long),
                position=torch.arange(L)[None], segment=seg, span=torch.zeros(1, L, dtype=torch.long))


@pytest.fixture(scope="module")
def store(tmp_path_factory, fixture_corpus):
    """A store with a micro base `cpm-ant-tiny` (v1) and a LoRA delta of it registered as `cpm-ant-tiny-fake-lora`
    (stage delta, parent the base); a second local base folder with the same shapes and other weights."""
    from cpmant.config import ModelConfig
    from cpmant.delta.checkpoint import save_delta
    from cpmant.delta.methods import apply_delta
    from cpmant.model import CPMAnt
    from registry.register import register_checkpoint

    tmp = tmp_path_factory.mktemp("deltareg")
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(tmp / "home"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    vocab = poems_vocab(fixture_corpus, tmp / "vocab.txt")
    cfg = ModelConfig(**DELTA_BASE)
    torch.manual_seed(0)
    base_dir = ck.save_model_dir(tmp / "base", CPMAnt(cfg).state_dict(), cfg, vocab)
    base_uri = register_checkpoint(base_dir, "cpm-ant-tiny").uri
    torch.manual_seed(1)  # same shapes, other weights; not registered
    other_dir = ck.save_model_dir(tmp / "other", CPMAnt(cfg).state_dict(), cfg, vocab)
    model, _ = ck.load_pretrained(base_dir)
    h = apply_delta(model, "lora")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in h.trainable():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    want = model(**_inputs())
    delta_dir = save_delta(tmp / "delta", h, base_dir, base_uri=base_uri, task="fake")
    reg = register_checkpoint(delta_dir, "cpm-ant-tiny-fake-lora", stage="delta", parent=base_uri)
    yield dict(tmp=tmp, base_dir=base_dir, base_uri=base_uri, other_dir=other_dir, delta_dir=delta_dir,
               delta_uri=reg.uri, want=want, handle=h)
    mp.undo()


def test_registered_delta_holds_only_the_delta_and_names_its_parent(store):
    from mlflow.tracking import MlflowClient

    from registry.tags import CHECKPOINT_SHA256, PARENT, STAGE

    mv = MlflowClient().get_model_version("cpm-ant-tiny-fake-lora", "1")
    assert mv.tags[STAGE] == "delta" and mv.tags[PARENT] == store["base_uri"]
    assert mv.tags[CHECKPOINT_SHA256] == ck.sha256_file(store["delta_dir"] / "delta.safetensors")
    base_bytes = (store["base_dir"] / "model.safetensors").stat().st_size
    assert (store["delta_dir"] / "delta.safetensors").stat().st_size < base_bytes / 4


def test_fresh_process_pulls_composed_and_pyfunc_loads(store, tmp_path):
    torch.save(_inputs(), tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import json, torch, mlflow
        from registry.pulling import load_model
        x = torch.load({str(tmp_path / 'inputs.pt')!r})
        m, tok = load_model({store['delta_uri']!r})
        out = {{"composed": m(**x).tolist()}}
        py = mlflow.pyfunc.load_model({store['delta_uri']!r})
        out["pyfunc"] = py.predict(["床前明月光"], params={{"max_new_tokens": 2}})
        # the scoring app `cpmant serve` runs (MLflow's), on the composed delta
        from fastapi.testclient import TestClient
        from mlflow.pyfunc import scoring_server
        r = TestClient(scoring_server.init(py)).post(
            "/invocations", headers={{"Content-Type": "application/json"}},
            content=json.dumps({{"inputs": ["床前明月光"], "params": {{"max_new_tokens": 2}}}}))
        out["served"] = [r.status_code, r.json().get("predictions")]
        print("RESULT" + json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    torch.testing.assert_close(torch.tensor(out["composed"]), store["want"], atol=1e-5, rtol=1e-5)
    assert isinstance(out["pyfunc"], list) and len(out["pyfunc"]) == 1 and isinstance(out["pyfunc"][0], str)
    assert out["served"] == [200, out["pyfunc"]]  # served over HTTP: the same continuation as predict
    # the base was fetched once, into the shared cache that all its deltas use
    cached = [c for c in (store["tmp"] / "home" / "cache" / "models" / "cpm-ant-tiny").iterdir() if c.is_dir()]
    assert len(cached) == 1


def test_merge_gives_a_plain_checkpoint_with_the_same_logits(store, tmp_path):
    from registry.pulling import download, pull

    x, want = _inputs(), store["want"]
    p = pull(store["delta_uri"], merge=True)
    assert type(p.model).__name__ == "CPMAnt" and not any(".lora." in k for k in p.model.state_dict())
    assert (p.path / "model.safetensors").is_file() and not (p.path / "delta.safetensors").exists()
    torch.testing.assert_close(p.model(**x), want, atol=2e-4, rtol=1e-4)
    assert isinstance(p.generate("床前明月光", max_new_tokens=2), str)
    d = download(store["delta_uri"], tmp_path / "merged", merge=True)
    torch.testing.assert_close(ck.load_pretrained(d, verify=True)[0](**x), want, atol=2e-4, rtol=1e-4)
    assert ck.read_meta(d)["merged_from"] == store["delta_uri"]
    plain = download(store["delta_uri"], tmp_path / "delta")  # without merge: the delta folder as registered
    assert sorted(f.name for f in plain.iterdir()) == sorted(f.name for f in store["delta_dir"].iterdir())


def test_delta_on_another_or_missing_base_is_refused(store, tmp_path):
    from cpmant.delta.checkpoint import save_delta
    from registry.pulling import load_model

    # trained on another base but naming cpm-ant-tiny: the sha256s differ, it never loads silently
    wrong = save_delta(tmp_path / "wrong", store["handle"], store["other_dir"], base_uri=store["base_uri"])
    with pytest.raises(CpmantError, match="never loads onto another base"):
        load_model(wrong)
    gone = save_delta(tmp_path / "gone", store["handle"], store["base_dir"], base_uri="models:/no-such-base/3")
    with pytest.raises(CpmantError, match="no-such-base/3.*cannot be loaded") as e:
        load_model(gone)
    assert "retrain" in e.value.fix
    # serving checks the base before any server starts
    from registry.serve import serve

    def never(*a, **k):
        raise AssertionError("the server must not start")

    with pytest.raises(CpmantError, match="never loads onto another base"):
        serve(str(wrong), port=0, launch=never)
    lines = []

    class Done:
        pid = os.getpid()

        def wait(self):
            return 0

    import registry.serve as rs

    orig = rs.stop_group
    rs.stop_group = lambda proc, grace_s=0: None
    try:
        serve(store["delta_uri"], port=0, launch=lambda *a, **k: Done(), say=lines.append)
    finally:
        rs.stop_group = orig
    assert lines and lines[-1].startswith("serving models:/cpm-ant-tiny-fake-lora/1 on http://127.0.0.1:")
