"""The one held-out measure (cpmant/heldout.py): pretraining's valid_loss_end, the ladder's parent row and every rung,
and validation's perplexity are the same number on the same rows; the rows are the half compression does not use to
choose what to prune; the spec is recorded in the lineage; reuse keys and perplexity gates follow the rows' identity.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import FIXTURES, MICRO_MODEL


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A micro model pretrained on the fixture corpus with 7 held-out documents (so compression can halve them)."""
    from cpmant.training.config import PretrainConfig
    from cpmant.training.loop import pretrain

    out = tmp_path_factory.mktemp("heldout")
    cfg = PretrainConfig(preset="tiny", model_overrides=MICRO_MODEL, corpus=str(FIXTURES / "corpus"), vocab_size=600,
                         seq_len=64, micro_batch_size=4, max_steps=6, warmup_steps=2, lr=0.05, eval_interval=3,
                         eval_rows=6, save_interval=6, output_dir=str(out / "run"), encode_workers=1, num_threads=1,
                         min_piece_tokens=4, valid_fraction=0.25)
    return pretrain(cfg, progress=False), out


def _compress(parent, out):
    from cpmant.compress.config import CompressConfig
    from cpmant.compress.pipeline import compress_checkpoint
    from cpmant.compress.recipe import RECIPES

    cfg = CompressConfig(distill_steps=1, distill_batch_size=2, importance_rows=4, batch_size=4, gen_tokens=2,
                         gen_repeats=1, precision="fp32")
    return compress_checkpoint(parent, RECIPES["3b"], cfg, out, progress=False)


def test_pretraining_ladder_and_validation_agree(base):
    from cpmant.checkpoint import load_pretrained, read_meta
    from cpmant.validation.suite import measure_perplexity

    res, out = base
    assert read_meta(res.model_dir)["data"]["heldout"] == {"seq_len": 64, "rows": 6, "batch_size": 4}
    rep = _compress(res.model_dir, out / "rung")
    model, _ = load_pretrained(res.model_dir)
    val = measure_perplexity(model, res.model_dir)
    ppl = math.exp(res.valid_loss_end)
    # one number for the base, to 4 digits (in fact to float precision: the same rows, fp32)
    assert rep["parent_perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert val["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert rep["parent_lm_loss"] == pytest.approx(res.valid_loss_end, rel=1e-4)
    assert val["eval_tokens"] > 0
    # the same rows, named the same way everywhere
    assert res.heldout_sha256 == rep["heldout_sha256"] == val["heldout_sha256"] != ""
    # a rung: its ladder row is its validation perplexity
    rung, _ = load_pretrained(out / "rung" / "model")
    rv = measure_perplexity(rung, out / "rung" / "model")
    assert rv["perplexity"] == pytest.approx(rep["perplexity"], rel=1e-4)
    assert rep["loss_increase"] == pytest.approx(rep["lm_loss"] / res.valid_loss_end - 1.0, rel=1e-4, abs=1e-6)
    assert rv["heldout_sha256"] == res.heldout_sha256


def test_the_rows_are_the_half_compression_does_not_use(base):
    from cpmant.compress.pipeline import load_data
    from cpmant.heldout import heldout_rows
    from cpmant.lineage import load_lineage_data

    res, _ = base
    d = load_lineage_data(res.model_dir, progress=False)
    assert len(d.valid) == 7
    rows = heldout_rows(d)
    data = load_data(res.model_dir, progress=False)
    ids = {id(x) for x in rows.docs}
    assert [len(x) for x in rows.docs] == [len(x) for x in d.valid[1::2]] and len(rows.docs) == 3
    assert [x.tolist() for x in data.evaluation] == [x.tolist() for x in rows.docs]
    assert [x.tolist() for x in data.importance] == [x.tolist() for x in d.valid[0::2]]
    assert not ids & {id(x) for x in d.valid[0::2]}


def test_older_folders_get_the_default_spec_and_a_changed_spec_is_measured_again(base, tmp_path):
    from cpmant.checkpoint import META_FILE, read_meta
    from cpmant.compress.config import CompressConfig
    from cpmant.compress.pipeline import variant_key
    from cpmant.compress.recipe import RECIPES
    from cpmant.heldout import HeldOutSpec, folder_heldout_sha256
    from cpmant.lineage import read_lineage

    res, _ = base
    old = tmp_path / "old"
    shutil.copytree(res.model_dir, old)
    meta = read_meta(old)
    del meta["data"]["heldout"]
    (old / META_FILE).write_text(json.dumps(meta))
    assert read_lineage(old).heldout == HeldOutSpec() == HeldOutSpec(seq_len=128, rows=64, batch_size=16)
    assert folder_heldout_sha256(old) != folder_heldout_sha256(res.model_dir)
    cfg = CompressConfig(batch_size=4, gen_tokens=2, gen_repeats=1)
    k_new, k_old = (variant_key(p, RECIPES["3b"], cfg) for p in (res.model_dir, old))
    assert k_new.config_sha256 != k_old.config_sha256  # the measure changed: not reused
    assert k_new.weights_sha256 == k_old.weights_sha256  # the weights did not


def test_stage_settings_that_chose_other_rows_are_refused():
    from pydantic import ValidationError

    from cpmant.compress.config import CompressConfig
    from cpmant.validation.config import ValidateConfig

    with pytest.raises(ValidationError, match="compress.eval_rows: removed"):
        CompressConfig(eval_rows=8)
    with pytest.raises(ValidationError, match="validation.eval_rows, validation.seq_len: removed"):
        ValidateConfig.model_validate({"eval_rows": 8, "seq_len": 64})


def test_perplexity_gates_compare_only_the_same_rows():
    from cpmant.validation.config import ValidateConfig
    from cpmant.validation.gates import plan_checks

    cfg = ValidateConfig()
    cand = {"perplexity": 20.0, "heldout_sha256": "a" * 64}
    same = {"perplexity": 19.0, "heldout_sha256": "a" * 64}
    other = {"perplexity": 19.0, "heldout_sha256": "b" * 64}
    unnamed = {"perplexity": 19.0}

    checks, skipped = plan_checks(cfg, "compress", cand, same, same)
    ppl = [c for c in checks if c.metric == "perplexity"]
    assert {c.against for c in ppl} == {"parent", "champion"}
    assert [c.limit for c in ppl if c.against == "champion"] == [pytest.approx(19.0 * 1.1)]
    assert not [s for s in skipped if s["metric"] == "perplexity"]

    checks, skipped = plan_checks(cfg, "compress", cand, same, other)
    assert [c.against for c in checks if c.metric == "perplexity"] == ["parent"]
    (s,) = [s for s in skipped if s["metric"] == "perplexity"]
    assert s["against"] == "champion" and "other held-out rows or with another vocab" in s["reason"]
    assert "bbbbbbbbbbbb vs the candidate's aaaaaaaaaaaa" in s["reason"]

    checks, skipped = plan_checks(cfg, "compress", cand, unnamed, None)
    assert not [c for c in checks if c.metric == "perplexity"]
    reasons = {s["against"]: s["reason"] for s in skipped if s["metric"] == "perplexity"}
    assert "does not record its held-out rows" in reasons["parent"] and reasons["champion"] == "no champion"
