"""Parity with transformers' CpmAntForCausalLM (4.45.2) on shrunken random weights, and converter roundtrips."""

import json

import pytest
import torch
from transformers import CpmAntForCausalLM

from cpmant.config import ModelConfig
from cpmant.convert import (
    convert, detect_format, from_cpm_live, from_hf_state_dict, to_cpm_live, to_hf_config, to_hf_state_dict,
    validate_state_dict,
)
from cpmant.errors import CpmantError
from cpmant.factory import build_model

pytestmark = pytest.mark.unit

CFG = ModelConfig(
    vocab_size=200, dim_model=64, dim_ff=96, num_layers=2, num_heads=4, dim_head=16,
    position_bias_num_buckets=32, position_bias_max_distance=64, prompt_types=4, prompt_length=4, segment_types=4,
)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = build_model(CFG).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong fold would show
        for n, p in ours.named_parameters():
            if n.endswith("layernorm_before_attention.weight") or n.endswith("output_layernorm.weight"):
                p.uniform_(0.5, 1.5)
    hf = CpmAntForCausalLM(to_hf_config(CFG)).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), CFG), strict=True)
    return ours, hf


def mirror_hf_inputs(ids: torch.Tensor, c: ModelConfig) -> dict:
    """Our inputs built as CpmAntModel.forward builds its own: task-2 prompt ahead, segment 2 where id != 0 (0 on
    the prompt and the left padding), all context, positions 0..T-1 over the whole row, span 0. HF masks its left
    padding; here the padding gets span 1, so no real position sees it (and it sees no real position)."""
    B, L = ids.shape
    P = c.prompt_length
    T = P + L
    inp = torch.cat([torch.arange(2 * P, 3 * P).repeat(B, 1), ids], dim=1)
    pad = torch.cat([torch.zeros(B, P, dtype=torch.bool), ids == 0], dim=1)
    seg = torch.where(pad, 0, 2)
    seg[:, :P] = 0
    return dict(input=inp, length=torch.full((B,), T), context=torch.ones(B, T, dtype=torch.long),
                position=torch.arange(T).repeat(B, 1), segment=seg, span=pad.long())


@torch.no_grad()
def test_logits_match_hf(pair):
    ours, hf = pair
    torch.manual_seed(1)
    ids = torch.randint(10, CFG.vocab_size, (3, 20))
    ref = hf(ids).logits  # (B, L, V + prompt rows); HF drops the prompt positions
    assert ref.shape == (3, 20, CFG.vocab_size + CFG.prompt_types * CFG.prompt_length)
    out = ours(**mirror_hf_inputs(ids, CFG))[:, CFG.prompt_length:]
    assert torch.allclose(out, ref[..., : CFG.vocab_size], atol=1e-4, rtol=0)


@torch.no_grad()
def test_logits_match_hf_left_padded(pair):
    ours, hf = pair
    torch.manual_seed(2)
    ids = torch.randint(10, CFG.vocab_size, (2, 16))
    ids[1, :5] = 0  # HF's left padding
    ref = hf(ids).logits[..., : CFG.vocab_size]
    out = ours(**mirror_hf_inputs(ids, CFG))[:, CFG.prompt_length:]
    assert torch.allclose(out[0], ref[0], atol=1e-4, rtol=0)
    assert torch.allclose(out[1, 5:], ref[1, 5:], atol=1e-4, rtol=0)


def test_hf_roundtrip_state_dicts():
    torch.manual_seed(3)
    hf = CpmAntForCausalLM(to_hf_config(CFG))  # HF's own random init
    hf_sd = hf.state_dict()
    sd, cfg = from_hf_state_dict(hf_sd, hf.config)
    assert cfg == CFG
    validate_state_dict(sd, cfg)
    back = to_hf_state_dict(sd, cfg)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.allclose(back[k], v, rtol=1e-6, atol=1e-7), k
    ours = build_model(CFG).state_dict()
    again, _ = from_hf_state_dict(to_hf_state_dict(ours, CFG), to_hf_config(CFG).to_dict())
    assert all(torch.allclose(again[k], ours[k], rtol=1e-6, atol=1e-6) for k in ours)


def test_hf_refuses_masked_model():
    c = CFG.replace(mask_modules=((False, True), (False, False)))
    with pytest.raises(CpmantError, match="mask_modules"):
        to_hf_state_dict(build_model(c).state_dict(), c)


def test_cpm_live_roundtrip_through_files(tmp_path):
    c = CFG.replace(mask_modules=((False, True), (True, False)))
    sd = build_model(c).state_dict()
    to_cpm_live(sd, c, tmp_path / "live")
    raw = torch.load(tmp_path / "live" / "pytorch_model.pt", map_location="cpu", weights_only=True)
    assert set(raw) == set(sd) and {v.dtype for v in raw.values()} == {torch.float16}
    assert json.loads((tmp_path / "live" / "config.json").read_text())["half"] is True
    back, cfg = from_cpm_live(tmp_path / "live" / "pytorch_model.pt", tmp_path / "live" / "config.json")
    assert cfg.replace(half=False) == c
    assert all(torch.equal(back[k], sd[k].half()) for k in sd)


def test_bad_keys_are_listed():
    sd = build_model(CFG).state_dict()
    sd.pop("encoder.layers.1.ffn.ffn.w_out.weight")
    sd["encoder.layers.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(CpmantError) as e:
        validate_state_dict(sd, CFG)
    msg = str(e.value)
    assert "encoder.layers.1.ffn.ffn.w_out.weight" in msg and "encoder.layers.9.extra.weight" in msg


def test_convert_between_all_formats(tmp_path):
    pytest.importorskip("cpmant.checkpoint")
    from cpmant.checkpoint import save_model_dir

    torch.manual_seed(4)
    model = build_model(CFG).eval()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(f"t{i}\n" for i in range(CFG.vocab_size)), encoding="utf-8")
    src = save_model_dir(tmp_path / "ours", model.state_dict(), CFG, vocab)
    assert detect_format(src) == "cpmant"
    hf_dir = convert(src, tmp_path / "hf", "hf")
    assert detect_format(hf_dir) == "hf" and (hf_dir / "vocab.txt").exists() and (hf_dir / "model.safetensors").exists()
    hf = CpmAntForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(10, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        ref = hf(ids).logits[..., : CFG.vocab_size]
        out = model(**mirror_hf_inputs(ids, CFG))[:, CFG.prompt_length:]
    assert torch.allclose(out, ref, atol=1e-4, rtol=0)
    live = convert(hf_dir, tmp_path / "live", "cpm-live")
    assert detect_format(live) == "cpm-live" and (live / "vocab.txt").exists()
    ours2 = convert(live, tmp_path / "ours2", "cpmant")
    assert detect_format(ours2) == "cpmant" and (ours2 / "vocab.txt").exists()
    from cpmant.checkpoint import load_model_dir

    cfg2, sd2, _, meta = load_model_dir(ours2)
    assert cfg2.replace(half=False) == CFG and meta["converted_from"]["format"] == "cpm-live"
    for k, v in model.state_dict().items():  # fp16 storage on the way: half precision
        assert torch.allclose(sd2[k].float(), v, rtol=2e-3, atol=2e-3), k
    with pytest.raises(CpmantError, match="not empty"):
        convert(src, hf_dir, "hf")
    with pytest.raises(CpmantError, match="target format"):
        convert(src, tmp_path / "x", "onnx")
