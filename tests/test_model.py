"""CPMAnt: parameter counts of every preset, state-dict keys, mask semantics, padding, length limit, KV cache."""

import pytest
import torch

from cpmant.config import PRESETS, ModelConfig, get_preset
from cpmant.errors import CpmantError
from cpmant.factory import build_model
from cpmant.model import CPMAnt

pytestmark = pytest.mark.unit

SMALL = ModelConfig(
    vocab_size=120, dim_model=32, dim_ff=48, num_layers=2, num_heads=2, dim_head=8,
    position_bias_num_buckets=16, position_bias_max_distance=48, prompt_types=3, prompt_length=4, segment_types=3,
)


def closed_form_count(c: ModelConfig) -> int:
    att, ffn = c.num_layers, c.num_layers
    if c.mask_modules is not None:
        att = sum(not a for a, _ in c.mask_modules)
        ffn = sum(not f for _, f in c.mask_modules)
    D, HD = c.dim_model, c.num_heads * c.dim_head
    return (
        c.vocab_size * D  # token table (tied output)
        + c.prompt_types * c.prompt_length * D  # prompt table
        + c.segment_types * D  # segment table
        + (c.segment_types**2 + c.position_bias_num_buckets) * c.num_heads  # position-bias table
        + D  # final RMSNorm
        + att * (D + 4 * D * HD)  # per kept attention: norm + q, k, v, out
        + ffn * (D + 3 * D * c.dim_ff)  # per kept FFN: norm + w_0, w_1, w_out
    )


def inputs(c: ModelConfig, B: int, L: int, seed: int = 0):
    """Task-2 prompt + random tokens, all context, segment 2 (0 on the prompt), positions 0..L-1, span 0."""
    g = torch.Generator().manual_seed(seed)
    P = c.prompt_length
    inp = torch.randint(10, c.vocab_size, (B, L), generator=g)
    inp[:, :P] = torch.arange(2 * P, 3 * P)
    seg = torch.full((B, L), 2)
    seg[:, :P] = 0
    return dict(input=inp, length=torch.full((B,), L), context=torch.ones(B, L, dtype=torch.long),
                position=torch.arange(L).repeat(B, 1), segment=seg, span=torch.zeros(B, L, dtype=torch.long))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(SMALL).eval()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_on_meta(name):
    c = get_preset(name)
    m = build_model(c, device=torch.device("meta"))
    assert all(p.is_meta for p in m.parameters())
    assert m.num_parameters() == closed_form_count(c)


def test_10b_is_9_39e9():
    n = build_model(get_preset("10b"), device="meta").num_parameters()
    assert f"{n:.2e}" == "9.39e+09"


def test_state_dict_keys_are_cpm_live_names(model):
    keys = set(model.state_dict())
    assert {"input_embedding.weight", "prompt_embedding.weight", "segment_embedding.weight",
            "position_bias.relative_attention_bias", "encoder.output_layernorm.weight"} <= keys
    for i in range(SMALL.num_layers):
        p = f"encoder.layers.{i}."
        assert {p + "self_att.layernorm_before_attention.weight", p + "self_att.self_attention.project_q.weight",
                p + "self_att.self_attention.project_k.weight", p + "self_att.self_attention.project_v.weight",
                p + "self_att.self_attention.attention_out.weight", p + "ffn.layernorm_before_ffn.weight",
                p + "ffn.ffn.w_in.w_0.weight", p + "ffn.ffn.w_in.w_1.weight", p + "ffn.ffn.w_out.weight"} <= keys
    assert len(keys) == 5 + 9 * SMALL.num_layers
    w = model.state_dict()["encoder.layers.0.ffn.ffn.w_out.weight"]
    assert tuple(w.shape) == (SMALL.dim_model, SMALL.dim_ff)  # (dim_out, dim_in) like nn.Linear


def test_masked_model_has_no_keys_and_runs():
    c = SMALL.replace(num_layers=3, mask_modules=((False, True), (True, False), (True, True)))
    m = build_model(c).eval()
    keys = set(m.state_dict())
    assert not any(k.startswith("encoder.layers.0.ffn") for k in keys)
    assert not any(k.startswith("encoder.layers.1.self_att") for k in keys)
    assert not any(k.startswith("encoder.layers.2.") for k in keys)
    assert any(k.startswith("encoder.layers.0.self_att") for k in keys)
    assert m.num_parameters() == closed_form_count(c)
    logits, hidden = m(**inputs(c, 2, 10), return_hidden=True)
    assert logits.shape == (2, 10, c.vocab_size) and logits.dtype == torch.float32
    assert len(hidden) == 3 and torch.equal(hidden[2], hidden[1])  # layer 2 is residual only


def test_return_hidden_and_dtype(model):
    x = inputs(SMALL, 2, 12)
    logits, hidden = model(**x, return_hidden=True)
    assert len(hidden) == SMALL.num_layers and hidden[0].shape == (2, 12, SMALL.dim_model)
    assert torch.equal(logits, model(**x))
    half = build_model(SMALL, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half(**x).dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32


def test_init_is_cpm_live():
    torch.manual_seed(0)
    m = build_model(SMALL.replace(dim_model=64, dim_ff=128))
    w = m.state_dict()["encoder.layers.0.ffn.ffn.w_in.w_0.weight"]
    assert abs(w.std().item() - 1.0) < 0.05
    assert torch.all(m.state_dict()["encoder.layers.0.ffn.layernorm_before_ffn.weight"] == 1)


@torch.no_grad()
def test_non_context_positions_do_not_see_the_future(model):
    L, P = 16, SMALL.prompt_length
    x = inputs(SMALL, 1, L)
    x["context"][0, 10:] = 0  # positions 10.. are predicted (non-context)
    base = model(**x)
    for j in (12, 15):  # change a later non-context token
        y = {k: v.clone() for k, v in x.items()}
        y["input"][0, j] = (y["input"][0, j] + 1 - 10) % (SMALL.vocab_size - 10) + 10
        out = model(**y)
        assert torch.allclose(out[0, 10:j], base[0, 10:j], atol=1e-5)  # earlier non-context rows unchanged
        assert not torch.allclose(out[0, j], base[0, j])
    y = {k: v.clone() for k, v in x.items()}
    y["input"][0, 8] += 1  # a context token is seen by everyone, including earlier positions
    assert not torch.allclose(model(**y)[0, P], base[0, P])


@torch.no_grad()
def test_spans_stay_apart(model):
    x = inputs(SMALL, 1, 20)
    x["span"][0, 12:] = 1
    base = model(**x)
    y = {k: v.clone() for k, v in x.items()}
    y["input"][0, 15] += 1
    out = model(**y)
    assert torch.allclose(out[0, :12], base[0, :12], atol=1e-5)
    assert not torch.allclose(out[0, 12:], base[0, 12:])


def test_padding_no_nan_and_equal_to_unpadded(model):
    x = inputs(SMALL, 2, 14)
    x["length"] = torch.tensor([14, 9])
    x["input"][1, 9:] = 0
    model.train()  # dropout is 0: train mode only exercises the training code path
    logits = model(**x)
    assert torch.isfinite(logits).all()
    logits[1, :9].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        alone = model(**{k: (v[1:, :9] if v.dim() == 2 else torch.tensor([9])) for k, v in x.items()})
        assert torch.allclose(model(**x)[1, :9], alone[0], atol=1e-5)


def test_too_long_raises(model):
    L = SMALL.position_bias_max_distance + 1
    with pytest.raises(CpmantError) as e:
        model(**inputs(SMALL, 1, L))
    assert str(L) in str(e.value) and str(SMALL.position_bias_max_distance) in str(e.value)
    assert "preset" in str(e.value)


@torch.no_grad()
def test_kv_cache_equals_forward_with_non_context_new_tokens(model):
    x = inputs(SMALL, 2, 18)
    n0 = 12
    first = {k: (v[:, :n0] if v.dim() == 2 else torch.full_like(v, n0)) for k, v in x.items()}
    logits, past = model.inference(**first)
    steps = [logits]
    for t in range(n0, 18):
        state = {k: (v[:, : t + 1] if v.dim() == 2 else torch.full_like(v, t + 1))
                 for k, v in x.items() if k != "input"}
        out, past = model.inference(x["input"][:, t : t + 1], past_key_values=past, **state)
        steps.append(out)
    cached = torch.cat(steps, dim=1)
    y = dict(x)
    y["context"] = x["context"].clone()
    y["context"][:, n0:] = 0  # the tokens decoded one by one see only the past
    assert torch.allclose(cached, model(**y), atol=1e-4)
    idx = torch.tensor([1, 1])
    re = CPMAnt.reorder_cache(past, idx)
    assert torch.equal(re[0][0][:, 0], past[0][0][:, 1])


def test_factory_builds_int8_moe_10b_on_meta():
    """The factory builds every variant of the largest preset with no memory: int8 weights are buffers, not params."""
    c = get_preset("10b").replace(quantization="int8", moe_experts=16, moe_top_k=4)
    m = build_model(c, meta=True)
    assert all(t.is_meta for t in [*m.parameters(), *m.buffers()])
    ffn = m.encoder.layers[1].ffn.ffn
    assert type(ffn).__name__ == "MoEFeedForward" and ffn.router.weight.shape == (16, c.dim_model)
    assert type(ffn.w_out).__name__ == "QuantLinear" and ffn.w_out.weight.dtype == torch.int8
    dense = build_model(get_preset("10b"), meta=True)
    n_lin = sum(p.numel() for k, p in dense.named_parameters() if k.startswith("encoder.layers.") and p.dim() == 2)
    assert m.num_parameters() == dense.num_parameters() - n_lin  # the encoder's Linear weights became int8 buffers
