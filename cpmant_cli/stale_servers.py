"""Prefect temporary servers a killed command left running: when a `cpmant` command starts Prefect's temporary API
server (cpmant_cli/env.py isolate_prefect_server), it records the server's pid and start time, and its own, in
`$CPMANT_HOME/prefect/temporary-servers/<pid>.json`. Prefect stops the server at exit, but a SIGKILLed command runs
no exit hook, so the next command stops each recorded server whose command is gone (one line) and drops records of
servers already stopped. Only servers started by this home, on this host, are looked at."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .stale_runs import _alive, _started


def records_dir() -> Path:
    from cpmant.paths import cpmant_home

    return cpmant_home() / "prefect" / "temporary-servers"


def record_server(pid: int) -> None:
    """Remember the server `pid` started by this process (the command that owns it)."""
    me = os.getpid()
    rec = {"pid": pid, "started": _started(pid) or 0, "parent_pid": me, "parent_started": _started(me) or 0,
           "host": socket.gethostname()}
    d = records_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{pid}.json").write_text(json.dumps(rec), encoding="utf-8")


def _stop_group(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the server's process group (it leads its own: uvicorn and its workers), SIGKILL what outlives it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if _gone(pid):
                return
            time.sleep(0.1)


def _gone(pid: int) -> bool:
    """No process `pid`, or only its exit status left (a zombie not yet reaped by its new parent)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return True


def stop_orphaned_servers(say=lambda line: print(line, file=sys.stderr)) -> list[int]:
    """Stop the recorded temporary servers whose command is gone; returns their pids."""
    d = records_dir()
    if not d.is_dir():
        return []
    stopped = []
    for f in sorted(d.glob("*.json")):
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            f.unlink(missing_ok=True)
            continue
        if rec.get("host") != socket.gethostname():
            continue
        server_runs = _alive(str(rec["pid"]), str(rec["started"]))
        if server_runs and _alive(str(rec["parent_pid"]), str(rec["parent_started"])):
            continue  # its command is still running (another command of this home)
        if server_runs:
            _stop_group(int(rec["pid"]))
            stopped.append(int(rec["pid"]))
        f.unlink(missing_ok=True)
    if stopped:
        say(f"note: stopped {len(stopped)} temporary Prefect server(s) left running by a killed command "
            f"(pid {', '.join(map(str, stopped))})")
    return stopped
