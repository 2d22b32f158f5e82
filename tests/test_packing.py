"""Packing as CPM-Live packs: every piece carries its own task prompt, and every target can attend to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpmant.config import get_preset
from cpmant.errors import CpmantError
from cpmant.model import CPMAnt
from cpmant.tokenizer import BOS_ID, EOS_ID
from cpmant.training.data import IGNORE, TASK_LM, TASK_MASK, PretrainStream, make_pieces, pack

pytestmark = pytest.mark.unit


def _cfg(P: int):
    return get_preset("tiny").replace(vocab_size=100, prompt_length=P, num_layers=1, dim_model=8, dim_ff=8,
                                      num_heads=1, dim_head=8)


def test_hand_built_row_gives_each_piece_its_prompt():
    P = 2
    docs = [np.array([10, 11, 12], np.int32), np.array([20, 21, 22, 23], np.int32), np.arange(30, 37, dtype=np.int32)]
    s = PretrainStream(docs, _cfg(P), 16, bos=BOS_ID, eos=EOS_ID, min_piece_tokens=4, max_piece_tokens=30)
    assert [[len(p) for p in r] for r in s.rows] == [[5, 6], [9]]  # 2+5 + 2+6 = 15 <= 16; 2+9 more would not fit
    r = s.row(0, shuffle=False, task=TASK_LM)
    t = TASK_LM
    assert list(r["input"]) == [t * P, t * P + 1, BOS_ID, 10, 11, 12, EOS_ID,
                                t * P, t * P + 1, BOS_ID, 20, 21, 22, 23, EOS_ID, 0]
    assert list(r["position"]) == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert list(r["segment"]) == [0, 0, t, t, t, t, t, 0, 0, t, t, t, t, t, t, 0]
    assert list(r["span"]) == [0] * 7 + [1] * 8 + [0]
    assert list(r["task"]) == [t] * 15 + [0]
    assert int(r["length"]) == 15
    ctx = r["context"]
    assert ctx[[0, 1, 2, 7, 8, 9]].all()  # prompts and <s> are context
    for a, b in ((2, 7), (9, 15)):  # LM: a non-context suffix in each piece
        nc = ~ctx[a:b]
        assert nc.any() and nc[np.argmax(nc):].all()
    expect = np.full(16, IGNORE)
    for i in range(15):
        if r["span"][i] == r["span"][i + 1] and not ctx[i + 1]:
            expect[i] = r["input"][i + 1]
    assert list(r["target"]) == list(expect)


def test_every_target_can_attend_to_a_prompt_of_its_task():
    P, T = 4, 64
    rng = np.random.default_rng(0)
    docs = [rng.integers(30, 100, size=int(n)).astype(np.int32) for n in rng.integers(3, 70, size=120)]
    s = PretrainStream(docs, _cfg(P), T, bos=BOS_ID, eos=EOS_ID, min_piece_tokens=4, max_piece_tokens=40, seed=1)
    assert max(len(r) for r in s.rows) >= 3  # rows really pack several pieces
    model = CPMAnt(_cfg(P))
    b = s.batch(range(3 * len(s)))
    mask = model.attention_mask(b.length, b.context, b.span)  # (B, T, T): what the forward pass uses
    checked, tasks_seen = 0, set()
    for row in range(b.input.size(0)):
        L = int(b.length[row])
        prompt = (b.segment[row] == 0) & (b.position[row] < P) & (torch.arange(T) < L)
        for i in torch.nonzero(b.target[row] != IGNORE).flatten().tolist():
            piece = (b.span[row] == b.span[row, i]) & (torch.arange(T) < L)
            task = int(b.segment[row][piece].max())  # the text's segment is its piece's task
            own = prompt & piece
            assert int(own.sum()) == P, f"row {row} position {i}: its piece has no whole prompt"
            assert (b.input[row][own] == task * P + torch.arange(P)).all(), "the prompt is another task's"
            assert mask[row, i][own].any(), f"row {row} position {i} cannot attend to its prompt"
            assert not mask[row, i][prompt & ~own].any(), "a position sees another piece's prompt"
            checked += 1
            tasks_seen.add(task)
    assert checked > 1000 and tasks_seen == {TASK_MASK, TASK_LM}
    # pieces of one row draw their own tasks (CPM-Live's samples each carry theirs)
    mixed = [row for row in range(b.input.size(0)) if len(set(b.task[row][b.task[row] > 0].tolist())) == 2]
    assert mixed


def test_rows_fit_pieces_and_their_prompts():
    P, T = 4, 40
    pieces = make_pieces([np.arange(n, dtype=np.int32) + 10 for n in (3, 10, 40, 20, 5)], BOS_ID, EOS_ID,
                         min_tokens=4, max_tokens=T - P)
    rows = pack(pieces, T, overhead=P)
    assert all(sum(len(p) + P for p in r) <= T for r in rows)
    assert [len(p) for r in rows for p in r] == [len(p) for p in pieces]
    s = PretrainStream([np.arange(n, dtype=np.int32) + 10 for n in (3, 10, 40, 20, 5)], _cfg(P), T, bos=BOS_ID,
                       eos=EOS_ID, min_piece_tokens=4)
    for i in range(len(s)):
        r = s.row(i, shuffle=False)
        assert int(r["length"]) == sum(len(p) + P for p in s.rows[i]) <= T


def test_prompt_ids_must_fit_the_token_table():
    with pytest.raises(CpmantError, match="vocab_size"):
        PretrainStream([np.arange(50, dtype=np.int32)], _cfg(40), 128, bos=BOS_ID, eos=EOS_ID)


def test_no_piece_names_the_split_and_the_cause():
    with pytest.raises(CpmantError, match="validation split.*shorter than min_piece_tokens=8"):
        PretrainStream([np.arange(3, dtype=np.int32)], _cfg(4), 32, bos=BOS_ID, eos=EOS_ID, split="validation split")
