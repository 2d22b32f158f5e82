"""Pretraining core: pieces and targets, checkpoints, loss goes down, config checks, run identity, allocator.
(Packing: test_packing.py; resume, torchrun, locks: test_resume.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpmant import checkpoint as ckpt
from cpmant.config import get_preset
from cpmant.errors import CpmantError
from cpmant.tokenizer import BOS_ID, EOS_ID
from cpmant.training.data import IGNORE, TASK_LM, TASK_MASK, PretrainStream, make_pieces, pack
from cpmant.training.loop import pretrain

pytestmark = pytest.mark.unit


P = 4


def _stream(**kw):
    cfg = get_preset("tiny").replace(vocab_size=100, prompt_length=P)
    docs = [np.arange(30, 30 + n, dtype=np.int32) for n in (5, 30, 12, 50, 3, 20)]
    return PretrainStream(docs, cfg, 48, bos=BOS_ID, eos=EOS_ID, min_piece_tokens=6, max_piece_tokens=30, **kw)


def test_pieces_and_packing():
    docs = [np.arange(n, dtype=np.int32) + 10 for n in (3, 10, 40)]
    pieces = make_pieces(docs, BOS_ID, EOS_ID, min_tokens=6, max_tokens=16)
    assert all(p[0] == BOS_ID and p[-1] == EOS_ID and 6 <= len(p) <= 16 for p in pieces)
    assert sum(len(p) - 2 for p in pieces) == 10 + 40  # the 3-token doc is dropped, nothing else lost
    rows = pack(pieces, 20)
    assert all(sum(len(p) for p in r) <= 20 for r in rows)
    assert [len(p) for r in rows for p in r] == [len(p) for p in pieces]


def test_row_semantics_both_tasks():
    s = _stream()
    k = next(i for i in range(len(s)) if len(s.rows[int(s._perm(0)[i])]) >= 2)  # a row with several pieces
    for task in (TASK_MASK, TASK_LM):
        r = s.row(k, task=task)
        L = int(r["length"])
        prompt = (r["segment"][:L] == 0)
        starts = [i for i in range(L) if r["position"][i] == 0]  # each piece: P prompt positions, then its text
        ends = starts[1:] + [L]
        assert len(starts) >= 2 and sorted(set(r["span"][:L])) == list(range(len(starts)))
        for a, b in zip(starts, ends):
            assert list(r["input"][a:a + P]) == [task * P + i for i in range(P)]
            assert prompt[a:a + P].all() and r["context"][a:a + P].all() and (r["segment"][a + P:b] == task).all()
            assert r["input"][a + P] == BOS_ID and r["context"][a + P] and r["input"][b - 1] == EOS_ID
            assert list(r["position"][a:b]) == list(range(b - a)) and (r["span"][a:b] == r["span"][a]).all()
            if task == TASK_LM:  # a suffix per piece: once non-context, non-context to the piece end
                nc = ~r["context"][a + P:b]
                assert nc[np.argmax(nc):].all()
        nc = ~r["context"]
        # targets: token i+1 exactly where i+1 is non-context within one span, else ignored
        for i in range(L - 1):
            same_span = r["span"][i] == r["span"][i + 1]
            expect = r["input"][i + 1] if (nc[i + 1] and same_span) else IGNORE
            assert r["target"][i] == expect
        assert (r["target"][L - 1:] == IGNORE).all()


def test_stream_is_a_pure_function_of_the_index():
    a, b = _stream(seed=3), _stream(seed=3)
    for i in (0, 5, 17, 40):
        ra, rb = a.row(i), b.row(i)
        assert all((ra[k] == rb[k]).all() for k in ra)
    assert any((_stream(seed=4).row(i)["input"] != a.row(i)["input"]).any() for i in range(8))


def test_seq_len_over_position_range_is_refused():
    cfg = get_preset("tiny").replace(vocab_size=100, position_bias_max_distance=32)
    with pytest.raises(CpmantError, match="position"):
        PretrainStream([np.arange(50, dtype=np.int32)], cfg, 64, bos=BOS_ID, eos=EOS_ID)


def test_checkpoint_retention_and_latest(tmp_path):
    cfg = get_preset("tiny").replace(vocab_size=80, num_layers=1, dim_model=8, dim_ff=8, num_heads=1, dim_head=8)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(f"t{i}" for i in range(80)) + "\n")
    sd = {"w": torch.ones(2)}
    for step in (2, 4, 6, 8):
        ckpt.save_training_checkpoint(tmp_path / "c", step, sd, cfg, vocab, {"step": step}, keep_last=2, keep_every=4)
    steps = [s for s, _ in ckpt.list_complete_checkpoints(tmp_path / "c")]
    assert steps == [4, 6, 8]  # newest two, plus the multiple of keep_every
    assert ckpt.latest_checkpoint(tmp_path / "c").name == "step-00000008"
    # an interrupted save (no metadata) is never picked
    (tmp_path / "c" / "step-00000010").mkdir()
    assert ckpt.latest_checkpoint(tmp_path / "c").name == "step-00000008"
    meta = ckpt.read_meta(tmp_path / "c" / "step-00000008")
    assert meta["files_sha256"]["model.safetensors"] == ckpt.sha256_file(tmp_path / "c/step-00000008/model.safetensors")
    with pytest.raises(CpmantError, match="not a complete"):
        ckpt.read_meta(tmp_path / "c" / "step-00000010")
    # a run resumed from an older step abandons the later history: step 5 replaces 6 and 8 as the newest
    ckpt.save_training_checkpoint(tmp_path / "c", 5, sd, cfg, vocab, {"step": 5}, keep_last=2, keep_every=4)
    assert [s for s, _ in ckpt.list_complete_checkpoints(tmp_path / "c")] == [4, 5]
    assert ckpt.latest_checkpoint(tmp_path / "c").name == "step-00000005"


def test_pretrain_lowers_validation_loss_and_writes_checkpoints(micro_pretrain_cfg, tmp_path):
    cfg = micro_pretrain_cfg(max_steps=30, save_interval=10, eval_interval=10)
    res = pretrain(cfg, progress=False)
    assert res.valid_loss_end < res.valid_loss_start - 0.5
    assert ckpt.is_complete(res.model_dir)
    files = sorted(p.name for p in res.model_dir.iterdir())
    assert files == ["config.json", "cpmant_meta.json", "model.safetensors", "training_config.yaml", "vocab.txt"]
    assert [s for s, _ in ckpt.list_complete_checkpoints(res.run_dir / "checkpoints")] == [20, 30]
    log = [json.loads(x) for x in (res.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == list(range(1, 31))
    assert {"loss", "lr", "time", "tokens_per_second", "grad_norm", "task_loss"} <= set(log[0])
    assert res.tokens_per_second > 0 and 0 < res.mfu < 1
    # the final model folder names the data it was trained on, for the stages that follow
    data = ckpt.read_meta(res.model_dir)["data"]
    assert data == {"corpus": str(Path(cfg.corpus).resolve()), "corpus_name": "corpus", "valid_fraction": 0.05,
                    "seed": 0, "data_sha256": res.data["data_sha256"], "vocab_size": 600, "min_piece_tokens": 4,
                    "max_piece_tokens": 990,
                    # the held-out measure's rows (cpmant/heldout.py): the run's seq_len, eval_rows, micro batch
                    "heldout": {"seq_len": 64, "rows": 8, "batch_size": 4}}
    # a second call resumes at the end: nothing is retrained, the numbers are the same
    again = pretrain(cfg, progress=False)
    assert again.resumed_from == 30 and again.valid_loss_end == pytest.approx(res.valid_loss_end, abs=1e-6)


def test_a_train_backend_that_is_not_built_is_a_clear_error(micro_pretrain_cfg):
    """bmtrain is not built (cpmant.backends registers only built backends): refused, naming the built ones."""
    with pytest.raises((CpmantError, ValueError), match="unknown train backend 'bmtrain'; choose one of: torch"):
        pretrain(micro_pretrain_cfg(backend="bmtrain"), progress=False)


def test_model_overrides_are_checked_with_the_config(fixture_corpus):
    from cpmant.configio import build_config
    from cpmant.training.config import PretrainConfig

    bad = {"dim_modle": 32, "num_layers": "2", "dropout_p": 1.5, "num_heads": True}
    with pytest.raises(CpmantError) as e:  # at config time: before any corpus is read (this one does not exist)
        build_config(PretrainConfig, None, {"corpus": "/no/such/corpus", "model_overrides": bad})
    msg = str(e.value)
    assert "unknown ModelConfig field(s) ['dim_modle']" in msg and "dim_model" in msg  # lists the valid ones
    assert "num_layers='2' is not of type int" in msg and "num_heads=True" in msg and "dropout_p=1.5" in msg
    with pytest.raises(CpmantError, match="mask_modules has 1 entries"):
        build_config(PretrainConfig, None, {"model_overrides": {"mask_modules": [[True, False]]}})
    ok = build_config(PretrainConfig, None, {"model_overrides": {"dim_model": 64, "dropout_p": 0.1, "eps": 1e-5}})
    assert ok.model_overrides["dim_model"] == 64


def test_config_sha256_covers_what_shapes_weights_or_metrics(micro_pretrain_cfg):
    from cpmant.training.runs import config_sha256, run_dir_name, run_key

    base = micro_pretrain_cfg(output_dir=None)
    same = [dict(resume="never"), dict(output_dir="/elsewhere"), dict(num_threads=2), dict(encode_workers=3),
            dict(save_interval=7), dict(keep_last=5), dict(keep_every=10), dict(allow_changed_settings=True)]
    for kw in same:
        assert config_sha256(base.model_copy(update=kw)) == config_sha256(base), kw
    for kw in (dict(lr=0.01), dict(eval_rows=9), dict(seed=1), dict(model_overrides={"dim_model": 16}),
               dict(max_steps=99)):
        assert config_sha256(base.model_copy(update=kw)) != config_sha256(base), kw
    extended = base.model_copy(update={"max_steps": 99})
    assert run_key(extended) == run_key(base) and run_dir_name(base) == f"pretrain-tiny-{run_key(base)[:8]}"
    assert run_key(base.model_copy(update={"lr": 0.01})) != run_key(base)


def test_training_process_keeps_freed_memory():
    import ctypes.util

    from cpmant.training.allocator import keep_freed_memory, set_mallopt

    glibc = sys.platform.startswith("linux") and "libc.so" in (ctypes.util.find_library("c") or "")
    assert keep_freed_memory() is glibc
    assert set_mallopt(None, None) is glibc  # nothing asked: a no-op that still reports glibc
