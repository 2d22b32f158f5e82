"""Generation: greedy determinism, beam search with one beam equals greedy, seeded sampling, first-step bans,
batching equals one at a time, left truncation."""

import pytest
import torch

from cpmant.config import ModelConfig
from cpmant.errors import CpmantError
from cpmant.generate import _beam_loop, _sample_loop, build_batch, encode_inputs, generate
from cpmant.model import CPMAnt, build_model

pytestmark = pytest.mark.unit

CFG = ModelConfig(
    vocab_size=64, dim_model=32, dim_ff=48, num_layers=2, num_heads=2, dim_head=16,
    position_bias_num_buckets=16, position_bias_max_distance=40, prompt_types=4, prompt_length=4, segment_types=4,
)


class FakeTokenizer:
    """Characters a..z are ids 10..35; specials as CPM-Ant's; decode gives one character per id."""

    pad_id, unk_id, mask_id, sep_id, newline_id, space_id, bos_id, eos_id = range(8)
    vocab_size = CFG.vocab_size

    def encode(self, text):
        return [10 + ord(ch) - ord("a") if "a" <= ch <= "z" else self.unk_id for ch in text]

    def decode(self, ids):
        out = []
        for i in ids:
            i = int(i)
            if i in (self.pad_id, self.bos_id, self.eos_id):
                continue
            out.append("\n" if i == self.newline_id else chr(ord("a") + i - 10) if 10 <= i < 36 else chr(0x4E00 + i))
        return "".join(out)


TEXTS = ["hello world", "abc", "the quick brown fox"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(CFG)
    with torch.no_grad():  # N(0, 1) everywhere gives near one-hot outputs; soften for a livelier distribution
        m.input_embedding.weight.mul_(0.2)
    return m.eval()


@pytest.fixture(scope="module")
def tok():
    return FakeTokenizer()


def test_greedy_is_deterministic_and_returns_text(model, tok):
    a = generate(model, tok, TEXTS, max_new_tokens=8)
    b = generate(model, tok, TEXTS, max_new_tokens=8)
    assert a == b and len(a) == 3 and all(isinstance(s, str) for s in a)
    assert any(len(s) > 0 for s in a)


def test_batch_equals_one_at_a_time(model, tok):
    batched = generate(model, tok, TEXTS, max_new_tokens=8)
    assert batched == [generate(model, tok, [t], max_new_tokens=8)[0] for t in TEXTS]


def test_beam_one_equals_greedy(model, tok):
    batch = build_batch(encode_inputs(tok, TEXTS, CFG, 10), CFG, "cpu")
    greedy = _sample_loop(model, tok, batch, 10, 0.0, 0, 1.0, 1.2, None)
    beam = _beam_loop(model, tok, batch, 10, num_beams=1, repetition_penalty=1.2)
    assert beam == greedy
    assert generate(model, tok, TEXTS, max_new_tokens=10, num_beams=1) == [tok.decode(x) for x in greedy]


def test_beam_search_runs_and_is_deterministic(model, tok):
    a = generate(model, tok, TEXTS, max_new_tokens=6, num_beams=3)
    assert a == generate(model, tok, TEXTS, max_new_tokens=6, num_beams=3) and len(a) == 3
    with pytest.raises(CpmantError):
        generate(model, tok, TEXTS, num_beams=2, temperature=0.7)


def test_sampling_with_seed_is_reproducible(model, tok):
    kw = dict(max_new_tokens=10, temperature=1.5, top_k=20, top_p=0.95)
    a = generate(model, tok, TEXTS, seed=7, **kw)
    assert a == generate(model, tok, TEXTS, seed=7, **kw)
    others = {tuple(generate(model, tok, TEXTS, seed=s, **kw)) for s in range(8, 12)}
    assert len(others | {tuple(a)}) > 1


class FavoursEos(CPMAnt):
    """The same network with </s> and newline made the favourites (a subclass, no patching)."""

    def inference(self, *args, **kwargs):
        logits, past = super().inference(*args, **kwargs)
        logits[..., FakeTokenizer.eos_id] += 1e4
        logits[..., FakeTokenizer.newline_id] += 5e3
        return logits, past


def test_first_step_never_emits_eos_or_newline_and_eos_stops(model, tok):
    fav = FavoursEos(CFG)
    fav.load_state_dict(model.state_dict())
    fav.eval()
    batch = build_batch(encode_inputs(tok, TEXTS, CFG, 5), CFG, "cpu")
    for seed in range(3):
        ids = _sample_loop(fav, tok, batch, 5, 1.0, 0, 1.0, 1.2, torch.Generator().manual_seed(seed))
        assert all(len(x) == 1 and x[0] not in (tok.eos_id, tok.newline_id) for x in ids)  # then </s> stops it
    out = generate(fav, tok, TEXTS, max_new_tokens=5)
    assert all(len(s) == 1 and s != "\n" for s in out)
    for x in _beam_loop(fav, tok, batch, 5, num_beams=2, repetition_penalty=1.2):
        assert len(x) == 1 and x[0] not in (tok.eos_id, tok.newline_id)


def test_long_input_is_truncated_from_the_left(model, tok):
    text = "abcdefghijklmnopqrstuvwxyz" * 3
    with pytest.warns(UserWarning, match="truncated"):
        rows = encode_inputs(tok, [text], CFG, 8)
    budget = CFG.position_bias_max_distance - CFG.prompt_length - 8
    assert len(rows[0]) == budget and rows[0][0] == tok.bos_id and rows[0][-1] == tok.encode(text)[-1]
    with pytest.warns(UserWarning):
        assert isinstance(generate(model, tok, [text], max_new_tokens=8)[0], str)
    with pytest.raises(CpmantError):
        generate(model, tok, ["abc"], max_new_tokens=CFG.position_bias_max_distance)


def test_unk_dropped_and_layout(tok):
    rows = encode_inputs(tok, ["a!b", "abcd"], CFG, 4)
    assert rows[0] == [tok.bos_id, 10, 11]
    b = build_batch(rows, CFG, "cpu")
    P = CFG.prompt_length
    assert b["input"][0, :P].tolist() == list(range(2 * P, 3 * P))  # task-2 prompt
    assert b["span"][0].tolist() == [0] * P + [1, 1] + [0] * 3  # padding between prompt and text
    assert b["position"][0, -3:].tolist() == [P, P + 1, P + 2]
    assert b["segment"][1].tolist() == [0] * P + [2] * 5
