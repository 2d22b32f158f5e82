"""The flows' task runner, chosen in config (`orchestration`) or on the CLI (`--task-runner`, `--dask-address`):

    task_runner(orch: OrchestrationConfig)     Prefect's ThreadPoolTaskRunner (default) or prefect-dask's
                                               DaskTaskRunner: a local cluster of `dask_workers` processes with one
                                               thread each, or the existing scheduler at `dask_address`
    check_dask_address(address, timeout=3.0)   a scheduler that answers, checked before a flow starts

Processes on a Dask cluster need this repository importable and the same CPMANT_HOME / MLFLOW_TRACKING_URI as the
flow: a local cluster inherits them; start remote workers from the repository root with those variables set
(README: Dask). flows/runners.py applies the runner to a flow (`with_runner`)."""

from __future__ import annotations

from cpmant.errors import CpmantError

from .config import OrchestrationConfig


def task_runner(orch: OrchestrationConfig):
    if orch.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:  # pragma: no cover (a pinned dependency)
            raise CpmantError(f"--task-runner dask needs prefect-dask ({e})", "pip install prefect-dask") from None
        if orch.dask_address:
            _check_address(orch.dask_address)
            return DaskTaskRunner(address=orch.dask_address)
        # processes, not threads: each rung trains in its own interpreter (torch's threads and the GIL apart)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": orch.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=orch.max_workers)


def _check_address(address: str) -> None:
    if not address.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise CpmantError(f"--dask-address {address!r} is not a Dask scheduler address",
                          "give the scheduler's address, e.g. tcp://127.0.0.1:8786 (`dask scheduler` prints it)")


def check_dask_address(address: str, timeout: float = 3.0) -> None:
    """A Dask scheduler address that is well formed, answers a TCP connect and Dask's handshake within `timeout`
    seconds (an unreachable one made distributed retry for about 50 s and print nine tracebacks). The CLI and
    `with_runner` ask it before a flow starts."""
    import asyncio
    import socket
    from urllib.parse import urlsplit

    _check_address(address)
    fix = "give the scheduler's address, e.g. tcp://127.0.0.1:8786 (`dask scheduler` prints it)"
    if not address.startswith(("tcp://", "tls://")):
        return  # in-process and UCX addresses are not TCP endpoints
    try:
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port or 8786
    except ValueError as e:
        raise CpmantError(f"--dask-address {address!r} is not a Dask scheduler address ({e})", fix) from None
    if not host:
        raise CpmantError(f"--dask-address {address!r} names no host", fix)
    fix = ("start it (`dask scheduler`) or check the address; leave out --dask-address to run on a local "
           "cluster")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise CpmantError(f"the Dask scheduler at {address} is unreachable ({e.strerror or e})", fix) from None
    try:  # something listens: it must speak Dask's protocol (a proxy or another server accepts connects too)
        asyncio.run(asyncio.wait_for(_handshake(address, timeout), timeout))  # connect() alone waits on a mute peer
    except Exception as e:  # any failure of the handshake means no scheduler answers there
        why = (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:160]
        raise CpmantError(f"the Dask scheduler at {address} is unreachable: something listens there but does "
                          f"not answer as a Dask scheduler within {timeout:g} s ({why})", fix) from None


async def _handshake(address: str, timeout: float) -> None:
    from distributed.comm import connect

    comm = await connect(address, timeout=timeout)
    await comm.close()
