"""Serve a model over HTTP with MLflow's scoring server (`/invocations`), after the same checks a pull makes.

    from registry.serve import serve
    serve("models:/cpm-ant-tiny@champion", port=0)      # blocks; prints the real address; Ctrl+C stops it

What is served is a local folder whose checkpoint files were just verified: a registry version is downloaded (into
the cache) and checked against its sha256 tags; a local checkpoint folder is checked (it must load) and wrapped as a
pyfunc model; a local MLflow model folder has its checkpoint checked. A delta is served composed with its base:
the base it names is pulled and checked against the delta's sha256 before the server starts. The arguments are
checked before anything starts (port in range and free, workers >= 1, a known host); `port=0` picks a free port. The server runs in its own
process group, and that whole group is stopped when `serve` returns, raises, or its process gets SIGTERM, SIGINT or
SIGHUP; should this process be killed outright, the server's leader gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
The server is MLflow's scoring app behind `registry.serving_app.guard` (a request body over 1 MiB is answered 413,
prompts that are not strings 400).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cpmant.checkpoint import is_complete
from cpmant.errors import CpmantError

from .pulling import base_of, cached_model, check_local_checkpoint, model_checkpoint
from .tracking import tracking_uri

SOURCE_FIX = ("serve models:/NAME/VERSION, models:/NAME@ALIAS, a checkpoint folder (with cpmant_meta.json) or an "
              "MLflow model folder (with MLmodel)")
STOP_GRACE_S = 10.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def check_args(host: str, port: int, workers: int) -> None:
    """Plain checks of the arguments, before anything is downloaded or started."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise CpmantError(f"--workers {workers} is not a positive number of processes", "pass --workers 1 or more")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise CpmantError(f"--port {port} is not a TCP port", "pass --port 1-65535, or --port 0 for a free port")
    if not isinstance(host, str) or not host.strip():
        raise CpmantError("--host is empty", "pass --host 127.0.0.1 (this machine only)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_port(host: str, port: int) -> int:
    """Bind (host, port) as the server will (SO_REUSEADDR) and release it: the port, or a free one for 0.
    A port in use, a privileged port, or a host that is not an address of this machine is a CpmantError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CpmantError(f"cannot listen on host {host!r} ({e.strerror})",
                          "pass --host 127.0.0.1 (this machine only) or an address of this machine") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except PermissionError:
            raise CpmantError(f"port {port} needs administrator rights", "pass --port above 1023 (or 0)") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CpmantError(f"port {port} on {host} is already in use",
                                  "stop what listens there, pass another --port, or --port 0 for a free one") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise CpmantError(f"{host} is not an address of this machine",
                                  "pass --host 127.0.0.1 (this machine only) or one of its addresses") from None
            raise CpmantError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                              "pass another --host or --port") from None
        return s.getsockname()[1]


@contextlib.contextmanager
def servable(uri: str) -> Iterator[tuple[str, Path]]:
    """(what is served, a verified local MLflow model folder) for `uri`; a temporary wrapper is removed on exit."""
    if not isinstance(uri, str) or not uri.strip():
        raise CpmantError("no model given", SOURCE_FIX)
    if uri.startswith("models:/"):
        label, folder, ckpt = cached_model(uri, verify=True)  # downloaded and every file checked against its tag
        check_delta_base(ckpt)
        yield label, folder
        return
    p = Path(uri).expanduser()
    if not p.exists():
        scheme = uri.split(":", 1)[0] if ":" in uri else ""
        what = f"a {scheme}: URI" if scheme and "/" in uri.split(":", 1)[1][:2] else "not an existing folder"
        raise CpmantError(f"cannot serve {uri!r}: it is {what}", SOURCE_FIX)
    if not p.is_dir():
        raise CpmantError(f"cannot serve {uri!r}: it is a file", SOURCE_FIX)
    p = p.resolve()
    if (p / "MLmodel").is_file():
        check_delta_base(check_local_checkpoint(model_checkpoint(p)))
        yield str(p), p
        return
    if not is_complete(p):
        raise CpmantError(f"cannot serve {uri!r}: it holds neither cpmant_meta.json nor MLmodel", SOURCE_FIX)
    check_delta_base(check_local_checkpoint(p))
    from cpmant.paths import subdir

    tmp = Path(tempfile.mkdtemp(prefix="serve-", dir=subdir("cache", "serve")))
    try:
        yield str(p), _wrap_checkpoint(p, tmp / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_delta_base(ckpt: Path) -> None:
    """For a delta: its base is pulled (cached, verified) and its sha256 matches the delta's, before any server
    starts (the server's workers then find it in the cache). Nothing for a plain checkpoint."""
    from cpmant.delta.checkpoint import check_base, is_delta_checkpoint, read_delta_config

    if is_delta_checkpoint(ckpt):
        check_base(base_of(ckpt), read_delta_config(ckpt), ckpt)


def _wrap_checkpoint(ckpt: Path, dest: Path) -> Path:
    """Save a pyfunc model around a checkpoint folder (copied into it), as registering would log it."""
    import warnings

    import mlflow

    from .register import PYFUNC_CODE, model_signature, pip_requirements

    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    mlflow.pyfunc.save_model(path=str(dest), python_model=str(PYFUNC_CODE), artifacts={"checkpoint": str(ckpt)},
                             signature=model_signature(), pip_requirements=pip_requirements())
    return dest


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def _die_with_parent_fn():
    """A preexec_fn (run in the child between fork and exec; libc is loaded before the fork) that makes the kernel
    send the child SIGTERM when this process dies, even by SIGKILL; None where prctl is not available."""
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is None:
        return None

    def set_pdeathsig() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return set_pdeathsig


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc; [pgid] when /proc cannot tell."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d))
    return out


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the server's process group, wait for every member, SIGKILL what is left after `grace_s`."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                proc.poll()  # reap the leader (ours), so that it does not linger as a zombie
            if not _group_members(pgid):
                return
            time.sleep(0.1)
    with contextlib.suppress(Exception):
        proc.wait(timeout=1)


def _say(line: str) -> None:
    print(line, flush=True)  # flushed: a pipe reading `cpmant serve` sees the address at once


def serve(uri: str, host: str = "127.0.0.1", port: int = 5001, workers: int = 1,
          say: Callable[[str], None] = _say, *, launch: Callable[..., subprocess.Popen] = subprocess.Popen) -> str:
    """Serve `uri` until the server exits or this process is told to stop; return the closing line.

    Raises CpmantError for bad arguments, a model that fails its checks, or a server that exits with an error.
    `say` receives the warning for a non-loopback host and the `serving ... on http://HOST:PORT/invocations` line
    (with the real port), printed only once every check has passed and the server has started. `launch` starts the
    server process (subprocess.Popen's signature; tests pass a stand-in)."""
    check_args(host, port, workers)
    if port:
        bind_port(host, port)  # fail fast, before any download
    with servable(uri) as (label, folder):
        real_port = bind_port(host, port)  # again just before the start; 0 becomes a free port here
        if not is_loopback(host):
            say(f"warning: --host {host} makes the model reachable from other machines, without authentication; "
                "use --host 127.0.0.1 unless that is what you want")
        # mlflow execs `uvicorn` by name: put this environment's scripts first on PATH even when it is not activated
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri(),
               "MLFLOW_REGISTRY_URI": tracking_uri()}
        # MLflow's scoring app, guarded: bodies over 1 MiB get 413, prompts that are not strings 400 (serving_app)
        cmd = [sys.executable, "-m", "registry.serving_app", "serve", "-m", str(folder),
               "--host", host, "--port", str(real_port), "--workers", str(workers)]
        stopped: list[int] = []
        started: list[subprocess.Popen] = []

        def on_signal(signum, frame):
            stopped.append(signum)
            for p in started:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)

        previous = {}  # handlers go in before the start: a signal in between still stops the group
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, on_signal) for s in _STOP_SIGNALS}
        try:
            started.append(launch(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent_fn(),
                                  stdin=subprocess.DEVNULL))
            shown = f"[{host}]" if ":" in host else host
            say(f"serving {label} on http://{shown}:{real_port}/invocations (Ctrl+C stops it)")
            rc = started[0].wait()
        finally:
            if started:
                stop_group(started[0])
            for s, h in previous.items():
                signal.signal(s, h)
    if stopped:
        return f"stopped serving {label} ({signal.Signals(stopped[0]).name})"
    if rc != 0:
        raise CpmantError(f"the MLflow scoring server for {label} exited with code {rc}",
                          "its output is above; check that the port is still free and the model loads "
                          "(`cpmant generate` with the same URI)")
    return f"the server for {label} stopped"
