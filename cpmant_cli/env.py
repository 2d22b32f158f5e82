"""The environment of the `cpmant` process, set before Prefect or MLflow is imported: homes under CPMANT_HOME,
telemetry off, no progress bars or INFO chatter from MLflow's internals, an ephemeral Prefect API start-up timeout
that suits a 2-core machine, OpenMP threads that sleep rather than spin while they wait (cpmant/threads.py).
Explicit settings in the environment win.

A home that moved (home.json names another path) has its stored locations rewritten first (follow_moved_home).

Also what keeps Prefect quiet and interruptible around the flows: a reachable API checked first, the temporary
server started outside the terminal's process group (Ctrl+C stops the flow, not the server it must report to), and
a clear error printed once instead of Prefect's tracebacks."""

from __future__ import annotations

import logging
import os
import subprocess
import urllib.error
import urllib.request
import warnings

from cpmant.errors import CpmantError

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_API_REQUEST_TIMEOUT": "120",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "5",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no tqdm bars for the registry's internal downloads
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # no "Creating initial MLflow database tables..." and the like
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure_environment() -> None:
    from cpmant.paths import cpmant_home
    from cpmant.threads import apply_thread_env_defaults

    # before torch is imported (the CLI imports it later, and torchrun's workers inherit the environment):
    # GOMP_SPINCOUNT=100000: OpenMP threads spin a third as long as libgomp's default before they sleep, so another
    # process on the same cores no longer collapses the training step while the quiet case keeps its speed
    # (figures and reasoning in cpmant/threads.py)
    apply_thread_env_defaults()

    home = cpmant_home()
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
    # MLflow's advice to type-hint `predict` is for model authors, not for the user registering a checkpoint
    warnings.filterwarnings("ignore", message=r".*type hints to the `predict` method")
    follow_moved_home(home)


def follow_moved_home(home) -> None:
    """A home copied, moved or restored elsewhere: rewrite its stores' locations before any verb (or Prefect's
    temporary server) opens them (registry.tracking.relocate_home). The usual case reads home.json only."""
    from cpmant.paths import home_record

    rec = home_record(home).get("path")
    if rec == str(home) or (rec is None and not (home / "mlflow.db").is_file()):
        return
    from registry.tracking import relocate_home

    relocate_home()


def check_prefect_api(timeout: float = 5.0) -> None:
    """With PREFECT_API_URL set, ask the server's /health first: an unreachable server is one CpmantError, not
    Prefect's retries and a long traceback."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        return
    if not url.startswith(("http://", "https://")):
        raise CpmantError(f"PREFECT_API_URL={url!r} is not an http(s) URL",
                          "set it to the server's API, e.g. http://127.0.0.1:4200/api, or unset it")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
            problem = f"answered HTTP {r.status}"
    except urllib.error.HTTPError as e:
        problem = f"answered HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        problem = f"is unreachable ({getattr(e, 'reason', e)})"
    raise CpmantError(
        f"the Prefect API at {url} {problem}",
        "start it (`prefect server start`, see infra/), or unset PREFECT_API_URL to run on a temporary local server",
    )


class _OwnProcessGroup:
    """`subprocess` as Prefect's server module sees it: Popen starts the child in a new process group, so the
    terminal's Ctrl+C (sent to the foreground group) interrupts the flow and leaves the server it reports to."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802  (the name Prefect calls)
        kwargs.setdefault("process_group", 0)
        proc = subprocess.Popen(*args, **kwargs)
        from .stale_servers import record_server

        try:
            record_server(proc.pid)  # so the next command can stop it if this one is killed (stale_servers.py)
        except OSError as e:  # the server still runs; only the clean-up after a SIGKILL is lost
            warnings.warn(f"could not record Prefect's temporary server (pid {proc.pid}): {e}")
        return proc


def isolate_prefect_server() -> None:
    """Start Prefect's temporary API server (used when PREFECT_API_URL is unset) in its own process group.

    Prefect 3.9 starts it with `subprocess.Popen` in the caller's process group; Ctrl+C then kills it with the flow,
    and the flow's final state reports and event flushes retry against a dead server for minutes before an httpx
    traceback. The server is still stopped at exit (Prefect's atexit hook terminates it)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api import server

    if not isinstance(server.subprocess, _OwnProcessGroup):
        server.subprocess = _OwnProcessGroup()


class _HideCpmantErrors(logging.Filter):
    """Drop Prefect's console records about a CpmantError (the failed task's and flow's tracebacks and state
    lines) or a Ctrl+C: the CLI prints that error once, as `error:` and `fix:`, or says how to resume. The records
    still reach Prefect's API (the UI shows the failed or crashed runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (CpmantError, KeyboardInterrupt)):
            return False
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            msg = record.getMessage()
            if any(w in msg for w in ("CpmantError", "KeyboardInterrupt", "aborted by an interrupt signal")):
                return False
        return True


def quiet_prefect_console() -> None:
    """Add the filter to Prefect's console handlers (on the root logger once Prefect has set up logging)."""
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for h in logger.handlers:
            if type(h).__name__ == "PrefectConsoleHandler" and not any(
                    isinstance(f, _HideCpmantErrors) for f in h.filters):
                h.addFilter(_HideCpmantErrors())


if __name__ == "__main__":  # `python -m cpmant_cli.env`: a copied home's locations rewritten before `mlflow ui`
    import sys

    try:
        configure_environment()
    except CpmantError as e:
        sys.exit(f"error: {e.problem}\nfix: {e.fix}")
