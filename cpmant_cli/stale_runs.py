"""Runs a killed command left RUNNING: every run a `cpmant` command starts carries the command's process id, its
start time and the host (MLflow's MLFLOW_RUN_CONTEXT adds them as run tags to every `mlflow.start_run`); the next
command marks this home's RUNNING runs whose process is gone as KILLED, and says so in one line.

Only a local SQLite store under this home is looked at (a tracking server's runs belong to whoever runs it), only
runs tagged by a process on this host, and the store is read with sqlite3 first, so that a command finds nothing
to do without importing MLflow.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
from pathlib import Path

from registry.tags import PROCESS_HOST, PROCESS_PID, PROCESS_STARTED

RUN_CONTEXT = "MLFLOW_RUN_CONTEXT"  # mlflow.environment_variables.MLFLOW_RUN_CONTEXT (read by mlflow.start_run)


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def tag_runs_with_this_process() -> None:
    """Every run this process (and its children) starts is tagged with the command's pid, start time and host."""
    tags = json.loads(os.environ.get(RUN_CONTEXT) or "{}")
    if PROCESS_PID in tags:
        return  # a child process of a command: its runs belong to that command
    pid = os.getpid()
    tags.update({PROCESS_PID: str(pid), PROCESS_STARTED: f"{_started(pid) or 0:.2f}",
                 PROCESS_HOST: socket.gethostname()})
    os.environ[RUN_CONTEXT] = json.dumps(tags)


def _alive(pid: str, started: str) -> bool:
    """The process `pid` runs, and is the one that started at `started` (a reused pid is another process)."""
    try:
        now = _started(int(pid))
        return now is not None and abs(now - float(started or 0)) < 1.0
    except ValueError:
        return True  # a tag this code did not write: leave the run alone


def orphaned_runs(db: Path) -> list[tuple[str, str]]:
    """(run id, pid) of the RUNNING runs in the SQLite store `db` whose process on this host is gone."""
    if not db.is_file():
        return []
    q = ("SELECT r.run_uuid, p.value, s.value FROM runs r "
         "JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = ? "
         "JOIN tags h ON h.run_uuid = r.run_uuid AND h.key = ? AND h.value = ? "
         "LEFT JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = ? "
         "WHERE r.status = 'RUNNING'")
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute(q, (PROCESS_PID, PROCESS_HOST, socket.gethostname(), PROCESS_STARTED)).fetchall()
    except sqlite3.Error:
        return []  # no runs table yet (a store being made), or locked: nothing to do now
    return [(run, pid) for run, pid, started in rows if not _alive(pid, started)]


def mark_killed_runs(say=lambda line: print(line, file=sys.stderr)) -> list[str]:
    """Mark this home's runs left RUNNING by a killed command as KILLED; the run ids marked."""
    from registry.tracking import tracking_uri

    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return []
    found = orphaned_runs(Path(uri[len("sqlite:///"):].split("?", 1)[0]))
    if not found:
        return []
    from registry.runs import end_runs

    end_runs([run_id for run_id, _ in found], "KILLED", tracking_uri=uri)
    pids = ", ".join(sorted({pid for _, pid in found}))
    say(f"note: marked {len(found)} run(s) left RUNNING by a killed command (pid {pids}) as KILLED")
    return [r for r, _ in found]
