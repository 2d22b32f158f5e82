"""Memory-budget inference (BMInf's idea on any machine, cpmant.offload): peak memory measurement, size parsing,
layers streamed from the memory-mapped checkpoint giving the fully loaded model's greedy tokens, and the errors."""

from __future__ import annotations

import re

import pytest
import torch

from cpmant.errors import CpmantError

pytestmark = pytest.mark.unit

TEXTS = ["床前明月光", "白日依山尽，黄河入海流"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save(folder, fixture_corpus, seed=0, **dims):
    """A random CPM-Ant checkpoint folder with a real vocab (fixture corpus)."""
    from cpmant.checkpoint import save_model_dir
    from cpmant.config import ModelConfig
    from cpmant.factory import build_model
    from cpmant.tokenizer import build_vocab

    texts = [ln for f in sorted(fixture_corpus.glob("*.txt")) for ln in f.read_text(encoding="utf-8").splitlines()
             if ln.strip()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(texts, 600, folder.parent / f"{folder.name}-vocab.txt")
    n = len(vocab.read_text(encoding="utf-8").splitlines())
    cfg = ModelConfig(vocab_size=n, position_bias_num_buckets=16, position_bias_max_distance=256, **dims)
    torch.manual_seed(seed)
    m = build_model(cfg)
    with torch.no_grad():  # N(0, 1) everywhere gives one-hot outputs; soften for livelier greedy paths
        m.input_embedding.weight.mul_(0.2)
    save_model_dir(folder, m.state_dict(), cfg, vocab)
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory, fixture_corpus):
    """6 layers of d64: 1.4 MiB of weights."""
    return _save(tmp_path_factory.mktemp("offload") / "small", fixture_corpus, dim_model=64, dim_ff=128,
                 num_layers=6, num_heads=2, dim_head=32)


def _least(folder, int8=False) -> int:
    """The smallest budget the plan takes for the model in `folder` (from the error of a 1-byte budget)."""
    from cpmant.offload import load_with_budget, parse_size

    with pytest.raises(CpmantError, match="too small for this model") as e:
        load_with_budget(folder, 1, int8=int8)
    return parse_size(re.search(r"--memory-budget (\S+) or more", e.value.fix).group(1))


def _greedy(model, tok, n=12):
    from cpmant.generate import generate_ids

    return generate_ids(model, tok, TEXTS, max_new_tokens=n, temperature=0.0, repetition_penalty=1.3)


# ---- PeakMemory -------------------------------------------------------------------------------------------------
def test_peak_memory_sees_a_100mb_tensor():
    from cpmant.memory import PeakMemory

    with PeakMemory() as pm:
        t = torch.ones(100 * 1024 * 1024 // 4)  # 100 MiB, touched
        del t
    assert 95 <= pm.peak_mb < 400
    assert pm.samples >= 1
    assert pm.cuda_peak_mb is None or pm.cuda_peak_mb >= 0
    with PeakMemory() as idle:
        sum(range(1000))
    assert idle.peak_mb < 20


# ---- sizes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,n", [("64MB", 64 * 2**20), ("1.5GB", int(1.5 * 2**30)), ("512KiB", 512 * 1024),
                                    ("1048576", 2**20), (" 2 gb ", 2 * 2**30), ("10M", 10 * 2**20), (4096, 4096)])
def test_parse_size(text, n):
    from cpmant.offload import parse_size

    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "MB", "12QB", "-5MB", "0", "0MB", "1e3MB", "64 M B", "lots"])
def test_parse_size_rejects(text):
    from cpmant.offload import parse_size

    with pytest.raises(CpmantError, match="memory size") as e:
        parse_size(text)
    assert e.value.fix


# ---- streaming gives the same tokens --------------------------------------------------------------------------
def test_streamed_layers_generate_the_fully_loaded_models_greedy_tokens(small):
    from cpmant.checkpoint import load_pretrained
    from cpmant.offload import load_with_budget

    full, tok = load_pretrained(small)
    ref = _greedy(full, tok)
    assert any(len(set(r)) > 2 for r in ref)  # a lively path, not one token repeated
    seen = set()
    least, layer = _least(small), (small / "model.safetensors").stat().st_size // 8
    for budget in (least, least + 2 * layer, 2**30):  # all 6 streamed, some, none
        model, tok2 = load_with_budget(small, budget)
        plan = model.offload
        seen.add(len(plan.streamed))
        assert plan.resident == list(range(len(plan.resident)))
        assert plan.planned_bytes + plan.headroom_bytes <= budget
        assert _greedy(model, tok2) == ref, budget
        s = model.offload_streamer
        if plan.streamed:
            # every streamed layer was loaded at least once per forward pass (13 passes: prompt + 12 tokens)
            assert s.loads >= len(plan.streamed) * 12
        else:
            assert s is None
    assert seen == {6, 0} | (seen - {6, 0}) and len(seen) == 3


def test_int8_streaming_equals_the_int8_model(small):
    from cpmant.checkpoint import load_pretrained
    from cpmant.modules.quant import swap_in_quant_linears
    from cpmant.offload import load_with_budget

    ref_model, tok = load_pretrained(small)
    swap_in_quant_linears(ref_model, from_weights=True)  # the same int8_per_row, held in memory
    ref = _greedy(ref_model, tok)
    model, tok2 = load_with_budget(small, _least(small, int8=True), int8=True)
    assert model.offload.int8 and model.offload.streamed
    assert model.offload.weights_bytes < 0.6 * (small / "model.safetensors").stat().st_size
    assert _greedy(model, tok2) == ref


def test_peak_memory_stays_within_the_budget(tmp_path, fixture_corpus):
    """A 12-layer d256 model (50 MiB) under 60% of its weights: the peak RSS above the baseline (sampled every
    2 ms, measured as `cpmant generate` measures it: cpmant.offload.peak.budget_peak) stays within the budget; the
    fully loaded model's peak is well above it."""
    from cpmant.checkpoint import load_pretrained
    from cpmant.memory import PeakMemory
    from cpmant.offload import load_with_budget
    from cpmant.offload.peak import budget_peak

    folder = _save(tmp_path / "mid", fixture_corpus, dim_model=256, dim_ff=1024, num_layers=12, num_heads=4,
                   dim_head=64)
    weights = (folder / "model.safetensors").stat().st_size
    _greedy(*load_with_budget(folder, None), n=2)  # jieba's first use before the baseline
    budget = weights * 3 // 5
    with budget_peak(folder) as pm:
        model, tok = load_with_budget(folder, budget, rows=len(TEXTS), tokens=len(TEXTS[1]) + 9)
        out = _greedy(model, tok, n=8)
    assert model.offload.streamed and len(model.offload.resident) >= 1
    assert pm.peak_mb <= budget / 2**20, (pm.peak_mb, budget / 2**20)
    del model
    with PeakMemory() as full_pm:
        full, tok = load_pretrained(folder)
        assert _greedy(full, tok, n=8) == out
    assert full_pm.peak_mb > budget / 2**20 + 8  # the measurement sees a model over the budget


# ---- errors -----------------------------------------------------------------------------------------------------
def test_too_small_a_budget_says_the_least_that_works(small):
    from cpmant.offload import load_with_budget, parse_size

    with pytest.raises(CpmantError, match="too small for this model") as e:
        load_with_budget(small, 100 * 1024)
    least = re.search(r"--memory-budget (\S+) or more", e.value.fix).group(1)
    model, _ = load_with_budget(small, parse_size(least))  # the advice works
    assert len(model.offload.resident) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bminf_without_cuda_is_one_clear_error(small):
    from cpmant.offload import load_for_inference

    with pytest.raises(CpmantError, match="bminf needs CUDA") as e:
        load_for_inference(small, 64 * 2**20, backend="bminf")
    assert "--backend torch" in e.value.fix
    with pytest.raises(CpmantError, match="no CUDA device"):
        load_for_inference(small, 64 * 2**20, device="cuda")


def test_cli_streams_with_a_memory_budget(small, capsys):
    from cpmant.checkpoint import load_pretrained
    from cpmant.generate import generate
    from cpmant_cli.main import main

    full, tok = load_pretrained(small)
    want = generate(full, tok, [TEXTS[0]], max_new_tokens=6)[0]
    args = ["generate", str(small), TEXTS[0], "--max-new-tokens", "6", "--stream", "--memory-budget"]
    assert main(args + ["1KB"]) == 2  # too small: the error names the smallest budget for these lengths
    least = re.search(r"--memory-budget (\S+) or more", capsys.readouterr().err).group(1)
    assert main(args + [least]) == 0
    cap = capsys.readouterr()
    assert cap.out == TEXTS[0] + want + "\n"
    assert "layers resident" in cap.err and "6 streamed" in cap.err and "peak resident memory" in cap.err
    assert main(["generate", str(small), TEXTS[0], "--memory-budget", "12QB"]) == 2
    assert "cannot read the memory size" in capsys.readouterr().err


# ---- the plan counts what it keeps (issue 19) -------------------------------------------------------------------
def test_activation_headroom_is_computed_from_the_lengths():
    from cpmant.config import ModelConfig
    from cpmant.offload.plan import activation_bytes

    cfg = ModelConfig(vocab_size=100, dim_model=64, dim_ff=128, num_layers=3, num_heads=2, dim_head=32,
                      prompt_length=4, position_bias_num_buckets=16, position_bias_max_distance=256)
    T = 10 + 4  # tokens + prompt positions
    kv = 2 * 3 * 2 * T * 64  # k and v, 3 layers, 2 rows, T positions, 2 heads x 32
    prefill = 2 * T * (4 * 64 + 3 * 64 + 3 * 128) + 3 * 2 * 2 * T * T
    want = 4 * (kv + prefill + 3 * 2 * 100 + 2 * 2 * T * T)
    assert activation_bytes(cfg, rows=2, tokens=10) == want
    assert activation_bytes(cfg, rows=2, tokens=20) > want  # longer generations hold more


def test_plan_counts_int8_caches_and_names_the_smallest_budget():
    from types import SimpleNamespace

    from cpmant.offload.mapped import _Entry
    from cpmant.offload.plan import make_plan

    MiB = 2**20
    index = {"input_embedding.weight": _Entry(torch.int8, (MiB,), 0, MiB)}
    for i in range(4):  # 4 layers of 2 MiB
        index[f"encoder.layers.{i}.w"] = _Entry(torch.int8, (2 * MiB,), (1 + 2 * i) * MiB, (3 + 2 * i) * MiB)
    caches = SimpleNamespace(full=[3 * MiB] * 4, resident=[MiB] * 4, streamed=[MiB // 2] * 4)
    kw = dict(int8=True, device="cpu", headroom_bytes=3 * MiB)
    no_caches = make_plan(index, 4, 12 * MiB, caches=None, **kw)
    plan = make_plan(index, 4, 12 * MiB, caches=caches, **kw)
    # without caches all 4 fit: 1 + 8 + 3 = 12; with them 1: 1 + 2 + 1 (its cache) + 4.5 (the ring and the caches
    # of the streamed layer computing) + 3 = 11.5, where 2 would need 14.5 and all 4 (packs kept) 24
    assert len(no_caches.resident) == 4 and len(plan.resident) == 1
    assert plan.planned_bytes + plan.headroom_bytes == int(11.5 * MiB)
    assert plan.ring_bytes == int(4.5 * MiB) and plan.resident_cache_bytes == MiB
    everything = make_plan(index, 4, 21 * MiB, caches=caches, **kw)  # all 4 with packs kept: 1 + 8 + 12 + 3 = 24
    assert len(everything.resident) == 3 and everything.streamed == [3]
    assert len(make_plan(index, 4, 24 * MiB, caches=caches, **kw).resident) == 4
    with pytest.raises(CpmantError, match="too small") as e:  # every layer streamed: 1 + 4 + 0.5 + 3 = 8.5 MiB
        make_plan(index, 4, 8 * MiB, caches=caches, **kw)
    assert "8.5 MiB" in str(e.value) and "--memory-budget 8704KB or more" in e.value.fix
    assert make_plan(index, 4, 8704 * 1024, caches=caches, **kw).resident == []  # the smallest it names works
