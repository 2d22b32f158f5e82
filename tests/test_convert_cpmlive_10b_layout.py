"""The published CPM-Ant 10B reaches the memory-budget path: a small checkpoint laid out as CPM-Live releases the 10B
(`cpm-ant-10b.pt`, one torch.save'd state dict of fp16 tensors under CPM-Live's own key names, beside its config JSON
`cpm-ant-10b.json`: the names CPM-Live's README and text_generation.py load) goes through `cpmant convert SRC DST
--to cpmant` (the console script) and generates through `load_with_budget(..., int8=True)` under a budget smaller
than its weights, giving the tokens and logits of the same weights held in memory."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit

# CPM-Live's config/cpm-ant-10b.json with small widths (every key of the released file, same spelling)
CONFIG = {"vocab_size": 600, "dim_model": 512, "dim_ff": 1024, "num_layers": 12, "num_heads": 8, "dim_head": 64,
          "dropout_p": 0.0, "position_bias_num_buckets": 32, "position_bias_max_distance": 256, "eps": 1e-6,
          "half": True, "prompt_types": 32, "prompt_length": 32, "segment_types": 32}
TEXTS = ["床前明月光", "白日依山尽，黄河入海流"]


def cpm_live_state_dict(c: dict) -> OrderedDict:
    """The state dict CPM-Live's CPMAnt saves (bmt.save: no wrapper prefix), written out from its module tree
    rather than from our model, random fp16 values (Linear weights N(0, 1) as CPM-Live initialises them)."""
    D, F, HD = c["dim_model"], c["dim_ff"], c["num_heads"] * c["dim_head"]
    g = torch.Generator().manual_seed(0)
    shapes = {"input_embedding.weight": (c["vocab_size"], D),
              "prompt_embedding.weight": (c["prompt_types"] * c["prompt_length"], D),
              "segment_embedding.weight": (c["segment_types"], D),
              "position_bias.relative_attention_bias": (c["segment_types"] ** 2 + c["position_bias_num_buckets"],
                                                        c["num_heads"])}
    for i in range(c["num_layers"]):
        p = f"encoder.layers.{i}."
        shapes |= {p + "self_att.layernorm_before_attention.weight": (D,),
                   p + "self_att.self_attention.project_q.weight": (HD, D),
                   p + "self_att.self_attention.project_k.weight": (HD, D),
                   p + "self_att.self_attention.project_v.weight": (HD, D),
                   p + "self_att.self_attention.attention_out.weight": (D, HD),
                   p + "ffn.layernorm_before_ffn.weight": (D,),
                   p + "ffn.ffn.w_in.w_0.weight": (F, D),
                   p + "ffn.ffn.w_in.w_1.weight": (F, D),
                   p + "ffn.ffn.w_out.weight": (D, F)}
    shapes["encoder.output_layernorm.weight"] = (D,)
    sd = OrderedDict()
    for name, shape in shapes.items():
        t = torch.ones(shape) if "layernorm" in name else torch.randn(shape, generator=g)
        if name == "input_embedding.weight":
            t = t * 0.2  # N(0, 1) everywhere gives one-hot outputs; a livelier greedy path tests more
        sd[name] = t.half()
    return sd


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixture_corpus):
    """(CPM-Live folder, converted cpmant folder), converted by the console script."""
    from cpmant.tokenizer import build_vocab

    root = tmp_path_factory.mktemp("cpmlive10b")
    src = root / "cpm_live_10B"  # the released zip's folder name
    src.mkdir()
    torch.save(cpm_live_state_dict(CONFIG), src / "cpm-ant-10b.pt")
    (src / "cpm-ant-10b.json").write_text(json.dumps(CONFIG, indent=4), encoding="utf-8")
    # CPM-Live ships its vocab inside its package (cpm_live/vocabs/ant.txt): the user copies it beside as vocab.txt
    texts = [ln for f in sorted(fixture_corpus.glob("*.txt")) for ln in f.read_text(encoding="utf-8").splitlines()
             if ln.strip()]
    build_vocab(texts, CONFIG["vocab_size"], src / "vocab.txt")
    dst = root / "converted"
    cli = Path(sys.executable).parent / "cpmant"
    res = subprocess.run([str(cli), "convert", str(src), str(dst), "--to", "cpmant"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"wrote cpmant checkpoint to {dst}" in res.stdout
    return src, dst


def _greedy(model, tok):
    from cpmant.generate import generate_ids

    return generate_ids(model, tok, TEXTS, max_new_tokens=8, temperature=0.0, repetition_penalty=1.3)


def _logits(model, tok, kernel: bool = True):
    """The last position's logits of TEXTS[1] (all context): inside the int8 kernel as generation computes them, or
    through the plain forward (int8 weights dequantized: the stored model exactly)."""
    from cpmant.modules.quant import int8_kernel

    ids = torch.tensor([[6] + tok.encode(TEXTS[1])])
    L = ids.size(1)
    z = torch.zeros_like(ids)
    with torch.no_grad(), int8_kernel(enabled=kernel):
        return model(ids, torch.tensor([L]), torch.ones_like(ids, dtype=torch.bool), torch.arange(L)[None], z + 2,
                     z)[0, -1]


def test_cpm_live_10b_layout_converts_and_streams_in_int8(converted):
    from cpmant.checkpoint import read_meta
    from cpmant.config import ModelConfig
    from cpmant.factory import build_model
    from cpmant.modules.quant import swap_in_quant_linears
    from cpmant.offload import load_for_inference, load_with_budget, read_safetensors_index
    from cpmant.offload.unpacked import use_unpacked_kernel
    from cpmant.tokenizer import CPMAntTokenizer

    src, dst = converted
    meta = read_meta(dst)
    assert meta["converted_from"]["format"] == "cpm-live"
    index = read_safetensors_index(dst / "model.safetensors")
    saved = torch.load(src / "cpm-ant-10b.pt", weights_only=True)
    assert set(index) == set(saved) and {e.dtype for e in index.values()} == {torch.float16}  # same names, fp16 kept

    resident, _ = load_for_inference(dst, None, int8=True)  # the converted folder, int8, nothing streamed
    assert resident.offload.int8 and resident.offload.streamed == []
    budget = resident.offload.weights_bytes * 17 // 20  # smaller than the int8 weights: most layers stream
    model, tok = load_with_budget(dst, budget, int8=True)
    plan = model.offload
    assert plan.int8 and len(plan.streamed) >= CONFIG["num_layers"] // 2
    assert plan.planned_bytes + plan.headroom_bytes <= budget < plan.weights_bytes

    # the reference: CPM-Live's own file read straight into our model, quantized in memory, every layer resident,
    # its large int8 matrices multiplied by the same kernel as the streamed ones (cpmant.offload.unpacked)
    ref = build_model(ModelConfig.from_dict(dict(CONFIG)), dtype=torch.float32)
    ref.load_state_dict({k: v.float() for k, v in saved.items()})
    swap_in_quant_linears(ref, from_weights=True)
    assert use_unpacked_kernel(ref, SimpleNamespace(streamed=list(range(CONFIG["num_layers"])), resident=[])) > 0
    assert plan.extra["unpacked_linears"] > 0
    ref.eval()
    ref_tok = CPMAntTokenizer(src / "vocab.txt")
    want = _greedy(ref, ref_tok)
    assert any(len(set(r)) > 2 for r in want)  # a lively path, not one token repeated
    assert _greedy(model, tok) == want
    assert model.offload_streamer.loads >= len(plan.streamed) * 8
    assert torch.equal(_logits(model, tok), _logits(ref, ref_tok))
    # the stored int8 model exactly (plain forward): streamed = every layer resident = CPM-Live's weights quantized
    plain = _logits(model, tok, kernel=False)
    assert torch.equal(plain, _logits(resident, tok, kernel=False))
    assert torch.equal(plain, _logits(ref, ref_tok, kernel=False))


@pytest.mark.parametrize("rows", [1, 5, 20])  # one call; several calls of 3 rows; an aligned copy
def test_unpacked_kernel_multiplies_a_misaligned_int8_view_as_the_dequantized_weight(rows):
    """UnpackedQuantLinear on a weight that is a view at an 8-byte offset (as in the mapped file): within 3% of the
    exact product of the int8 weight (bf16 activations: about 0.3%; fbgemm without bf16 and VNNI: about 2%), and no
    crash for several rows (the prompt)."""
    from cpmant.modules.quant import QuantLinear, int8_kernel
    from cpmant.offload.unpacked import UnpackedQuantLinear

    g = torch.Generator().manual_seed(1)
    lin = QuantLinear(512, 384)
    buf = torch.empty(512 * 384 + 64, dtype=torch.int8).random_(-127, 128, generator=g)
    off = (8 - buf.data_ptr()) % 64 or 8
    lin.weight = buf[off:off + 512 * 384].view(384, 512)
    assert lin.weight.data_ptr() % 64
    lin.weight_scale = torch.rand(384, generator=g) * 0.02
    lin.__class__ = UnpackedQuantLinear
    x = torch.randn(rows, 512, generator=g)
    exact = torch.nn.functional.linear(x, lin.dequantized()) * lin.scale
    with torch.no_grad(), int8_kernel():
        got = lin(x)
    assert got.shape == exact.shape and (got - exact).norm() / exact.norm() < 0.03
