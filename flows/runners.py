"""The flows' task runner, chosen in config (`orchestration`) or on the CLI (`--task-runner`, `--dask-address`):

    task_runner(orch: OrchestrationConfig)     Prefect's ThreadPoolTaskRunner (default) or prefect-dask's
                                               DaskTaskRunner: a local cluster of `dask_workers` processes with one
                                               thread each, or the existing scheduler at `dask_address`
    with_runner(flow, config: dict | None)     flow.with_options(task_runner=...) for the config's orchestration

Tasks are submitted (`.submit()`) and waited for in the flows, so independent ones (the compression rungs) run at
the same time on either runner. Processes on a Dask cluster need this repository importable and the same
CPMANT_HOME / MLFLOW_TRACKING_URI as the flow: a local cluster inherits them; start remote workers from the
repository root with those variables set (README: Dask)."""

from __future__ import annotations

from tasks.config import OrchestrationConfig


def task_runner(orch: OrchestrationConfig):
    if orch.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:  # pragma: no cover (a pinned dependency)
            from cpmant.errors import CpmantError

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
    from cpmant.errors import CpmantError

    if not address.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise CpmantError(f"--dask-address {address!r} is not a Dask scheduler address",
                          "give the scheduler's address, e.g. tcp://127.0.0.1:8786 (`dask scheduler` prints it)")


def with_runner(flow, config: dict | None):
    """The flow with the task runner of `config`'s orchestration section."""
    from .config import LifecycleConfig

    cfg = LifecycleConfig.model_validate(config or {})
    return flow.with_options(task_runner=task_runner(cfg.orchestration))
