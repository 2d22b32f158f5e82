"""Compression pieces the core tests do not cover: distillation lowers the student's held-out loss, recipes
(published ladder, user YAML with QAT), methods and backends that register themselves, data lineage (the parent's
corpus, split and vocab; a changed corpus is refused; no held-out document in distillation rows), the reuse key,
what is a metric and what a param, generation speed in generated ids, an unbuilt backend's clear refusal."""

from __future__ import annotations

import copy

import pytest
import torch

from cpmant.compress.config import CompressConfig
from cpmant.compress.methods import DistillConfig
from cpmant.compress.recipe import RECIPES, Recipe, get_recipes
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
                         corpus=str(fixture_corpus), valid_fraction=0.25, vocab_size=600, seq_len=64,
                         micro_batch_size=8, max_steps=40,
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
    with pytest.raises(CpmantError, match="distill.qat needs a quantize method after distill"):
        build_config(Recipe, None, {"name": "x", "methods": ["quantize", {"name": "distill", "qat": True}]})
    with pytest.raises(CpmantError, match="prune needs a dense fp model"):
        build_config(Recipe, None, {"name": "x", "methods": ["quantize", "prune"]})
    with pytest.raises(CpmantError, match="unknown method 'shrink'; choose one of: prune, distill, quantize, moefy"):
        build_config(Recipe, None, {"name": "x", "methods": ["shrink"]})
    with pytest.raises(CpmantError, match="moefy: top_k must not exceed num_experts"):
        build_config(Recipe, None, {"name": "x", "methods": [{"name": "moefy", "num_experts": 2, "top_k": 3}]})
    bad = tmp_path / "r.yaml"
    bad.write_text("name: r\nmethods:\n  - {name: prune, heads_keep: 1.5}\n")
    with pytest.raises(CpmantError, match="prune.heads_keep"):
        get_recipes(str(bad))
    old = tmp_path / "old.yaml"  # the old flat format: one Recipe holding every method's fields
    old.write_text("name: r\nmethods: [prune]\nheads_keep: 0.5\n")
    with pytest.raises(CpmantError, match="heads_keep"):
        get_recipes(str(old))


def test_distillation_lowers_the_students_loss(parent, fixture_corpus, tmp_path):
    from cpmant.checkpoint import load_pretrained
    from cpmant.compress.methods.distill import distill
    from cpmant.compress.importance import lm_loss
    from cpmant.compress.pipeline import build_streams, load_data
    from cpmant.compress.methods.prune import prune

    teacher, _ = load_pretrained(parent)
    data = load_data(parent, progress=False)
    train_s, imp_s, eval_s = build_streams(teacher.config, data, 64)
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
    assert recipe.method("distill").qat and recipe.method_names == ["prune", "distill", "quantize"]
    assert recipe.method("prune").heads_keep == 0.5 and recipe.method("distill").steps == 100
    cfg = CompressConfig(distill_steps=4, distill_batch_size=4, importance_rows=8, batch_size=4,
                         gen_tokens=2, gen_repeats=1)
    rep = compress_checkpoint(parent, recipe, cfg, tmp_path / "v", progress=False)
    c, sd, _, meta = load_model_dir(tmp_path / "v" / "model")
    assert c.quantization == "int8" and c.num_heads == 2 and c.dim_ff == 32
    assert sd["encoder.layers.0.ffn.ffn.w_out.weight"].dtype == torch.int8
    assert meta["report"]["distill"]["steps"] == 4 and rep["loss_increase"] == meta["report"]["loss_increase"]
    # the variant carries its parent's data lineage forward: a variant of this variant reads the same data
    from cpmant.lineage import read_lineage

    assert meta["data"] == read_lineage(parent).to_meta() and read_lineage(tmp_path / "v" / "model") == read_lineage(
        parent)
    assert meta["recipe_config"] == recipe.with_method("distill", steps=4, micro_batch_size=4).model_dump(mode="json")
    model, tok = load_pretrained(tmp_path / "v" / "model")
    assert isinstance(generate(model, tok, ["床前明月光"], max_new_tokens=3)[0], str)


def test_a_backend_that_is_not_built_is_refused():
    """bmcook is not built: it is not registered, so a config naming it is refused with the built choices."""
    with pytest.raises(CpmantError, match="unknown compress backend 'bmcook'; choose one of: torch\n"):
        build_config(CompressConfig, None, {"backend": "bmcook"})


# ---- methods and backends register themselves ---------------------------------------------------------
@pytest.fixture
def scale_method():
    """A method `scale` registered as a new method module would register it; unregistered after the test."""
    from typing import Literal

    from cpmant.compress.methods import METHODS, MethodConfig, register_method

    class ScaleConfig(MethodConfig):
        name: Literal["scale"] = "scale"
        factor: float = 1.0

    calls = []

    @register_method("scale", ScaleConfig, description="multiplies the output embedding")
    def apply(ctx, cfg):
        calls.append(cfg.factor)
        return ctx.student

    try:
        yield calls
    finally:
        METHODS.pop("scale")


def test_methods_and_recipes_come_from_registries(parent, tmp_path):
    import inspect

    from cpmant.compress import METHODS, RECIPES as R, recipe_names
    from cpmant.compress import pipeline

    assert list(METHODS) == ["prune", "distill", "quantize", "moefy"] and R is RECIPES
    assert recipe_names() == ["7b", "3b", "1b", "300m", "int8", "moe", "all"]
    assert "method ==" not in inspect.getsource(pipeline)  # dispatch through the registry, no if-chain
    assert set(Recipe.model_fields) == {"name", "methods", "published_loss_increase"}  # no method's fields

    assert "DistillConfig" not in inspect.getsource(pipeline)  # no method is special-cased


def test_a_new_method_is_one_registration(parent, tmp_path, scale_method):
    """Recipes accept a newly registered method and the pipeline calls it."""
    calls = scale_method
    r = build_config(Recipe, None, {"name": "s", "methods": [{"name": "scale", "factor": 2.0}]})
    assert r.method("scale").factor == 2.0 and r.model_dump()["methods"] == [{"name": "scale", "factor": 2.0}]
    from cpmant.compress.pipeline import compress_checkpoint

    rep = compress_checkpoint(parent, r, CompressConfig(batch_size=4, gen_tokens=2, gen_repeats=1),
                              tmp_path / "s", progress=False)
    assert calls == [2.0] and rep["methods"] == ["scale"] and rep["loss_increase"] == pytest.approx(0, abs=1e-6)


def test_backends_registry():
    from cpmant.backends import BACKENDS, backend_names, get_backend, register_backend

    assert backend_names("train") == backend_names("compress") == backend_names("generate") == ("torch",)
    assert backend_names("infer") == ("torch", "bminf")  # the built ones only (cpmant.offload.bminf_backend)
    assert get_backend("compress", "torch") == "torch"
    with pytest.raises(CpmantError, match="unknown compress backend 'nope'") as e:
        get_backend("compress", "nope")
    assert "choose one of: torch" in str(e.value)
    with pytest.raises(CpmantError, match="invalid CompressConfig: backend: .*choose one of: torch"):
        build_config(CompressConfig, None, {"backend": "nope"})
    try:
        register_backend("compress", "fake", "a test backend")(lambda: None)
        assert CompressConfig(backend="fake").backend == "fake" and "fake" in backend_names("compress")
        assert BACKENDS["compress"]["fake"].available() is None
    finally:
        BACKENDS["compress"].pop("fake", None)


def test_compress_config_no_longer_chooses_the_data():
    with pytest.raises(CpmantError, match="compress.corpus, compress.valid_fraction: removed; compression reads"):
        build_config(CompressConfig, None, {"corpus": "x", "valid_fraction": 0.2})
    with pytest.raises(CpmantError, match="unknown recipe 'huge'"):
        build_config(CompressConfig, None, {"recipes": "all,huge"})


# ---- data lineage -------------------------------------------------------------------------------------------
def test_compression_reads_the_parents_data(parent, fixture_corpus):
    from cpmant.checkpoint import read_meta
    from cpmant.compress.pipeline import build_streams, load_data
    from cpmant.corpus import load_corpus
    from cpmant.lineage import load_lineage_data, read_lineage

    lin = read_lineage(parent)
    assert lin.corpus == str(fixture_corpus.resolve()) and lin.valid_fraction == 0.25
    assert lin.data_sha256 == read_meta(parent)["data_sha256"]
    c = load_corpus(fixture_corpus, 0.25, 0)
    d = load_lineage_data(parent, progress=False)
    assert d.valid_texts == c.valid and d.train_texts == c.train and d.vocab_path == parent / "vocab.txt"
    data = load_data(parent, progress=False)
    assert data.data_sha256 == lin.data_sha256
    assert len(data.importance) + len(data.evaluation) == len(c.valid) >= 2

    # no held-out document enters a distillation row: every piece of the train stream is cut from a train document
    # and from no held-out one
    cfg = read_meta(parent)
    from cpmant.config import ModelConfig

    train_s, _, _ = build_streams(ModelConfig.load(parent / "config.json"), data, 64)
    pieces = [p[1:-1] for r in train_s.rows for p in r]  # without <s> and </s>
    held = data.importance + data.evaluation

    def cut_from(body, docs) -> bool:
        text = "," + ",".join(map(str, body.tolist())) + ","
        return any(text in "," + ",".join(map(str, d.tolist())) + "," for d in docs)

    assert pieces and all(cut_from(b, data.train) for b in pieces)
    assert not any(cut_from(b, held) for b in pieces if len(b) >= 4)
    assert cfg["data"]["corpus"] == lin.corpus  # written by pretraining


def test_a_changed_or_moved_corpus_is_refused(parent, fixture_corpus, tmp_path):
    import json
    import shutil

    from cpmant.checkpoint import META_FILE
    from cpmant.compress.pipeline import load_data
    from cpmant.lineage import read_lineage

    corpus = tmp_path / "corpus"
    shutil.copytree(fixture_corpus, corpus)
    model = tmp_path / "parent"
    shutil.copytree(parent, model)
    meta = json.loads((model / META_FILE).read_text())
    meta["data"] = {**read_lineage(parent).to_meta(), "corpus": str(corpus)}
    (model / META_FILE).write_text(json.dumps(meta))
    assert load_data(model, progress=False).data_sha256 == meta["data_sha256"]  # same text, same hash
    with open(corpus / "poems.txt", "a", encoding="utf-8") as f:
        f.write("\n\n新添一首诗，语料已经改变了。\n")
    with pytest.raises(CpmantError, match=f"the corpus at {corpus} is not the data .* was trained with"):
        load_data(model, progress=False)
    shutil.rmtree(corpus)
    with pytest.raises(CpmantError, match=f"the corpus {corpus} that .* no longer exists"):
        load_data(model, progress=False)
    # an older checkpoint without meta["data"] falls back to its training_config.yaml
    del meta["data"]
    (model / META_FILE).write_text(json.dumps(meta))
    # (its held-out measure: the default spec, as its old variants, which record none)
    from dataclasses import replace

    from cpmant.lineage import HeldOutSpec

    assert read_lineage(model) == replace(read_lineage(parent), heldout=HeldOutSpec())


# ---- reuse key, params and metrics ------------------------------------------------------------------------
def test_reuse_key_covers_every_input(parent, tmp_path):
    from cpmant.compress.pipeline import compress_checkpoint, fields_used, variant_key

    cfg = CompressConfig(batch_size=4, gen_tokens=2, gen_repeats=1, importance_rows=8)
    k = variant_key(parent, RECIPES["int8"], cfg).config_sha256
    assert "importance_rows" not in fields_used(RECIPES["int8"]) and "importance_rows" in fields_used(RECIPES["3b"])
    for change in ({"gen_tokens": 3}, {"gen_repeats": 2}, {"batch_size": 2}):
        assert variant_key(parent, RECIPES["int8"], cfg.model_copy(update=change)).config_sha256 != k, change
    for same in ({"importance_rows": 4}, {"output_dir": "x"}, {"recipes": "3b"}, {"distill_steps": 3}):
        assert variant_key(parent, RECIPES["int8"], cfg.model_copy(update=same)).config_sha256 == k, same
    k3 = variant_key(parent, RECIPES["3b"], cfg)
    assert variant_key(parent, RECIPES["3b"].with_method("distill", lr=1e-3), cfg).config_sha256 != k3.config_sha256
    assert variant_key(parent, RECIPES["3b"], cfg.model_copy(update={"distill_steps": 3})).config_sha256 != \
        k3.config_sha256
    ev = variant_key(parent, RECIPES["3b"], cfg.model_copy(update={"gen_tokens": 3}))
    assert ev.config_sha256 != k3.config_sha256 and ev.weights_sha256 == k3.weights_sha256  # metrics only

    # a finished variant is reused only when its key matches: new evaluation settings measure again
    from cpmant.checkpoint import read_meta

    first = compress_checkpoint(parent, RECIPES["int8"], cfg, tmp_path / "q", progress=False)
    again = compress_checkpoint(parent, RECIPES["int8"], cfg, tmp_path / "q", progress=False)
    assert again == first  # reused (the same timing numbers too)
    cfg2 = cfg.model_copy(update={"gen_tokens": 3})
    other = compress_checkpoint(parent, RECIPES["int8"], cfg2, tmp_path / "q", progress=False)
    assert other["compress_seconds"] != first["compress_seconds"]  # made and measured again, not the old numbers
    key2 = variant_key(parent, RECIPES["int8"], cfg2).config_sha256
    assert read_meta(tmp_path / "q" / "model")["config_sha256"] == key2


def test_published_figure_is_a_param_not_a_metric(parent, tmp_path):
    from cpmant.compress.pipeline import compress_checkpoint, describe_variant, final_metrics, recipe_params

    cfg = CompressConfig(batch_size=4, gen_tokens=2, gen_repeats=1)
    p3 = recipe_params(RECIPES["3b"], cfg)
    assert float(p3["recipe.published_loss_increase"]) == pytest.approx(2.603 / 2.420 - 1)
    assert {"prune.heads_keep", "distill.steps", "compress.importance_rows", "compress.gen_tokens"} <= set(p3)
    p8 = recipe_params(RECIPES["int8"], cfg)  # only the fields its methods use
    assert not [k for k in p8 if k.startswith(("prune.", "distill.", "moefy."))]
    assert "quantize.bits" in p8 and "compress.importance_rows" not in p8 and "compress.distill_steps" not in p8
    rep = compress_checkpoint(parent, RECIPES["int8"], cfg, tmp_path / "q", progress=False)
    m = final_metrics(rep)
    assert "published_loss_increase" not in rep and "published_loss_increase" not in m
    assert {"lm_loss", "loss_increase", "params", "bytes_on_disk", "generation_tokens_per_second"} <= set(m)
    text = describe_variant(RECIPES["int8"], "models:/cpm-ant-tiny/1", rep)
    assert text.startswith("int8 recipe of models:/cpm-ant-tiny/1: int8 weights, 4 attention / 4 FFN layers, ")
    assert f"{rep['params'] / 1e6:.2f} M parameters, loss {rep['loss_increase']:+.1%}" in text


def test_generation_speed_counts_generated_ids_over_several_calls():
    import time

    from cpmant.compress import pipeline

    calls = []

    def fake(model, tok, prompts, new_tokens):
        calls.append((len(prompts), new_tokens))
        time.sleep(0.02)
        return [[9] * 3 for _ in prompts]  # 3 ids per prompt, whatever they decode to

    model = torch.nn.Linear(1, 1)
    speed = pipeline.generation_speed(model, None, 5, repeats=3, generate=fake)
    assert calls == [(1, 2)] + [(4, 5)] * 3  # one warm-up, then three timed calls of the four prompts
    assert 0.7 * 36 / 0.06 < speed <= 36 / 0.06  # 36 ids in about 3 x 20 ms


def test_generated_ids_match_generate(parent):
    from cpmant.checkpoint import load_pretrained
    from cpmant.compress.pipeline import GEN_PROMPTS, _generated_ids
    from cpmant.generate import generate

    model, tok = load_pretrained(parent)
    ids = _generated_ids(model, tok, GEN_PROMPTS, 4)
    assert [tok.decode(x) for x in ids] == generate(model, tok, GEN_PROMPTS, max_new_tokens=4, repetition_penalty=1.0)
    assert all(len(x) <= 4 for x in ids)
