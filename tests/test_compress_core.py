"""Compression core on tiny models: importance, slicing/pruning, int8 quantization, MoEfication, converters."""

import numpy as np
import pytest
import torch

from cpmant.checkpoint import WEIGHTS_FILE, load_model_dir, save_model_dir
from cpmant.compress.importance import (head_importance, lm_loss, neuron_importance, sublayer_importance,
                                        taylor_importance)
from cpmant.compress.methods import PruneConfig
from cpmant.compress.methods.moefy import balanced_kmeans, moefy
from cpmant.compress.methods.prune import align_heads, prune, slice_model
from cpmant.compress.methods.quantize import quantize_model
from cpmant.config import ModelConfig
from cpmant.convert import to_cpm_live, to_hf_config
from cpmant.errors import CpmantError
from cpmant.factory import build_model
from cpmant.model import CPMAnt, Linear
from cpmant.modules.moe import MoEFeedForward
from cpmant.modules.quant import QATLinear, QuantLinear, disable_qat, enable_qat, fake_quant_int8
from cpmant.training.data import PretrainStream

pytestmark = pytest.mark.unit

TINY = ModelConfig(vocab_size=100, dim_model=32, dim_ff=32, num_layers=3, num_heads=4, dim_head=8,
                   position_bias_num_buckets=16, position_bias_max_distance=64,
                   prompt_types=3, prompt_length=4, segment_types=3)
ATT = "encoder.layers.{}.self_att.self_attention."
FFN = "encoder.layers.{}.ffn.ffn."


def closed_form_count(c: ModelConfig) -> int:
    att, ffn = c.kept()
    D, HD = c.dim_model, c.num_heads * c.dim_head
    return (c.vocab_size * D + c.prompt_types * c.prompt_length * D + c.segment_types * D
            + (c.segment_types**2 + c.position_bias_num_buckets) * c.num_heads + D
            + att * (D + 4 * D * HD) + ffn * (D + 3 * D * c.dim_ff))


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, TINY.vocab_size, size=int(rng.integers(20, 60))) for _ in range(24)]
    stream = PretrainStream(docs, TINY, seq_len=48, bos=6, eos=7, min_piece_tokens=8, seed=0)
    return [stream.batch(range(i, i + 4)) for i in (0, 4)]


def make_model(config: ModelConfig = TINY, seed: int = 0) -> CPMAnt:
    torch.manual_seed(seed)
    return build_model(config).eval()


@torch.no_grad()
def logits(model, batches):
    model.eval()
    return torch.cat([model(**b.model_inputs()) for b in batches])


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


# ---- importance -------------------------------------------------------------------------------------
def test_lm_loss_is_token_mean_and_restores_mode(batches):
    m = make_model().train()
    loss = lm_loss(m, batches)
    assert m.training and np.isfinite(loss) and loss > 0
    with torch.no_grad():
        lg = torch.cat([m.eval()(**b.model_inputs()) for b in batches])
    t = torch.cat([b.target for b in batches])
    ref = torch.nn.functional.cross_entropy(lg.flatten(0, 1), t.flatten(), ignore_index=-100)
    assert abs(loss - ref.item()) < 1e-4


def test_sublayer_importance_ablation(batches):
    m = make_model(TINY.replace(mask_modules=((False, False), (False, True), (False, False))))
    with torch.no_grad():
        m.state_dict()[ATT.format(2) + "attention_out.weight"].zero_()  # this attention adds nothing
    before = {k: v.clone() for k, v in m.state_dict().items()}
    imp = sublayer_importance(m, batches)
    assert len(imp) == 3 and imp[1][1] is None  # already masked
    assert abs(imp[2][0]) < 1e-6
    assert all(abs(x) > 1e-4 for x in (imp[0][0], imp[0][1], imp[1][0], imp[2][1]))
    assert m.encoder.layers[2].self_att is not None and m.encoder.layers[0].ffn is not None  # restored
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_head_and_neuron_taylor_importance(batches):
    m = make_model(TINY.replace(mask_modules=((False, False), (True, False), (False, True))))
    Dh = TINY.dim_head
    with torch.no_grad():
        m.state_dict()[ATT.format(0) + "project_v.weight"][2 * Dh:3 * Dh] = 0  # head 2 of layer 0 outputs zeros
        m.state_dict()[FFN.format(1) + "w_out.weight"][:, 5] = 0  # neuron 5 of layer 1 feeds nothing
    h, f = head_importance(m, batches), neuron_importance(m, batches)
    assert h.shape == (3, 4) and f.shape == (3, 32)
    assert torch.isnan(h[1]).all() and torch.isnan(f[2]).all()  # masked sub-blocks
    assert h[0, 2] == 0 and int(h[0].argmin()) == 2 and (h[0, [0, 1, 3]] > 0).all() and (h[2] > 0).all()
    assert f[1, 5] == 0 and (f[1, torch.arange(32) != 5] > 0).all()
    assert all(p.grad is None for p in m.parameters())  # gates only
    h2, f2 = taylor_importance(m, batches)
    assert torch.equal(h2.nan_to_num(-1), h.nan_to_num(-1)) and torch.equal(f2.nan_to_num(-1), f.nan_to_num(-1))


# ---- slicing and pruning ----------------------------------------------------------------------------
def test_slice_everything_kept_is_identity(batches):
    m = make_model()
    s = slice_model(m, {0, 1, 2}, {0, 1, 2}, None, None)
    assert s.config == m.config and s is not m
    assert torch.equal(logits(s, batches), logits(m, batches))
    s.state_dict()["input_embedding.weight"].add_(1)  # a copy, not a view
    assert not torch.equal(s.state_dict()["input_embedding.weight"], m.state_dict()["input_embedding.weight"])


def test_slicing_zero_units_changes_nothing_and_shapes(batches):
    m = make_model()
    Dh, D = TINY.dim_head, TINY.dim_model
    drop_heads, drop_neurons = [1, 3], {0: [2, 7, 9, 30], 2: [0, 1, 5, 6]}
    with torch.no_grad():
        sd = m.state_dict()
        for i in range(3):
            for h in drop_heads:  # zero attention_out columns: the head adds nothing
                sd[ATT.format(i) + "attention_out.weight"][:, h * Dh:(h + 1) * Dh] = 0
        for i, js in drop_neurons.items():
            sd[FFN.format(i) + "w_out.weight"][:, js] = 0
        sd[FFN.format(1) + "w_out.weight"].zero_()  # FFN of layer 1 is a no-op
    keep_h = [0, 2]
    heads = [keep_h] * 3
    neurons = [sorted(set(range(32)) - set(drop_neurons.get(i, []))) for i in range(3)]
    neurons[1] = []
    s = slice_model(m, {0, 1, 2}, {0, 2}, heads, neurons)
    c = s.config
    assert (c.num_heads, c.dim_ff, c.mask_modules) == (2, 28, ((False, False), (False, True), (False, False)))
    sd2 = s.state_dict()
    for i in range(3):
        for n in "qkv":
            assert sd2[ATT.format(i) + f"project_{n}.weight"].shape == (2 * Dh, D)
        assert sd2[ATT.format(i) + "attention_out.weight"].shape == (D, 2 * Dh)
    for i in (0, 2):
        assert sd2[FFN.format(i) + "w_in.w_0.weight"].shape == (28, D)
        assert sd2[FFN.format(i) + "w_in.w_1.weight"].shape == (28, D)
        assert sd2[FFN.format(i) + "w_out.weight"].shape == (D, 28)
    assert not any(k.startswith("encoder.layers.1.ffn") for k in sd2)
    assert sd2["position_bias.relative_attention_bias"].shape == (9 + 16, 2)
    # exact rows, and the sqrt(new_in / old_in) rescale of the shrunk inputs
    q, q2 = sd[ATT.format(0) + "project_q.weight"], sd2[ATT.format(0) + "project_q.weight"]
    assert torch.equal(q2[Dh:], q[2 * Dh:3 * Dh])
    w, w2 = sd[FFN.format(0) + "w_out.weight"], sd2[FFN.format(0) + "w_out.weight"]
    assert close(w2[:, 0], w[:, 0] * (28 / 32) ** 0.5)
    assert s.num_parameters() == closed_form_count(c) < m.num_parameters()
    assert close(logits(s, batches), logits(m, batches), 1e-4)


def test_align_heads_shares_bias_columns():
    bias, ordered = align_heads([[0, 2], [2, 3], [1, 2]], {0, 1, 2}, 4)
    assert bias[0] == 2 and len(bias) == 2  # head 2 is kept everywhere: it owns a column
    assert all(o[0] == 2 for o in ordered)
    assert [sorted(o) for o in ordered] == [[0, 2], [2, 3], [1, 2]]
    with pytest.raises(CpmantError):
        align_heads([[0], [1, 2]], {0, 1}, 4)


def test_sliced_model_round_trips_and_is_smaller(batches, tmp_path):
    m = make_model()
    s = slice_model(m, {0, 2}, {1}, [[0, 1], [], [1, 3]], [[], list(range(0, 32, 2)), []])
    a = save_model_dir(tmp_path / "full", m.state_dict(), m.config, None)
    b = save_model_dir(tmp_path / "sliced", s.state_dict(), s.config, None)
    config, sd, _, meta = load_model_dir(b)
    assert config == s.config and meta["num_parameters"] == closed_form_count(config)
    r = CPMAnt(config)
    r.load_state_dict(sd, strict=True)
    assert torch.equal(logits(r, batches), logits(s, batches))
    assert (b / WEIGHTS_FILE).stat().st_size < 0.6 * (a / WEIGHTS_FILE).stat().st_size


def test_prune_picks_least_important_units(batches):
    m = make_model(TINY.replace(num_layers=4))
    Dh = TINY.dim_head
    with torch.no_grad():
        sd = m.state_dict()
        sd[FFN.format(2) + "w_out.weight"].zero_()  # a no-op FFN: ablation importance 0
        for i in range(4):
            sd[ATT.format(i) + "project_v.weight"][3 * Dh:] = 0  # head 3 is dead everywhere
            sd[FFN.format(i) + "w_out.weight"][:, [4, 11]] = 0  # neurons 4 and 11 are dead everywhere
    target = PruneConfig(att_keep=0.75, ffn_keep=0.75, heads_keep=0.75, dim_ff_keep=30 / 32).target_shape(m.config)
    assert target == {"att_layers": 3, "ffn_layers": 3, "num_heads": 3, "dim_ff": 30}
    loss_full = lm_loss(m, batches)
    p, rep = prune(m, target, batches)
    imp = rep["sublayer_importance"]
    assert abs(imp[2][1]) < 1e-6
    # a random model's sub-layers can have negative importance: the kept ones are the top 3 of what was measured
    assert rep["kept_att"] == sorted(sorted(range(4), key=lambda i: -imp[i][0])[:3])
    assert rep["kept_ffn"] == sorted(sorted(range(4), key=lambda i: -imp[i][1])[:3])
    ka, kf = set(rep["kept_att"]), set(rep["kept_ffn"])
    assert [h == [] for h in rep["heads"]] == [i not in ka for i in range(4)]
    assert all(sorted(h) == [0, 1, 2] for h in rep["heads"] if h)  # dead head 3 goes first
    assert (p.config.num_heads, p.config.dim_ff) == (3, 30)
    assert p.config.mask_modules == tuple((i not in ka, i not in kf) for i in range(4))
    assert rep["params_before"] == m.num_parameters() and rep["params_after"] == p.num_parameters()
    assert rep["params_after"] == closed_form_count(p.config)
    assert rep["loss_before"] == pytest.approx(loss_full) and rep["loss_after"] == pytest.approx(lm_loss(p, batches))
    # the dead heads and neurons change nothing: the pruned model equals the model with only the sub-layers removed
    ref = slice_model(m, ka, kf)
    assert close(logits(p, batches), logits(ref, batches), 1e-4)


# ---- int8 -------------------------------------------------------------------------------------------
def test_quantize_close_and_round_trip(batches, tmp_path):
    m = make_model(TINY.replace(mask_modules=((False, False), (True, False), (False, False))))
    q = quantize_model(m)
    assert q.config.quantization == "int8" and m.config.quantization is None
    assert not any(isinstance(x, Linear) for x in q.encoder.modules())
    assert sum(isinstance(x, QuantLinear) for x in q.encoder.modules()) == 3 * 7 - 4
    sd = q.state_dict()
    w, s = sd[ATT.format(0) + "project_q.weight"], sd[ATT.format(0) + "project_q.weight_scale"]
    assert w.dtype == torch.int8 and w.shape == (32, 32) and s.dtype == torch.float32 and s.shape == (32,)
    assert int(w.abs().max()) == 127 and sd["input_embedding.weight"].dtype == torch.float32
    ref, out = logits(m, batches), logits(q, batches)
    assert (out - ref).norm() / ref.norm() < 0.02
    a = save_model_dir(tmp_path / "fp", m.state_dict(), m.config, None)
    b = save_model_dir(tmp_path / "q", sd, q.config, None)
    config, sd2, _, _ = load_model_dir(b)
    r = build_model(config)
    r.load_state_dict(sd2, strict=True)
    assert torch.equal(logits(r, batches), out)
    lin = [k for k in sd if k.endswith(".weight") and k.startswith("encoder.layers.") and "layernorm" not in k]
    fp_bytes = sum(m.state_dict()[k].nbytes for k in lin)
    q_bytes = sum(sd[k].nbytes + sd[k + "_scale"].nbytes for k in lin)
    assert fp_bytes / q_bytes == pytest.approx(4 * 32 / 36)  # 4x on the weights, plus one fp32 scale per row
    saved = (a / WEIGHTS_FILE).stat().st_size - (b / WEIGHTS_FILE).stat().st_size
    assert saved >= 0.9 * (fp_bytes - q_bytes)


def test_qat_fake_quant_matches_int8_and_passes_gradients(batches):
    w = torch.randn(6, 10, requires_grad=True)
    fq = fake_quant_int8(w)
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight through
    grid = fq / (w.abs().amax(1, keepdim=True) / 127)  # on the int8 grid
    assert (grid.round() - grid).abs().max() < 1e-3 and grid.abs().max() <= 127 + 1e-3
    m = make_model()
    params = {k: id(v) for k, v in m.named_parameters()}
    keys = set(m.state_dict())
    assert enable_qat(m) == 21
    assert {k: id(v) for k, v in m.named_parameters()} == params and set(m.state_dict()) == keys
    assert close(logits(m, batches), logits(quantize_model(m), batches), 1e-4)
    m.train()
    m(**batches[0].model_inputs()).sum().backward()
    assert m.encoder.layers[0].ffn.ffn.w_out.weight.grad is not None
    assert disable_qat(m) == 21 and not any(isinstance(x, QATLinear) for x in m.modules())


# ---- MoEfication ------------------------------------------------------------------------------------
def test_balanced_kmeans_equal_sizes_and_separates():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 8) * 10
    x = torch.cat([centers[c] + torch.randn(6, 8, generator=g) for c in range(4)])
    labels = balanced_kmeans(x, 4)
    assert torch.bincount(labels).tolist() == [6, 6, 6, 6]
    assert all(len(set(labels[c * 6:(c + 1) * 6].tolist())) == 1 for c in range(4))


@pytest.mark.parametrize("cluster", ["activation", "weight"])
def test_moefy_full_top_k_is_dense(batches, cluster):
    m = make_model(TINY.replace(mask_modules=((False, False), (False, True), (False, False))))
    e, rep = moefy(m, batches, num_experts=4, top_k=4, cluster=cluster)
    assert (e.config.moe_experts, e.config.moe_top_k) == (4, 4) and m.config.moe_experts is None
    assert rep["ffn_compute_saved"] == 0 and abs(rep["loss_change"]) < 1e-4
    assert close(logits(e, batches), logits(m, batches), 1e-4)
    assert e.state_dict()[FFN.format(0) + "router.weight"].shape == (4, 32)
    assert FFN.format(1) + "router.weight" not in e.state_dict()


def test_moefy_top_k_sparse_and_round_trip(batches, tmp_path):
    m = make_model()
    e, rep = moefy(m, batches, num_experts=4, top_k=1)
    assert rep["ffn_compute_saved"] == 0.75 and rep["loss_after"] == pytest.approx(lm_loss(e, batches))
    assert rep["loss_change"] == pytest.approx(rep["loss_after"] - rep["loss_before"])
    seen = []
    ffn = e.encoder.layers[0].ffn.ffn
    assert isinstance(ffn, MoEFeedForward)
    h = ffn.w_out.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    logits(e, batches[:1])
    h.remove()
    used = (seen[0].unflatten(-1, (4, 8)) != 0).any(-1).sum(-1)  # experts with any non-zero activation per token
    assert used.max() == 1
    # the router is the mean of each expert's (contiguous) w_0 rows
    w0 = e.state_dict()[FFN.format(0) + "w_in.w_0.weight"]
    assert close(e.state_dict()[FFN.format(0) + "router.weight"], w0.view(4, 8, 32).mean(1))
    # the same neurons as the dense model, permuted
    assert torch.equal(w0.sort(0).values, m.state_dict()[FFN.format(0) + "w_in.w_0.weight"].sort(0).values)
    d = save_model_dir(tmp_path / "moe", e.state_dict(), e.config, None)
    config, sd, _, _ = load_model_dir(d)
    r = build_model(config)
    r.load_state_dict(sd, strict=True)
    assert torch.equal(logits(r, batches), logits(e, batches))
    with pytest.raises(CpmantError):
        moefy(m, batches, num_experts=5, top_k=1)  # 32 neurons do not split into 5 experts


def test_quantized_moe_round_trip(batches, tmp_path):
    m = make_model()
    qe = quantize_model(moefy(m, batches, 4, 2)[0])
    eq, _ = moefy(quantize_model(m), batches, 4, 2)
    for model in (qe, eq):
        assert model.config.quantization == "int8" and model.config.moe_experts == 4
        d = save_model_dir(tmp_path / f"m{id(model)}", model.state_dict(), model.config, None)
        config, sd, _, _ = load_model_dir(d)
        r = build_model(config)
        r.load_state_dict(sd, strict=True)
        assert torch.equal(logits(r, batches), logits(model, batches))


def test_compressed_models_refuse_pruning_and_conversion(batches, tmp_path):
    m = make_model()
    q = quantize_model(m)
    e, _ = moefy(m, batches, 4, 2)
    for model in (q, e):
        with pytest.raises(CpmantError, match="cannot be converted"):
            to_hf_config(model.config)
        with pytest.raises(CpmantError, match="cannot be converted"):
            to_cpm_live(model.state_dict(), model.config, tmp_path / "live")
        with pytest.raises(CpmantError):
            slice_model(model, {0}, {0})
    assert not (tmp_path / "live").exists()
