"""The precision policy (auto | fp32 | bf16): resolution, old configs, the run identity, loss parity of bf16 and fp32
training and evaluation, and precision in the compression keys and params.

Tolerances (measured on the micro model, 30 steps of 8 rows, on a CPU with AVX-512 BF16): the held-out loss after
bf16 training differed from fp32 training by 0.018% (dim 32; 0.10% with dim 64), the last training loss by 0.010%;
the test allows 1%. One fp32 model evaluated under bf16 autocast against fp32: 0.015%; allowed 1%. The distillation
loss of one batch in bf16 against fp32: 0.024%; allowed 1%.
"""

from __future__ import annotations

import pytest

from conftest import MICRO_MODEL
from cpmant import precision as P
from cpmant.errors import CpmantError

pytestmark = pytest.mark.unit

TRAIN_TOL = 0.01  # |valid loss bf16 - fp32| / fp32 after 30 steps (measured 0.0002-0.001)
EVAL_TOL = 0.01  # |eval in bf16 - eval in fp32| / fp32 on one fp32 model


def _other(precision: str) -> str:
    return {"fp32": "bf16", "bf16": "fp32"}[precision]


def test_resolve_precision():
    for native in (True, False):
        flags = frozenset({"avx512_bf16"} if native else {"avx2"})
        assert P.resolve_precision("fp32", flags=flags) == "fp32" and P.resolve_precision("bf16", flags=flags) == "bf16"
        assert P.resolve_precision("auto", "cpu", flags=flags) == ("bf16" if native else "fp32")
        assert P.bf16_native("cpu", flags=flags) is native
    assert P.resolve_precision("auto", flags=frozenset({"amx_bf16"})) == "bf16"
    assert P.PRECISIONS == ("auto", "fp32", "bf16")  # the one Literal's values
    with pytest.raises(CpmantError, match="unknown precision 'fp16'") as e:
        P.resolve_precision("fp16")
    assert "auto, fp32, bf16" in e.value.fix
    with pytest.raises(CpmantError, match="not resolved"):
        P.autocast("auto")


def test_old_bf16_configs_load_and_the_run_identity_hashes_the_resolved_precision(micro_pretrain_cfg):
    from pydantic import ValidationError

    from cpmant.training.config import PretrainConfig
    from cpmant.training.runs import changed_settings, config_sha256, run_key

    assert PretrainConfig().precision == "auto"
    assert PretrainConfig.model_validate({"bf16": True}).precision == "bf16"
    assert PretrainConfig.model_validate({"bf16": False}).precision == "fp32"
    with pytest.raises(ValidationError):
        PretrainConfig(precision="fp16")
    auto, fp32, bf16 = (micro_pretrain_cfg(precision=p, device="cpu") for p in ("auto", "fp32", "bf16"))
    assert config_sha256(fp32) != config_sha256(bf16) and run_key(fp32) != run_key(bf16)
    here = P.resolve_precision("auto", "cpu")  # what auto is on this machine
    same, other = {"fp32": fp32, "bf16": bf16}[here], {"fp32": fp32, "bf16": bf16}[_other(here)]
    assert config_sha256(auto) == config_sha256(same) != config_sha256(other)
    # a saved config with the old field compares equal to the same precision, and differs from the other
    old = {k: v for k, v in fp32.model_dump(mode="json").items() if k != "precision"}
    assert changed_settings({**old, "bf16": False}, fp32) == []
    assert changed_settings({**old, "bf16": True}, fp32) == ["precision: 'bf16' -> 'fp32'"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fixture_corpus):
    """The micro model trained 30 steps in fp32 and in bf16 (same seed, data and settings)."""
    from cpmant.training.config import PretrainConfig
    from cpmant.training.loop import pretrain

    tmp = tmp_path_factory.mktemp("precision")
    out = {}
    for prec in ("fp32", "bf16"):
        cfg = PretrainConfig(preset="tiny", model_overrides=MICRO_MODEL, corpus=str(fixture_corpus), vocab_size=600,
                             seq_len=64, micro_batch_size=8, max_steps=30, warmup_steps=4, lr=0.05, eval_interval=30,
                             eval_rows=32, save_interval=30, output_dir=str(tmp / prec), encode_workers=1,
                             num_threads=1, min_piece_tokens=4, precision=prec, device="cpu", valid_fraction=0.2)
        out[prec] = pretrain(cfg, progress=False)
    return out


def test_bf16_and_fp32_training_keep_the_loss(trained):
    a, b = trained["fp32"], trained["bf16"]
    assert (a.precision, a.precision_setting, b.precision) == ("fp32", "fp32", "bf16")
    assert b.valid_loss_end < b.valid_loss_start - 0.5  # it learned
    assert abs(b.valid_loss_end - a.valid_loss_end) / a.valid_loss_end < TRAIN_TOL
    assert abs(b.final_loss - a.final_loss) / a.final_loss < TRAIN_TOL
    # the weights are fp32 in bf16 training too: checkpoints and the final model
    from safetensors.torch import load_file

    from cpmant import checkpoint as ckpt

    for res in (a, b):
        assert {t.dtype for t in load_file(str(res.model_dir / ckpt.WEIGHTS_FILE)).values()} == {
            __import__("torch").float32}


def test_held_out_evaluation_agrees_in_bf16_and_fp32(trained):
    import torch

    from cpmant import checkpoint as ckpt
    from cpmant.training.evaluate import evaluate
    from cpmant.training.loop import build_streams
    from cpmant.training.config import PretrainConfig
    from cpmant.training.prepare import prepare_data

    res = trained["fp32"]
    model, _ = ckpt.load_pretrained(res.model_dir)
    cfg = PretrainConfig.model_validate(__import__("yaml").safe_load((res.run_dir / "config.yaml").read_text()))
    data = prepare_data(cfg.corpus, cfg.preset, cfg.vocab_size, cfg.valid_fraction, cfg.seed, 1, progress=False)
    _, valid = build_streams(cfg, model.config, data)
    e32 = evaluate(model, valid, 32, 8, "fp32")
    e16 = evaluate(model, valid, 32, 8, "bf16")
    assert e32["valid_loss"] == pytest.approx(res.valid_loss_end, rel=1e-5)  # the run's own figure
    assert e16["valid_tokens"] == e32["valid_tokens"]
    assert e16["valid_loss"] != e32["valid_loss"]  # bf16 did run (the products are rounded)
    assert abs(e16["valid_loss"] - e32["valid_loss"]) / e32["valid_loss"] < EVAL_TOL
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never casts the model


def test_compress_precision_is_in_the_variant_key_and_params(trained):
    from cpmant.compress.config import CompressConfig
    from cpmant.compress.pipeline import recipe_params, variant_key
    from cpmant.compress.recipe import RECIPES

    parent = trained["fp32"].model_dir
    cfg = CompressConfig(batch_size=4, gen_tokens=2, gen_repeats=1)
    assert cfg.precision == "auto"
    k = {p: variant_key(parent, RECIPES["3b"], cfg.model_copy(update={"precision": p})) for p in ("fp32", "bf16")}
    assert k["fp32"].config_sha256 != k["bf16"].config_sha256
    assert k["fp32"].weights_sha256 != k["bf16"].weights_sha256  # distillation in bf16 makes other weights
    same = P.resolve_precision("auto", "cpu")  # what auto is on this machine
    assert variant_key(parent, RECIPES["3b"], cfg) == k[same] != k[_other(same)]  # auto hashes as it resolves
    params = recipe_params(RECIPES["3b"], cfg)
    assert (params["precision"], params["precision_setting"], params["compress.precision"]) == (same, "auto", same)


def test_distillation_loss_in_bf16_is_close_to_fp32(trained):
    import copy

    from cpmant import checkpoint as ckpt
    from cpmant.compress.methods.distill import distill_loss
    from cpmant.compress.methods import DistillConfig
    from cpmant.compress.pipeline import build_streams, load_data

    teacher, _ = ckpt.load_pretrained(trained["fp32"].model_dir)
    student = copy.deepcopy(teacher)
    student.encoder.layers[0].ffn = None  # a pruned student: the loss is not zero
    train, _, _ = build_streams(teacher.config, load_data(trained["fp32"].model_dir, progress=False), 64)
    batch = train.batch(range(8))
    teacher.eval(), student.eval()
    l32, p32 = distill_loss(student, teacher, batch, DistillConfig(), "fp32")
    l16, p16 = distill_loss(student, teacher, batch, DistillConfig(), "bf16")
    assert l16.dtype == l32.dtype == __import__("torch").float32 and p16.keys() == p32.keys()
    assert l16.item() != l32.item() and l16.item() == pytest.approx(l32.item(), rel=0.01)


def test_one_precision_literal_for_every_config():
    """`auto | fp32 | bf16` is written once (cpmant/precision.py); the configs take `Precision` from there."""
    import re
    from pathlib import Path

    from cpmant.compress.config import CompressConfig
    from cpmant.delta.config import TuneConfig
    from cpmant.training.config import PretrainConfig

    root = Path(P.__file__).resolve().parent.parent
    copies = [str(f.relative_to(root)) for d in ("cpmant", "tasks", "flows", "cpmant_cli", "registry")
              for f in (root / d).rglob("*.py")
              if re.search(r"""["']auto["'],\s*["']fp32["'],\s*["']bf16["']""", f.read_text(encoding="utf-8"))]
    assert copies == ["cpmant/precision.py"]
    for cls in (PretrainConfig, CompressConfig, TuneConfig):
        assert cls().precision == "auto"
        with pytest.raises(ValueError, match="precision"):
            cls(precision="fp16")
