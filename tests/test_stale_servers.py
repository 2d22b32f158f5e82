"""Issue 17 (bad input 13): after SIGKILL, Prefect's temporary server was left running. The command that starts it
records it (cpmant_cli/env.py); the next command stops it when that command is gone (cpmant_cli/stale_servers.py).
A sleeping process stands in for the server: what is tested is the record, the liveness check and the stop."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.unit

# a stand-in `cpmant` command: starts its "server" as Prefect's server module would (through cpmant's Popen)
COMMAND = ("import time; from cpmant_cli.env import _OwnProcessGroup; "
           "p = _OwnProcessGroup.Popen(['sleep', '120']); print(p.pid, flush=True); time.sleep(120)")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_commands_temporary_server_is_stopped_by_the_next(tmp_path, monkeypatch):
    from cpmant_cli.stale_servers import records_dir, stop_orphaned_servers

    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "home"))
    command = subprocess.Popen([sys.executable, "-c", COMMAND], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "CPMANT_HOME": str(tmp_path / "home")})
    server = int(command.stdout.readline())
    try:
        assert (records_dir() / f"{server}.json").is_file()
        lines = []
        assert stop_orphaned_servers(lines.append) == [] and _running(server)  # its command still runs: kept
        command.kill()  # SIGKILL: no atexit hook stops the server
        command.wait()
        assert _running(server)
        assert stop_orphaned_servers(lines.append) == [server]
        assert not _running(server)
        assert lines == [f"note: stopped 1 temporary Prefect server(s) left running by a killed command (pid {server})"]
        assert not (records_dir() / f"{server}.json").exists()
        assert stop_orphaned_servers(lines.append) == []  # nothing left to do
    finally:
        command.kill()
        if _running(server):
            os.killpg(server, 9)
