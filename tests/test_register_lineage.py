"""`cpmant register` takes stage and parent from the checkpoint's own metadata (a delta's delta_config.json names its
base), refuses a contradicting flag and the `champion` alias, returns the existing version for a checkpoint already
registered; `cpmant compress` of a delta is refused before any flow runs (issue 17, bad inputs 1, 2 and 5)."""

from __future__ import annotations

import pytest
import torch

from conftest import DELTA_BASE, poems_vocab
from cpmant import checkpoint as ck

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def store(tmp_path_factory, fixture_corpus):
    """Two micro bases registered as cpm-ant-tiny v1 and v2, and an unregistered LoRA delta of v1."""
    from cpmant.config import ModelConfig
    from cpmant.delta.checkpoint import save_delta
    from cpmant.delta.methods import apply_delta
    from cpmant.model import CPMAnt
    from registry.register import register_checkpoint

    tmp = tmp_path_factory.mktemp("reglineage")
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(tmp / "home"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    vocab = poems_vocab(fixture_corpus, tmp / "vocab.txt")
    cfg = ModelConfig(**DELTA_BASE)
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        dirs.append(ck.save_model_dir(tmp / f"base{seed}", CPMAnt(cfg).state_dict(), cfg, vocab,
                                      meta={"stage": "pretrain"}))
    v1 = register_checkpoint(dirs[0], "cpm-ant-tiny").uri
    v2 = register_checkpoint(dirs[1], "cpm-ant-tiny").uri
    model, _ = ck.load_pretrained(dirs[0])
    delta = save_delta(tmp / "delta", apply_delta(model, "lora"), dirs[0], base_uri=v1, task="fake")
    yield dict(tmp=tmp, base_dir=dirs[0], v1=v1, v2=v2, delta=str(delta))
    mp.undo()


def _cli(argv, capfd):
    from cpmant_cli.main import main

    rc = main(argv)
    out, err = capfd.readouterr()
    return rc, out, err


def test_register_refuses_lineage_the_checkpoint_contradicts(store, capfd):
    for argv, expect in [
        (["--stage", "delta", "--parent", store["v2"]], f"records its parent as {store['v1']}"),
        (["--stage", "pretrain"], "records stage delta"),
        (["--alias", "champion"], "cpmant promote URI --reason TEXT"),
    ]:
        rc, out, err = _cli(["register", store["delta"], "--name", "tiny-fake-lora", *argv], capfd)
        assert rc == 2 and expect in err, err
        assert "Traceback" not in out + err and err.count("error:") == 1
    from mlflow.tracking import MlflowClient

    assert not MlflowClient().search_registered_models("name = 'tiny-fake-lora'")  # nothing was registered


def test_register_takes_stage_and_parent_from_the_delta_and_never_duplicates(store, capfd):
    from mlflow.tracking import MlflowClient

    from registry.tags import PARENT, STAGE

    rc, out, err = _cli(["register", store["delta"], "--name", "tiny-fake-lora2"], capfd)
    assert rc == 0, err
    assert "registered models:/tiny-fake-lora2/1" in out
    mv = MlflowClient().get_model_version("tiny-fake-lora2", "1")
    assert mv.tags[STAGE] == "delta" and mv.tags[PARENT] == store["v1"]  # not a base, and not v2
    # the same checkpoint again (agreeing flags given): the existing version, no new one
    rc, out, err = _cli(["register", store["delta"], "--name", "tiny-fake-lora2", "--stage", "delta",
                         "--parent", store["v1"]], capfd)
    assert rc == 0 and "already registered as models:/tiny-fake-lora2/1" in out, out + err
    assert len(MlflowClient().search_model_versions("name = 'tiny-fake-lora2'")) == 1
    # and compressing that delta is refused before any flow, naming the merge
    rc, out, err = _cli(["compress", "models:/tiny-fake-lora2/1", "--recipe", "3b"], capfd)
    assert rc == 2 and "is a delta" in err and "--merge" in err, err
    assert "Traceback" not in out + err


def test_a_base_registered_again_returns_its_version(store, capfd):
    from mlflow.tracking import MlflowClient

    rc, out, err = _cli(["register", str(store["base_dir"]), "--name", "cpm-ant-tiny"], capfd)
    assert rc == 0 and f"already registered as {store['v1']}" in out, out + err
    assert len(MlflowClient().search_model_versions("name = 'cpm-ant-tiny'")) == 2
    rc, out, err = _cli(["register", str(store["base_dir"]), "--name", "cpm-ant-tiny", "--parent", store["v2"]],
                        capfd)
    assert rc == 2 and "records a pretrained base" in err, err


def test_champion_is_refused_by_every_registration(store):
    from cpmant.errors import CpmantError
    from registry.register import register_checkpoint

    with pytest.raises(CpmantError, match="cpmant promote"):
        register_checkpoint(store["base_dir"], "cpm-ant-tiny", alias="champion")
