"""Pretraining core: packing and targets, checkpoints, loss goes down, SIGKILL + resume, torchrun equivalence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cpmant import checkpoint as ckpt
from cpmant.config import get_preset
from cpmant.configio import dump_config
from cpmant.errors import CpmantError
from cpmant.training.data import IGNORE, TASK_LM, TASK_MASK, PretrainStream, make_pieces, pack
from cpmant.training.loop import pretrain

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def _stream(**kw):
    cfg = get_preset("tiny").replace(vocab_size=100, prompt_length=4)
    docs = [np.arange(10, 10 + n, dtype=np.int32) for n in (5, 30, 12, 50, 3, 20)]
    return PretrainStream(docs, cfg, 48, bos=6, eos=7, min_piece_tokens=6, max_piece_tokens=30, **kw)


def test_pieces_and_packing():
    docs = [np.arange(n, dtype=np.int32) + 10 for n in (3, 10, 40)]
    pieces = make_pieces(docs, 6, 7, min_tokens=6, max_tokens=16)
    assert all(p[0] == 6 and p[-1] == 7 and 6 <= len(p) <= 16 for p in pieces)
    assert sum(len(p) - 2 for p in pieces) == 10 + 40  # the 3-token doc is dropped, nothing else lost
    rows = pack(pieces, 20)
    assert all(sum(len(p) for p in r) <= 20 for r in rows)
    assert [len(p) for r in rows for p in r] == [len(p) for p in pieces]


def test_row_semantics_both_tasks():
    s = _stream()
    for task in (TASK_MASK, TASK_LM):
        r = s.row(0, task=task)
        P = 4
        assert list(r["input"][:P]) == [task * P + i for i in range(P)]
        L = int(r["length"])
        assert (r["segment"][P:L] == task).all() and (r["segment"][:P] == 0).all()
        nc = ~r["context"]
        # targets: token i+1 exactly where i+1 is non-context within one span, else ignored
        for i in range(P, L - 1):
            same_span = r["span"][i] == r["span"][i + 1]
            expect = r["input"][i + 1] if (nc[i + 1] and same_span) else IGNORE
            assert r["target"][i] == expect
        assert (r["target"][L - 1:] == IGNORE).all()
        # <s> of each piece is always context; spans count pieces
        starts = [i for i in range(P, L) if r["input"][i] == 6]
        assert all(r["context"][i] for i in starts)
        assert sorted(set(r["span"][P:L])) == list(range(len(starts)))
        if task == TASK_LM:  # a suffix per piece: once non-context, non-context to the piece end
            for a, b in zip(starts, starts[1:] + [L]):
                seg = nc[a:b]
                first = np.argmax(seg)
                assert seg[first:].all()


def test_stream_is_a_pure_function_of_the_index():
    a, b = _stream(seed=3), _stream(seed=3)
    for i in (0, 5, 17, 40):
        ra, rb = a.row(i), b.row(i)
        assert all((ra[k] == rb[k]).all() for k in ra)
    assert any((_stream(seed=4).row(i)["input"] != a.row(i)["input"]).any() for i in range(8))


def test_seq_len_over_position_range_is_refused():
    cfg = get_preset("tiny").replace(vocab_size=100, position_bias_max_distance=32)
    with pytest.raises(CpmantError, match="position"):
        PretrainStream([np.arange(50, dtype=np.int32)], cfg, 64, bos=6, eos=7)


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
    # a second call resumes at the end: nothing is retrained, the numbers are the same
    again = pretrain(cfg, progress=False)
    assert again.resumed_from == 30 and again.valid_loss_end == pytest.approx(res.valid_loss_end, abs=1e-6)


def _run_training(cfg, tmp_path: Path, name: str, nproc: int = 1, wait: bool = True):
    cfg_path = tmp_path / f"{name}.yaml"
    dump_config(cfg, cfg_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "cpmant.training", "--config", str(cfg_path), "--no-progress"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "cpmant.training", "--config", str(cfg_path), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    return proc


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_auto_matches_uninterrupted(micro_pretrain_cfg, tmp_path):
    kw = dict(max_steps=40, save_interval=5, eval_interval=40, micro_batch_size=8, seq_len=96)
    full = micro_pretrain_cfg(output_dir=str(tmp_path / "full"), **kw)
    _run_training(full, tmp_path, "full")
    ref = json.loads((tmp_path / "full" / "result.json").read_text())

    killed = micro_pretrain_cfg(output_dir=str(tmp_path / "killed"), **kw)
    proc = _run_training(killed, tmp_path, "killed", wait=False)
    root = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.is_complete(root / "step-00000010"):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = [s for s, _ in ckpt.list_complete_checkpoints(root)]
    assert done and max(done) < 40, f"the run finished before the kill: {done}"

    _run_training(killed, tmp_path, "killed")  # resume: auto is the default
    res = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert res["resumed_from"] == max(done)
    assert res["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-6, abs=1e-7)
    assert res["valid_loss_end"] == pytest.approx(ref["valid_loss_end"], rel=1e-6, abs=1e-7)
    assert _losses(tmp_path / "killed") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6, abs=1e-7)


def test_torchrun_two_processes_match_one_process(micro_pretrain_cfg, tmp_path):
    """2 processes x 2 rows equal 1 process x 2 rows x 2 accumulation steps (same global batch)."""
    kw = dict(max_steps=8, save_interval=8, eval_interval=8)
    one = micro_pretrain_cfg(output_dir=str(tmp_path / "one"), micro_batch_size=2, grad_accum=2, **kw)
    two = micro_pretrain_cfg(output_dir=str(tmp_path / "two"), micro_batch_size=2, grad_accum=1, **kw)
    _run_training(one, tmp_path, "one")
    _run_training(two, tmp_path, "two", nproc=2)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    ra = json.loads((tmp_path / "one" / "result.json").read_text())
    rb = json.loads((tmp_path / "two" / "result.json").read_text())
    assert rb["valid_loss_end"] == pytest.approx(ra["valid_loss_end"], rel=1e-5)


def test_bmtrain_backend_without_cuda_is_a_clear_error(micro_pretrain_cfg):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the bmtrain path is checked by the gpu tier")
    with pytest.raises(CpmantError, match="needs CUDA") as e:
        pretrain(micro_pretrain_cfg(backend="bmtrain"), progress=False)
    assert "--backend torch" in str(e.value)
