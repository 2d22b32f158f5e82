"""Smaller bad inputs and faults of issue 17 that need no trained model: warnings printed as one plain line, a file
given as `--data`, the indefinite article in messages."""

from __future__ import annotations

import warnings

import pytest

from cpmant.errors import CpmantError

pytestmark = pytest.mark.unit


def test_cli_prints_warnings_as_one_plain_line(capfd):
    """Before: `/path/to/generate.py:90: UserWarning: input of ...` and the source line."""
    from cpmant_cli.main import plain_warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        plain_warnings()
        warnings.warn("input of 300 tokens truncated from the left to 244", UserWarning, stacklevel=1)
    err = capfd.readouterr().err
    assert err == "warning: input of 300 tokens truncated from the left to 244\n"


def test_data_that_is_a_file_says_so(tmp_path):
    from cpmant.cuge import get_task

    f = tmp_path / "train.jsonl"
    f.write_text("{}\n")
    with pytest.raises(CpmantError, match="is a file, not a folder") as e:
        get_task("ccpm").data_dir(f)
    assert "does not exist" not in e.value.problem
    with pytest.raises(CpmantError, match="does not exist"):
        get_task("ccpm").data_dir(tmp_path / "missing")


def test_messages_use_an_before_a_vowel():
    from cpmant.errors import a_or_an

    assert [a_or_an(w) for w in ("adapter", "lora", "int", "list", "prefix")] == [
        "an adapter", "a lora", "an int", "a list", "a prefix"]


def test_runs_of_a_killed_command_are_marked_killed_by_the_next(mlflow_store, monkeypatch, capfd):
    """Before: after SIGKILL a run stayed RUNNING forever. A run carries its command's pid (MLFLOW_RUN_CONTEXT); the
    next command marks this home's RUNNING runs whose process is gone as KILLED, and leaves live ones alone."""
    import json
    import socket
    import subprocess
    import sys

    import mlflow
    from mlflow.tracking import MlflowClient

    from cpmant_cli.main import main
    from cpmant_cli.stale_runs import RUN_CONTEXT, tag_runs_with_this_process
    from registry.tags import PROCESS_HOST, PROCESS_PID, PROCESS_STARTED
    from registry.tracking import setup_tracking

    setup_tracking()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that has ended: its pid names no process (or another one, started later)
    monkeypatch.setenv(RUN_CONTEXT, json.dumps({PROCESS_PID: str(gone.pid), PROCESS_STARTED: "1.00",
                                                PROCESS_HOST: socket.gethostname()}))
    killed = mlflow.start_run(run_name="killed").info.run_id
    mlflow.end_run(status="RUNNING")  # leaves it RUNNING, as SIGKILL would (no end_run)
    monkeypatch.delenv(RUN_CONTEXT)
    tag_runs_with_this_process()  # this process: alive
    alive = mlflow.start_run(run_name="alive").info.run_id
    mlflow.end_run(status="RUNNING")
    monkeypatch.setenv(RUN_CONTEXT, "")
    client = MlflowClient()
    assert client.get_run(killed).data.tags[PROCESS_PID] == str(gone.pid)
    main(["lineage", "models:/nope/1"])  # any next command
    err = capfd.readouterr().err
    assert f"marked 1 run(s) left RUNNING by a killed command (pid {gone.pid}) as KILLED" in err, err
    assert client.get_run(killed).info.status == "KILLED" and client.get_run(killed).info.end_time
    assert client.get_run(alive).info.status == "RUNNING"
    main(["lineage", "models:/nope/1"])
    assert "marked" not in capfd.readouterr().err  # once


def test_prefect_database_is_migrated_once_under_the_store_lock(tmp_path, monkeypatch):
    """Before: two commands on a fresh home migrated Prefect's database at once (`duplicate column name`). Now the
    first migrates it under MLflow's store lock; the others wait, then find it done."""
    import threading
    import time

    from cpmant_cli.prefect_db import init_prefect_database

    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "prefect" / "prefect.db"
    inside, calls, overlaps = [], [], []

    def migrate():
        if inside:
            overlaps.append(1)
        inside.append(1)
        calls.append(1)
        time.sleep(0.3)
        db.write_bytes(b"")
        inside.pop()

    results = []
    threads = [threading.Thread(target=lambda: results.append(init_prefect_database(migrate, db))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, True] and len(calls) == 1 and not overlaps
    assert (tmp_path / "home" / ".mlflow.db.init.lock").exists()  # MLflow's store lock, the same file
    assert init_prefect_database(migrate, db) is False and len(calls) == 1


def _micro_state():
    import torch

    from cpmant.config import ModelConfig
    from cpmant.model import CPMAnt

    cfg = ModelConfig(vocab_size=64, dim_model=16, dim_ff=32, num_layers=1, num_heads=2, dim_head=8,
                      position_bias_num_buckets=8, position_bias_max_distance=32, prompt_types=4, prompt_length=2,
                      segment_types=4)
    return CPMAnt(cfg).state_dict(), cfg


def test_a_disk_that_fills_while_writing_is_one_error_and_leaves_nothing(tmp_path):
    """Before: `SafetensorError: No space left on device` (pretrain) or `MlflowException [Errno 28]` (tune)."""
    import errno

    from cpmant.checkpoint import is_complete, save_model_dir

    sd, cfg = _micro_state()

    def full_disk(path):  # a write that meets a full disk, passed as a file of the checkpoint
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(CpmantError) as e:
        save_model_dir(tmp_path / "step-1", sd, cfg, None, extra_files={"training_state.pt": full_disk})
    assert f"no space left on the disk of {tmp_path}" in e.value.problem and "MB, " in e.value.problem
    assert "CPMANT_HOME" in e.value.fix
    assert not is_complete(tmp_path / "step-1") and list(tmp_path.iterdir()) == []  # no staging folder left
    other = OSError(errno.EACCES, "Permission denied")  # another OSError is not reported as a full disk

    def denied(path):
        raise other

    with pytest.raises(OSError) as e2:
        save_model_dir(tmp_path / "step-2", sd, cfg, None, extra_files={"x": denied})
    assert e2.value is other


def test_a_full_disk_is_refused_before_writing(tmp_path):
    from collections import namedtuple

    from cpmant.checkpoint import checkpoint_bytes
    from cpmant.fsutil import check_free_space, is_disk_full

    sd, _ = _micro_state()
    need = checkpoint_bytes(sd, {"training_state.pt": None})
    weights = sum(t.numel() * t.element_size() for t in sd.values())
    assert need == 3 * weights + (1 << 20)  # weights plus AdamW's two moments, plus the small files
    usage = namedtuple("usage", "total used free")
    with pytest.raises(CpmantError, match=r"needs about 1\.\d MB, 0\.5 MB is free"):
        check_free_space(tmp_path / "runs" / "x", need, usage=lambda p: usage(0, 0, 1 << 19))
    check_free_space(tmp_path / "runs" / "x", need, usage=lambda p: usage(0, 0, need))
    assert is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                     "\"No space left on device\" })"))
    assert is_disk_full(Exception("[Errno 28] No space left on device: '/x'"))
    assert not is_disk_full(OSError(13, "Permission denied"))


def test_an_unanswering_dask_scheduler_is_one_error_within_seconds():
    """Before: nine tracebacks after about 50 s. A TCP connect and Dask's handshake, with a timeout, answer first:
    a port nothing listens on, a listener that is no scheduler, while a real scheduler passes."""
    import asyncio
    import socket
    import time

    from distributed import Scheduler

    from flows.runners import check_dask_address

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        closed = free.getsockname()[1]
    with pytest.raises(CpmantError, match="unreachable"):
        check_dask_address(f"tcp://127.0.0.1:{closed}", timeout=1.0)
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts connections, never answers
        t0 = time.perf_counter()
        with pytest.raises(CpmantError, match="does not answer as a Dask scheduler") as e:
            check_dask_address(f"tcp://127.0.0.1:{mute.getsockname()[1]}", timeout=1.0)
        assert time.perf_counter() - t0 < 5 and "--dask-address" in e.value.fix
    with pytest.raises(CpmantError, match="names no host"):
        check_dask_address("tcp://:8786")

    async def real():
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=None) as s:
            await asyncio.to_thread(check_dask_address, s.address, 3.0)

    asyncio.run(real())
