"""The generation engine beyond test_generate.py: streaming (the same tokens as `generate`), stop strings, CPM-Ant's
bans checked against a real vocab's specials, int8 through the kernel (close to the dequantized weights, the pack
refreshed when the weights change), MoE computing only the routed experts (equal to the dense computation), and a
delta-style wrapped project_q / project_v going through generate."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cpmant import decode
from cpmant.config import ModelConfig
from cpmant.factory import build_model
from cpmant.generate import banned_ids, build_batch, cut_at_stop, generate, generate_ids, generate_stream
from cpmant.generation_config import GenerationConfig
from cpmant.modules import quant
from cpmant.modules.moe import MoEFeedForward
from cpmant.tokenizer import SENTINELS, SPECIAL_TOKENS, CPMAntTokenizer, build_vocab

pytestmark = pytest.mark.unit

PROMPTS = ["床前明月光", "白日依山尽", "春眠不觉晓"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, fixture_corpus):
    texts = [p.read_text(encoding="utf-8") for p in sorted(fixture_corpus.iterdir())]
    return CPMAntTokenizer(build_vocab(texts, 600, tmp_path_factory.mktemp("vocab") / "vocab.txt"))


def micro_config(vocab_size: int, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, dim_model=32, dim_ff=64, num_layers=2, num_heads=2, dim_head=16,
                       position_bias_num_buckets=16, position_bias_max_distance=64, prompt_types=4, prompt_length=4,
                       segment_types=4, **kw)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_model(micro_config(tok.vocab_size))
    with torch.no_grad():  # N(0, 1) everywhere gives near one-hot outputs; soften for a livelier distribution
        m.input_embedding.weight.mul_(0.2)
    return m.eval()


# ---- streaming and stop strings ----------------------------------------------------------------------------------
def test_stream_yields_the_same_text_as_generate(model, tok):
    pieces_seen = 0
    for p in PROMPTS:
        for settings in (dict(max_new_tokens=12), dict(max_new_tokens=8, temperature=1.0, top_k=20, seed=3)):
            pieces = list(generate_stream(model, tok, p, **settings))
            assert "".join(pieces) == generate(model, tok, [p], **settings)[0]
            assert all(pieces)  # no empty pieces
            pieces_seen = max(pieces_seen, len(pieces))
    assert pieces_seen > 3  # it really streams: one piece per token or so
    assert list(generate_stream(model, tok, PROMPTS[0], max_new_tokens=6, num_beams=2)) == [
        generate(model, tok, PROMPTS[:1], max_new_tokens=6, num_beams=2)[0]]


def test_stream_leaves_no_mode_on_between_pieces_and_restores_training(model, tok):
    model.train()
    try:
        it = generate_stream(model, tok, PROMPTS[0], max_new_tokens=5)
        next(it)
        assert not model.training  # eval while generating
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        it.close()
        assert model.training
    finally:
        model.eval()


def test_stop_strings_cut_generate_and_stream(model, tok):
    full = generate(model, tok, PROMPTS, max_new_tokens=16)
    text = max(full, key=len)
    p = PROMPTS[full.index(text)]
    assert len(text) >= 6
    stop = text[3:5]  # a stop string in the middle of the continuation
    want = text[: text.find(stop)]
    assert generate(model, tok, [p], max_new_tokens=16, stop=[stop]) == [want]
    assert "".join(generate_stream(model, tok, p, max_new_tokens=16, stop=(stop,))) == want
    # it ends the row: fewer ids, and the last one completes the stop string
    ids = generate_ids(model, tok, [p], max_new_tokens=16, stop=[stop])[0]
    assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
    # batched rows stop on their own; a stop string that never comes changes nothing
    cfg = GenerationConfig(max_new_tokens=16, stop=(stop, "never-seen"))
    assert generate(model, tok, PROMPTS, cfg) == [generate(model, tok, [q], cfg)[0] for q in PROMPTS]
    assert generate(model, tok, PROMPTS, max_new_tokens=16, stop="never-seen") == full
    assert cut_at_stop("abcdef", ("de", "bc")) == "a"


def test_stop_setting_validated_and_mlflow_friendly():
    assert GenerationConfig(stop="。").stop == ("。",)
    assert GenerationConfig(stop=["a", "b"]).stop == ("a", "b")
    assert GenerationConfig().to_params()["stop"] == []
    from cpmant.errors import CpmantError

    for bad in ([""], [3], 5):
        with pytest.raises(CpmantError, match="stop="):
            GenerationConfig(stop=bad)


# ---- bans against the vocab's specials ------------------------------------------------------------------------------
class FavoursSpecials(torch.nn.Module):
    """Wraps a model: every special token, sentinel and filler gets +1e4 (the favourites, were they not banned)."""

    def __init__(self, inner, ids):
        super().__init__()
        self.inner, self.config, self.ids = inner, inner.config, torch.tensor(ids)

    def inference(self, *args, **kwargs):
        logits, cache = self.inner.inference(*args, **kwargs)
        logits[..., self.ids] += 1e4
        return logits, cache

    def attention_bias(self, *args, **kwargs):
        return self.inner.attention_bias(*args, **kwargs)


def test_bans_are_the_vocab_specials(model, tok):
    never = {"<pad>", "<unk>", "<mask>", "<sep>", "<s>", "<d>", "</d>", *SENTINELS}
    want = sorted(i for i, t in enumerate(tok.decoder) if t in never or t.startswith("<unused"))
    assert list(banned_ids(tok)) == want
    assert {tok.eos_id, tok.newline_id, tok.space_id}.isdisjoint(banned_ids(tok))
    assert len(want) >= len(SPECIAL_TOKENS) - 3 + len(SENTINELS)
    specials = [i for i, t in enumerate(tok.decoder) if t in set(SPECIAL_TOKENS) | set(SENTINELS)
                or t.startswith("<unused")]
    fav = FavoursSpecials(model, specials).eval()  # (generate restores the wrapper's mode, and so the model's)
    for settings in (dict(), dict(temperature=1.0, seed=1), dict(num_beams=2)):
        for ids in generate_ids(fav, tok, PROMPTS, max_new_tokens=6, **settings):
            assert ids and not set(ids) & set(want)
            assert ids[0] not in (tok.eos_id, tok.newline_id)  # banned at the first step only
            assert ids[0] == tok.space_id  # the one favourite left at the first step


# ---- int8 through the kernel ---------------------------------------------------------------------------------------
INT8_TOL = 0.03  # |kernel - dequantized| / max|dequantized|: activations quantized per tensor (measured 0.6-2%)


@pytest.mark.skipif(not quant._KERNEL_OK, reason="this torch has no fbgemm dynamic quantized linear")
def test_int8_kernel_close_to_dequantized_and_repacks_on_change():
    every = quant.int8_kernel(min_weights=0)  # every matrix through the kernel, however small
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160, bias=False)
    from cpmant.model import Linear

    ref_lin = Linear(96, 160)
    with torch.no_grad():
        ref_lin.weight.copy_(lin.weight)
    q = quant.QuantLinear.from_linear(ref_lin)
    x = torch.randn(7, 96)
    with torch.inference_mode():
        assert torch.allclose(q(x), F.linear(x, q.dequantized()) * q.scale, atol=1e-5)  # off outside int8_kernel()
        assert "_packed" not in q.__dict__
    with torch.inference_mode(), every:
        y = q(x)
        ref = F.linear(x, q.dequantized()) * q.scale
        assert "_packed" in q.__dict__  # the kernel ran (a pack is cached)
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        assert 0 < err < INT8_TOL
        xg = x.clone().requires_grad_(True)
    with quant.int8_kernel(min_weights=0):
        y_grad = q(xg)  # a gradient wanted: the dequantizing path, exact
    assert torch.allclose(y_grad, ref, atol=1e-5)
    q.weight.mul_(-1)  # in place: the pack is rebuilt
    with torch.inference_mode(), quant.int8_kernel(min_weights=0):
        assert ((q(x) + ref).abs().max() / ref.abs().max()).item() < INT8_TOL
    assert set(q.state_dict()) == {"weight", "weight_scale"} and q.weight.dtype == torch.int8
    c = copy.deepcopy(q)  # the pack is a cache: copies go without it
    assert "_packed" not in c.__dict__ and torch.equal(c.weight, q.weight)
    assert quant.drop_packs(q) == 1 and "_packed" not in q.__dict__
    assert quant.kernel_min_weights() == quant.KERNEL_MIN_WEIGHTS == 1 << 17  # the default, outside any context
    with torch.inference_mode(), quant.int8_kernel():  # a small matrix: fp32 from a float copy made once
        assert torch.allclose(q(x), -ref, atol=1e-5) and "_float" in q.__dict__ and "_packed" not in q.__dict__


@pytest.mark.skipif(not quant._KERNEL_OK, reason="this torch has no fbgemm dynamic quantized linear")
def test_int8_model_generates_close_to_dequantized(model, tok):
    from cpmant.compress.methods.quantize import quantize_model

    q = quantize_model(model).eval()
    batch = build_batch([[tok.bos_id, *tok.encode(p)] for p in PROMPTS], model.config, "cpu")
    with torch.inference_mode(), quant.int8_kernel(min_weights=0):  # the micro model's matrices through the kernel
        kern = q.inference(**batch)[0][:, -1].log_softmax(-1)
    with torch.inference_mode():
        deq = q.inference(**batch)[0][:, -1].log_softmax(-1)
    assert "_packed" in q.encoder.layers[0].self_att.self_attention.project_q.__dict__
    assert (kern - deq).abs().max().item() < 0.1  # log-probs over the whole vocab
    with quant.int8_kernel(min_weights=0):  # generate's own int8_kernel() keeps the enclosing threshold
        assert len(generate(q, tok, PROMPTS, max_new_tokens=4)) == 3
    assert "_fused" in q.encoder.layers[0].self_att.self_attention.project_q.__dict__  # decoding: fused q/k/v


# ---- MoE: only the routed experts ----------------------------------------------------------------------------------
def moe_model(tok, quantized: bool):
    from cpmant.compress.methods.quantize import quantize_model

    torch.manual_seed(1)
    m = build_model(micro_config(tok.vocab_size))
    for layer in m.encoder.layers:
        layer.ffn.ffn = MoEFeedForward.from_ffn(layer.ffn.ffn, 8, 2, torch.randn(8, 32))
    m.config = m.config.replace(moe_experts=8, moe_top_k=2)
    return (quantize_model(m) if quantized else m).eval()


def _float_weight(lin):
    w = lin.dequantized() if hasattr(lin, "weight_scale") else lin.weight.detach()
    return w * lin.scale


@pytest.mark.parametrize("quantized", [False, True])
def test_moe_runs_only_routed_experts_and_equals_dense(tok, quantized):
    m = moe_model(tok, quantized)
    ffn = m.encoder.layers[0].ffn.ffn
    x = torch.randn(1, 3, 32)  # 3 tokens x top 2: at most 6 of 8 experts
    ran = []
    real = ffn.w_in.w_0.forward_part
    ffn.w_in.w_0.forward_part = lambda xe, rows=None, cols=None: ran.append(rows.start // 8) or real(xe, rows, cols)
    try:
        with torch.inference_mode(), quant.int8_kernel():
            y = ffn(x)
    finally:
        del ffn.w_in.w_0.forward_part
    chosen = set(ffn.router(x).topk(2, dim=-1).indices.flatten().tolist())
    assert sorted(ran) == sorted(chosen) and len(ran) < 8
    w0, w1, wo = (_float_weight(lin) for lin in (ffn.w_in.w_0, ffn.w_in.w_1, ffn.w_out))
    with torch.no_grad():
        a = F.gelu(x @ w0.t()) * (x @ w1.t())
        a = (a.unflatten(-1, (8, -1)) * ffn.expert_mask(x)[..., None]).flatten(-2)
        ref = a @ wo.t()
    tol = 3 * INT8_TOL if quantized else 1e-5
    assert (y - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    # the whole model: generation runs the routed path and matches the dense one
    dense = copy.deepcopy(m)
    for layer in dense.encoder.layers:  # a hook makes the FFN take the dense path (as a wrapped Linear would)
        layer.ffn.ffn.w_out.register_forward_hook(lambda *a: None)
    if not quantized:
        assert generate_ids(m, tok, PROMPTS, max_new_tokens=8) == generate_ids(dense, tok, PROMPTS, max_new_tokens=8)


# ---- a delta (OpenDelta wraps the module's forward on the instance) through generate ---------------------------------
def test_wrapped_project_q_v_go_through_generate(model, tok):
    m = copy.deepcopy(model)
    base = generate_ids(m, tok, PROMPTS, max_new_tokens=8)
    torch.manual_seed(5)
    for layer in m.encoder.layers:
        att = layer.self_att.self_attention
        for name in ("project_q", "project_v"):
            lin = getattr(att, name)
            assert (lin.in_features, lin.out_features) == (lin.dim_in, lin.dim_out)
            delta = torch.randn(lin.dim_out, lin.dim_in) * 0.5
            orig = lin.forward
            lin.forward = lambda x, orig=orig, delta=delta: orig(x) + F.linear(x, delta)  # as OpenDelta's LoRA
    assert generate_ids(m, tok, PROMPTS, max_new_tokens=8) != base


# ---- the one-token decoding step (cpmant.decode) equals the module path ----------------------------------------
@pytest.mark.parametrize("kind", ["plain", "plain-large", "plain-unpacked", "plain-copies", "plain-1row", "int8", "int8-small", "moe", "wrapped"])
def test_one_token_step_equals_the_module_path(model, tok, kind):
    """int8: outside int8_kernel() (exact); int8-small: inside it, the micro model's matrices are under
    KERNEL_MIN_WEIGHTS, so the step multiplies float copies taken once per generation; plain-large: large matrices
    through oneDNN packs (decode.Packed), plain-unpacked: the same without packs (torch's mm on the weights),
    plain-copies: the same in a model under PACK_MIN_BYTES (stacked float copies); plain-1row: one row (batch 1
    takes views without transposes)."""
    import contextlib

    from cpmant.compress.methods.quantize import quantize_model

    m = {"plain": lambda: model, "plain-large": lambda: model, "plain-unpacked": lambda: model, "plain-copies": lambda: model, "plain-1row": lambda: model, "int8": lambda: quantize_model(model).eval(),
         "int8-small": lambda: quantize_model(model).eval(),
         "moe": lambda: moe_model(tok, False)}.get(kind, lambda: copy.deepcopy(model))()
    if kind == "wrapped":
        lin = m.encoder.layers[0].self_att.self_attention.project_v
        lin.forward = lambda x, orig=lin.forward: orig(x) * 1.5
    prompts = PROMPTS[:1] if kind == "plain-1row" else PROMPTS
    batch = build_batch([[tok.bos_id, *tok.encode(p)] for p in prompts], m.config, "cpu")
    T = batch["input"].size(1)
    state = {k: torch.cat([v, v[:, -1:] + (k == "position")], dim=1) for k, v in batch.items()
             if k not in ("input", "length")}
    state["length"] = torch.full((len(prompts),), T + 1)
    new = torch.tensor([[20], [21], [22]])[: len(prompts)]
    # plain-large: as if the matrices were large (a threshold of 0): their own weights, no stacked copies
    kernel = {"int8-small": quant.int8_kernel(), "plain-large": quant.int8_kernel(min_weights=0),
              "plain-unpacked": quant.int8_kernel(min_weights=0), "plain-copies": quant.int8_kernel(min_weights=0)}
    # the micro model packed as a model beyond the cache would be (plain-copies: as one under it)
    options = decode.decode_options(pack_fp32=kind != "plain-unpacked",
                                    pack_min_bytes=1 << 30 if kind == "plain-copies" else 0)
    with torch.inference_mode(), kernel.get(kind, contextlib.nullcontext()), options:
        outs = []
        for fast in (True, False):
            _, cache = m.inference(**batch, max_length=T + 1)
            bias = m.attention_bias(state["length"], state["context"], state["position"], state["segment"],
                                    state["span"], T) if fast else None
            outs.append(m.inference(new, past_key_values=cache, **state, bias=bias)[0])
            if fast:  # layer 0's plan: how its attention and FFN were computed
                plan = cache.step_plan.layers[0]
                packed = decode.Packed if quant._FP32_OK else decode.Plain
                want = {"plain": (decode.FloatCopies, decode.FloatCopies), "plain-large": (packed, packed),
                        "plain-unpacked": (decode.Plain, decode.Plain),
                        "plain-copies": (decode.FloatCopies, decode.FloatCopies),
                        "plain-1row": (decode.FloatCopies, decode.FloatCopies),
                        "int8": (decode.Int8, decode.Int8), "int8-small": (decode.FloatCopies, decode.FloatCopies),
                        "moe": (decode.FloatCopies, decode.Modules), "wrapped": (decode.Modules, decode.FloatCopies)}
                assert (type(plan.attention), type(plan.ffn)) == want[kind]
                if kind.startswith("plain-"):  # the tied table (600 x 32, large under a threshold of 0) packed too
                    assert (cache.step_plan.packed_head is not None) == (kind == "plain-large" and quant._FP32_OK)
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_a_wrapped_layer_makes_decoding_take_the_module_path(model, tok):
    """A scheduler that wraps a layer's forward (memory-budget streaming) must see every step: no fast path then."""
    m = copy.deepcopy(model)
    calls = []
    layer = m.encoder.layers[1]
    layer.forward = lambda *a, orig=layer.forward, **k: calls.append(1) or orig(*a, **k)
    assert generate_ids(m, tok, PROMPTS[:1], max_new_tokens=5, repetition_penalty=1.0) == generate_ids(
        model, tok, PROMPTS[:1], max_new_tokens=5, repetition_penalty=1.0)
    assert len(calls) >= 5  # the prompt, then each step after the first token


@pytest.mark.skipif(not quant._KERNEL_OK, reason="this torch has no fbgemm dynamic quantized linear")
def test_int8_models_decode_through_an_int8_table_close_to_the_fp32_one(model, tok):
    """An int8 model's one-token step projects onto the vocabulary through an int8 pack of the tied table, made once
    per model. Measured on the micro model (64 greedy tokens at batch 1): the int8 head's argmax equals the fp32
    table's on 62 of 63 decoding steps, its logits within 1% of their largest magnitude."""
    from cpmant.compress.methods.quantize import quantize_model

    torch.manual_seed(0)
    m = build_model(micro_config(tok.vocab_size).replace(position_bias_max_distance=256))
    m.load_state_dict(model.state_dict())
    q = quantize_model(m.eval()).eval()
    kw = dict(max_new_tokens=64, repetition_penalty=1.0)
    with quant.int8_kernel(min_weights=0):  # the micro table (600 x 32) through the kernel, as a large one would be
        ids = generate_ids(q, tok, PROMPTS[:1], **kw)[0]
        assert q.input_embedding in quant._TABLES  # the int8 head ran: its pack, made once
        with decode.decode_options(int8_head=False, pack_fp32=False):  # the reference: the modules' own fp32 math
            ref = generate_ids(q, tok, PROMPTS[:1], **kw)[0]
        # the final hidden states of the generated positions, from the model's own forward: the int8 head's logits
        # against the fp32 table's on each
        prompt = [tok.bos_id, *tok.encode(PROMPTS[0])]
        batch = build_batch([prompt + list(ids)], q.config, "cpu")
        with torch.no_grad():
            _, hidden = q(**{k: batch[k] for k in ("input", "length", "context", "position", "segment", "span")},
                          return_hidden=True)
            h = q.encoder.output_layernorm(hidden[-1])[0, len(prompt):len(prompt) + len(ids) - 1]
            y8, y32 = quant.table_logits(q.input_embedding, h), q.input_embedding.projection(h).float()
    assert len(h) == 63
    assert (y8.argmax(-1) == y32.argmax(-1)).float().mean().item() >= 0.95
    assert (y8 - y32).abs().max().item() <= 0.03 * y32.abs().max().item()
    assert sum(a == b for a, b in zip(ids, ref)) >= 0.9 * len(ref)  # the greedy tokens, position by position
    assert quant.drop_packs(q.input_embedding) == 1 and q.input_embedding not in quant._TABLES
    with torch.no_grad(), quant.int8_kernel(min_weights=0):
        assert decode._int8_head(q) and not decode._int8_head(m)  # an fp32 model keeps its fp32 table
        q.offload = object()  # a memory-budget plan does not count the pack: the fp32 table then
        assert not decode._int8_head(q)
    del q.offload
    with torch.no_grad(), quant.int8_kernel():  # the micro table is under the kernel's size threshold
        assert not decode._int8_head(q)
