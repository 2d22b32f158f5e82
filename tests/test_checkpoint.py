"""Checkpoints: one factory for every variant, integrity (hashes recorded at save, damaged files named, the newest
intact step found) and converter errors (the import graph: tests/test_architecture.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpmant import checkpoint as ckpt
from cpmant.config import ModelConfig
from cpmant.errors import CpmantError
from cpmant.tokenizer import SENTINELS, SPECIAL_TOKENS

pytestmark = pytest.mark.unit

CFG = ModelConfig(vocab_size=100, dim_model=16, dim_ff=32, num_layers=2, num_heads=2, dim_head=8,
                  position_bias_num_buckets=16, position_bias_max_distance=64,
                  prompt_types=2, prompt_length=4, segment_types=2)
VARIANTS = {
    "dense": CFG,
    "moe": CFG.replace(moe_experts=4, moe_top_k=2),
    "int8": CFG.replace(quantization="int8"),
    "int8-moe": CFG.replace(quantization="int8", moe_experts=4, moe_top_k=1, mask_modules=((False, False),
                                                                                             (False, True))),
}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    plain = [chr(0x4E00 + i) for i in range(CFG.vocab_size - len(SPECIAL_TOKENS) - len(SENTINELS))]
    p.write_text("".join(t + "\n" for t in (*SPECIAL_TOKENS, *plain, *SENTINELS)), encoding="utf-8")
    return p


def inputs(B: int = 2, L: int = 12):
    g = torch.Generator().manual_seed(0)
    inp = torch.randint(20, CFG.vocab_size - 60, (B, L), generator=g)
    inp[:, :CFG.prompt_length] = torch.arange(CFG.prompt_length)
    seg = torch.ones(B, L, dtype=torch.long)
    seg[:, :CFG.prompt_length] = 0
    return dict(input=inp, length=torch.full((B,), L), context=torch.ones(B, L, dtype=torch.long),
                position=torch.arange(L).repeat(B, 1), segment=seg, span=torch.zeros(B, L, dtype=torch.long))


def randomized(config: ModelConfig, seed: int = 0):
    """A model of `config` from the factory with every tensor random (int8 weights, scales and routers too)."""
    from cpmant.factory import build_model

    torch.manual_seed(seed)
    m = build_model(config).eval()
    with torch.no_grad():
        for name, buf in m.named_buffers():
            if buf.dtype == torch.int8:
                buf.copy_(torch.randint(-127, 128, buf.shape, dtype=torch.int8))
            else:
                buf.copy_(torch.rand_like(buf) + 0.5 if name.endswith("weight_scale") else torch.randn_like(buf))
    return m


def save(tmp_path: Path, name: str, model, vocab: Path, **kw) -> Path:
    return ckpt.save_model_dir(tmp_path / name, model.state_dict(), model.config, vocab, **kw)


# ---- the factory ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_factory_builds_each_variant_and_loading_uses_it(kind, tmp_path, vocab):
    from cpmant.factory import build_model
    from cpmant.model import Linear
    from cpmant.modules.moe import MoEFeedForward
    from cpmant.modules.quant import QuantLinear

    config = VARIANTS[kind]
    m = randomized(config)
    mods = list(m.encoder.modules())
    n_ffn = sum(not f for _, f in (config.mask_modules or [(False, False)] * config.num_layers))
    assert sum(isinstance(x, MoEFeedForward) for x in mods) == (n_ffn if config.moe_experts else 0)
    assert sum(isinstance(x, QuantLinear) for x in mods) == (
        4 * config.num_layers + 3 * n_ffn if config.quantization else 0)
    assert any(isinstance(x, Linear) for x in mods) == (config.quantization is None)
    meta_model = build_model(config, meta=True)
    assert all(t.is_meta for t in [*meta_model.parameters(), *meta_model.buffers()])
    assert set(meta_model.state_dict()) == set(m.state_dict())
    d = save(tmp_path, kind, m, vocab)
    loaded, tok = ckpt.load_pretrained(d)
    assert tok.vocab_size == CFG.vocab_size and loaded.config == config
    with torch.no_grad():
        assert torch.equal(loaded(**inputs()), m(**inputs()))


def test_factory_refuses_inconsistent_configs():
    with pytest.raises(CpmantError, match="moe_top_k"):
        CFG.replace(moe_experts=4)
    with pytest.raises(CpmantError, match="cannot split dim_ff=32"):
        CFG.replace(moe_experts=5, moe_top_k=1)
    with pytest.raises(CpmantError, match="unknown quantization 'int4'"):
        CFG.replace(quantization="int4")


# ---- integrity ----------------------------------------------------------------------------------------
def flip_byte(path: Path, at: int = -100) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0x01
    path.write_bytes(bytes(b))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_hashes_recorded_once_at_save(tmp_path, vocab):
    m = randomized(CFG)
    d = save(tmp_path, "m", m, vocab, extra_files={ckpt.TRAINING_STATE_FILE: lambda p: torch.save({"x": 1}, p)})
    meta = ckpt.read_meta(d)
    names = {ckpt.WEIGHTS_FILE, ckpt.CONFIG_FILE, ckpt.VOCAB_FILE, ckpt.TRAINING_STATE_FILE}
    assert set(meta["files_sha256"]) == names and set(meta["files_bytes"]) == names
    for n in names:
        assert meta["files_sha256"][n] == ckpt.sha256_file(d / n)
        assert meta["files_bytes"][n] == (d / n).stat().st_size
    assert ckpt.recorded_sha256(d) == meta["files_sha256"][ckpt.WEIGHTS_FILE]
    ckpt.verify_checkpoint(d)  # intact: no error


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("name", [ckpt.WEIGHTS_FILE, ckpt.CONFIG_FILE, ckpt.VOCAB_FILE, ckpt.TRAINING_STATE_FILE])
def test_verify_names_the_damaged_file(tmp_path, vocab, name, damage):
    m = randomized(CFG)
    d = save(tmp_path, "step-00000004", m, vocab,
             extra_files={ckpt.TRAINING_STATE_FILE: lambda p: torch.save({"step": torch.tensor(4)}, p)})
    (truncate if damage == "truncate" else lambda p: flip_byte(p, -2))(d / name)
    with pytest.raises(CpmantError) as e:
        ckpt.verify_checkpoint(d)
    assert e.value.problem.startswith(f"{name} in {d} is damaged")
    assert ("truncated?" in e.value.problem) == (damage == "truncate")
    assert "--resume auto" in e.value.fix  # a step folder: the fix says how resume gets past it


def test_loading_a_truncated_folder_gives_one_clear_error(tmp_path, vocab):
    d = save(tmp_path, "m", randomized(CFG), vocab)
    truncate(d / ckpt.WEIGHTS_FILE)
    for load in (ckpt.load_model_dir, ckpt.load_pretrained):
        with pytest.raises(CpmantError, match=r"model.safetensors in .* is damaged \(truncated\?") as e:
            load(d)
        assert "restore model.safetensors" in e.value.fix
    # a bit flip keeps the size: loading does not hash (cost), verify=True does
    d2 = save(tmp_path, "m2", randomized(CFG), vocab)
    flip_byte(d2 / ckpt.WEIGHTS_FILE)
    with pytest.raises(CpmantError, match="sha256 differs"):
        ckpt.load_pretrained(d2, verify=True)


def test_folder_without_hashes_is_checked_by_loading(tmp_path, vocab):
    d = save(tmp_path, "step-00000002", randomized(CFG), vocab,
             extra_files={ckpt.TRAINING_STATE_FILE: lambda p: torch.save({"step": torch.tensor(2)}, p)})
    meta = json.loads((d / ckpt.META_FILE).read_text())
    del meta["files_sha256"], meta["files_bytes"]  # as written before hashes were recorded
    (d / ckpt.META_FILE).write_text(json.dumps(meta))
    ckpt.verify_checkpoint(d)
    for name in (ckpt.TRAINING_STATE_FILE, ckpt.WEIGHTS_FILE):
        truncate(d / name)
        with pytest.raises(CpmantError, match=rf"{name} in .* is damaged \(truncated\?"):
            ckpt.verify_checkpoint(d)
    with pytest.raises(CpmantError, match=r"training_state.pt in .* is damaged"):
        ckpt.load_training_state(d)
    with pytest.raises(CpmantError, match=r"model.safetensors in .* is damaged"):
        ckpt.load_model_dir(d)


def test_latest_intact_checkpoint_skips_damaged_steps_with_reasons(tmp_path, vocab):
    m = randomized(CFG)
    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        ckpt.save_training_checkpoint(root, step, m.state_dict(), CFG, vocab, {"step": torch.tensor(step)},
                                      keep_last=5)
    assert ckpt.latest_intact_checkpoint(root) == (root / "step-00000006", [])
    truncate(root / "step-00000006" / ckpt.WEIGHTS_FILE)
    flip_byte(root / "step-00000004" / ckpt.TRAINING_STATE_FILE, -2)
    (root / "step-00000008").mkdir()  # an interrupted save
    best, skipped = ckpt.latest_intact_checkpoint(root)
    assert best == root / "step-00000002"
    assert [p.name for p, _ in skipped] == ["step-00000008", "step-00000006", "step-00000004"]
    assert "interrupted" in skipped[0][1]
    assert skipped[1][1].startswith("model.safetensors in") and "truncated?" in skipped[1][1]
    assert skipped[2][1].startswith("training_state.pt in")
    assert ckpt.latest_intact_checkpoint(tmp_path / "none") == (None, [])


# ---- converter errors --------------------------------------------------------------------------------
def test_convert_random_bytes_pt_is_not_a_checkpoint_and_never_advises_unpickling(tmp_path):
    from cpmant.convert import convert

    src = tmp_path / "live"
    src.mkdir()
    (src / "pytorch_model.pt").write_bytes(bytes(range(256)) * 40)
    (src / "config.json").write_text(json.dumps(CFG.to_dict()))
    with pytest.raises(CpmantError) as e:
        convert(src, tmp_path / "out", "cpmant")
    text = str(e.value)
    assert "is not a CPM-Live checkpoint" in text and "weights_only" not in text and "unpickl" not in text.lower()
    assert not (tmp_path / "out").exists()


def test_convert_missing_source_says_it_does_not_exist(tmp_path):
    from cpmant.convert import convert

    with pytest.raises(CpmantError, match="does not exist") as e:
        convert(tmp_path / "nope", tmp_path / "out", "hf")
    assert "cannot tell the format" not in str(e.value)


@pytest.mark.unit
def test_a_delta_folder_is_not_loaded_as_a_model(tmp_path):
    """A delta folder (only delta.safetensors) names what it is and how to load it, instead of "model.safetensors
    is missing"."""
    from cpmant.checkpoint import load_pretrained, verify_checkpoint
    from cpmant.errors import CpmantError

    (tmp_path / "delta.safetensors").write_bytes(b"x")
    for fn in (verify_checkpoint, load_pretrained):
        with pytest.raises(CpmantError, match="is a delta checkpoint") as e:
            fn(tmp_path)
        assert "load_model" in e.value.fix
