"""Compression pieces the core tests do not cover: distillation lowers the student's held-out loss, recipes
(published ladder, user YAML with QAT), the bmcook backend's clear refusal without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from cpmant.compress.config import CompressConfig
from cpmant.compress.recipe import RECIPES, DistillConfig, Recipe, get_recipes
from cpmant.config import get_preset
from cpmant.configio import build_config
from cpmant.errors import CpmantError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def parent(tmp_path_factory, fixture_corpus):
    from conftest import MICRO_MODEL
    from cpmant.training.config import PretrainConfig
    from cpmant.training.loop import pretrain

    out = tmp_path_factory.mktemp("parent")
    cfg = PretrainConfig(preset="tiny", model_overrides={**MICRO_MODEL, "num_layers": 4, "num_heads": 4},
                         corpus=str(fixture_corpus), vocab_size=600, seq_len=64, micro_batch_size=8, max_steps=40,
                         warmup_steps=4, lr=0.05, eval_interval=40, eval_rows=8, save_interval=40,
                         output_dir=str(out), encode_workers=1, min_piece_tokens=4, num_threads=1)
    return pretrain(cfg, progress=False).model_dir


def test_ladder_recipes_give_the_published_shapes_on_10b():
    base = get_preset("10b")
    published = {"7b": (37, 32, 32, 10240), "3b": (37, 32, 20, 3735), "1b": (25, 21, 16, 700),
                 "300m": (25, 21, 4, 350)}
    for name, shape in published.items():
        t = RECIPES[name].target_shape(base)
        assert (t["att_layers"], t["ffn_layers"], t["num_heads"], t["dim_ff"]) == shape
    assert [r.name for r in get_recipes("all")] == ["7b", "3b", "1b", "300m"]
    assert RECIPES["300m"].published_loss_increase == pytest.approx(0.239, abs=1e-3)


def test_recipe_errors(tmp_path):
    with pytest.raises(CpmantError, match="unknown recipe 'huge'"):
        get_recipes("huge")
    with pytest.raises(CpmantError, match="qat needs methods with distill before quantize"):
        build_config(Recipe, None, {"name": "x", "methods": ["quantize", "distill"], "qat": True})
    bad = tmp_path / "r.yaml"
    bad.write_text("name: r\nheads_keep: 1.5\n")
    with pytest.raises(CpmantError, match="heads_keep"):
        get_recipes(str(bad))


def test_distillation_lowers_the_students_loss(parent, fixture_corpus, tmp_path):
    from cpmant.checkpoint import load_pretrained
    from cpmant.compress.distill import distill
    from cpmant.compress.importance import lm_loss
    from cpmant.compress.pipeline import _streams, load_data
    from cpmant.compress.prune import prune

    teacher, _ = load_pretrained(parent)
    data = load_data(CompressConfig(corpus=str(fixture_corpus), valid_fraction=0.25), parent / "vocab.txt",
                     progress=False)
    train_s, imp_s, eval_s = _streams(teacher, data, 64, 0)
    held = [eval_s.batch(range(i, i + 4), shuffle=False) for i in range(0, 8, 4)]
    imp = [imp_s.batch(range(0, 8), shuffle=False)]
    student, rep = prune(copy.deepcopy(teacher), RECIPES["1b"].target_shape(teacher.config), imp)
    before = lm_loss(student, held)
    r = distill(student, teacher, train_s, DistillConfig(steps=25, lr=5e-3, warmup_steps=2, micro_batch_size=8,
                                                         seq_len=64, save_interval=10),
                tmp_path / "ckpt", parent / "vocab.txt", progress=False)
    after = lm_loss(student, held)
    assert after < before - 0.05, (before, after)
    assert r.final_loss < r.first_loss
    # resumable: a second call finds step 25 done and trains nothing more
    again = distill(student, teacher, train_s, DistillConfig(steps=25, save_interval=10, micro_batch_size=8,
                                                             seq_len=64), tmp_path / "ckpt", parent / "vocab.txt",
                    progress=False)
    assert again.resumed_from == 25


def test_user_recipe_with_qat_gives_an_int8_variant(parent, fixture_corpus, tmp_path):
    from cpmant.checkpoint import load_model_dir, load_pretrained
    from cpmant.compress.pipeline import compress_checkpoint
    from cpmant.generate import generate

    recipe = get_recipes("configs/recipes/half-width.yaml")[0]
    assert recipe.qat and recipe.methods == ["prune", "distill", "quantize"]
    cfg = CompressConfig(corpus=str(fixture_corpus), valid_fraction=0.25, distill_steps=4, distill_batch_size=4,
                         importance_rows=8, eval_rows=8, batch_size=4, gen_tokens=2)
    rep = compress_checkpoint(parent, recipe, cfg, tmp_path / "v", progress=False)
    c, sd, _, meta = load_model_dir(tmp_path / "v" / "model")
    assert c.quantization == "int8" and c.num_heads == 2 and c.dim_ff == 32
    assert sd["encoder.layers.0.ffn.ffn.w_out.weight"].dtype == torch.int8
    assert meta["report"]["distill"]["steps"] == 4 and rep["loss_increase"] == meta["report"]["loss_increase"]
    model, tok = load_pretrained(tmp_path / "v" / "model")
    assert isinstance(generate(model, tok, ["床前明月光"], max_new_tokens=3)[0], str)


def test_bmcook_backend_without_cuda(parent, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the bmcook path belongs to the gpu tier")
    from cpmant.compress.pipeline import compress_checkpoint

    with pytest.raises(CpmantError, match="needs CUDA") as e:
        compress_checkpoint(parent, RECIPES["3b"], CompressConfig(backend="bmcook"), tmp_path / "x")
    assert "--backend torch" in str(e.value)
