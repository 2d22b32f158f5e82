"""Exact resume (with dropout), torchrun equivalence with dropout, damaged checkpoints, changed settings, locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MICRO_MODEL
from cpmant import checkpoint as ckpt
from cpmant.configio import dump_config
from cpmant.errors import CpmantError
from cpmant.training.loop import pretrain
from cpmant.training.schedule import noam

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


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


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _log(run_dir)]


def _model(dropout: float) -> dict:
    return {**MICRO_MODEL, "dropout_p": dropout}


# reproducibility holds within one precision: fp32, and bf16 (autocast) with dropout
PRECISIONS = [(0.0, "fp32"), (0.1, "fp32"), (0.1, "bf16")]


@pytest.mark.parametrize(("dropout", "precision"), PRECISIONS)
def test_sigkill_then_resume_auto_matches_uninterrupted(micro_pretrain_cfg, tmp_path, dropout, precision):
    kw = dict(max_steps=30, save_interval=5, eval_interval=30, micro_batch_size=8, seq_len=96,
              model_overrides=_model(dropout), precision=precision)
    ref = pretrain(micro_pretrain_cfg(output_dir=str(tmp_path / "full"), **kw), progress=False)

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
    assert done and max(done) < 30, f"the run finished before the kill: {done}"

    res = pretrain(killed, progress=False)  # resume: auto is the default
    assert res.resumed_from == max(done)
    assert res.final_loss == pytest.approx(ref.final_loss, rel=1e-6, abs=1e-7)
    assert res.valid_loss_end == pytest.approx(ref.valid_loss_end, rel=1e-6, abs=1e-7)
    assert _losses(tmp_path / "killed") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize(("dropout", "precision"), PRECISIONS)
def test_torchrun_two_processes_match_one_process(micro_pretrain_cfg, tmp_path, dropout, precision):
    """2 processes x 2 rows equal 1 process x 2 rows x 2 accumulation steps (same global batch, same masks)."""
    kw = dict(max_steps=6, save_interval=6, eval_interval=6, model_overrides=_model(dropout), precision=precision)
    one = micro_pretrain_cfg(output_dir=str(tmp_path / "one"), micro_batch_size=2, grad_accum=2, **kw)
    two = micro_pretrain_cfg(output_dir=str(tmp_path / "two"), micro_batch_size=2, grad_accum=1, **kw)
    ra = pretrain(one, progress=False)
    _run_training(two, tmp_path, "two", nproc=2)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    rb = json.loads((tmp_path / "two" / "result.json").read_text())
    assert rb["valid_loss_end"] == pytest.approx(ra.valid_loss_end, rel=1e-5)


@pytest.mark.parametrize("damaged", ["model.safetensors", "training_state.pt"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(micro_pretrain_cfg, tmp_path, damaged):
    kw = dict(save_interval=4, eval_interval=12, model_overrides=_model(0.1))
    ref = pretrain(micro_pretrain_cfg(output_dir=str(tmp_path / "full"), max_steps=12, **kw), progress=False)
    cut = micro_pretrain_cfg(output_dir=str(tmp_path / "cut"), max_steps=8, **kw)
    pretrain(cut, progress=False)
    f = tmp_path / "cut" / "checkpoints" / "step-00000008" / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated, as by a full disk or a killed copy
    with pytest.warns(UserWarning, match=f"step-00000008.*{damaged}"):
        res = pretrain(cut.model_copy(update={"max_steps": 12}), progress=False)
    assert res.resumed_from == 4
    assert len(res.skipped_checkpoints) == 1 and damaged in res.skipped_checkpoints[0]
    assert (tmp_path / "cut" / "checkpoints" / "damaged-step-00000008").is_dir()
    assert _losses(tmp_path / "cut") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6, abs=1e-7)
    assert res.valid_loss_end == pytest.approx(ref.valid_loss_end, rel=1e-6, abs=1e-7)
    # an explicit --resume of a damaged folder is a clear error, not a SafetensorError
    with pytest.raises(CpmantError, match="cannot be resumed.*sha256"):
        pretrain(cut.model_copy(update={"max_steps": 12, "resume": str(f.parent.with_name("damaged-step-00000008"))}),
                 progress=False)


def test_resume_with_changed_settings_refuses_then_obeys(micro_pretrain_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "home"))
    kw = dict(output_dir=None, save_interval=4, eval_interval=4, warmup_steps=4)
    first = pretrain(micro_pretrain_cfg(lr=0.05, max_steps=8, **kw), progress=False)
    assert first.run_dir.parent == tmp_path / "home" / "runs"
    assert first.run_dir.name.startswith("pretrain-tiny-") and len(first.run_dir.name) == len("pretrain-tiny-") + 8
    # make it an unfinished run: as if killed after step 4
    import shutil

    shutil.rmtree(first.run_dir / "checkpoints" / "step-00000008")
    step4 = first.run_dir / "checkpoints" / "step-00000004"

    changed = micro_pretrain_cfg(lr=0.1, max_steps=12, **kw)
    with pytest.raises(CpmantError, match=r"lr: 0\.05 -> 0\.1") as e:
        pretrain(changed, progress=False)
    assert "--resume never" in e.value.fix and "allow_changed_settings=true" in e.value.fix
    assert str(step4) in e.value.fix
    # an explicit --resume of those weights refuses the same way, unless told to allow the change
    with pytest.raises(CpmantError, match=r"lr: 0\.05 -> 0\.1"):
        pretrain(changed.model_copy(update={"resume": str(step4)}), progress=False)
    allowed = changed.model_copy(update={"resume": str(step4), "allow_changed_settings": True})
    with pytest.warns(UserWarning, match="changed settings.*lr"):
        res = pretrain(allowed, progress=False)
    assert res.resumed_from == 4 and res.run_dir != first.run_dir
    lr5 = next(r["lr"] for r in _log(res.run_dir) if r["iter"] == 5)
    assert lr5 == pytest.approx(0.1 * noam(4)(4))  # the new lr, not the saved optimizer's 0.05
    # --resume never starts this configuration fresh in its own folder
    fresh = pretrain(changed.model_copy(update={"resume": "never", "max_steps": 4}), progress=False)
    assert fresh.resumed_from == 0 and fresh.run_dir == res.run_dir
    # settings that only extend stay in one folder and continue it
    more = pretrain(micro_pretrain_cfg(lr=0.05, max_steps=12, **kw), progress=False)
    assert more.run_dir == first.run_dir and more.resumed_from == 4
    assert more.config_sha256 != first.config_sha256  # max_steps is part of the run's identity, not its folder


def test_a_run_folder_is_locked_while_a_process_trains_in_it(micro_pretrain_cfg, tmp_path):
    cfg = micro_pretrain_cfg(max_steps=2, save_interval=2, eval_interval=2)
    run = Path(cfg.output_dir)
    run.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from cpmant.training.runs import RunLock; "
         "lock = RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); sys.stdin.read()", str(run)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CpmantError, match=f"in use by another process \\(pid {holder.pid}\\)") as e:
            pretrain(cfg, progress=False)
        assert "output_dir" in e.value.fix
        assert not (run / "checkpoints").exists()
    finally:
        holder.communicate("")  # the holder exits: its lock goes with it
    assert pretrain(cfg, progress=False).steps == 2
