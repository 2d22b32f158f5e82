"""A flow with the task runner its config chooses (tasks/runners.py builds it):

    with_runner(flow, orchestration)   flow.with_options(task_runner=...) for an OrchestrationConfig, a
                                       LifecycleConfig, or a config dict (the CLI's; its `orchestration` section)

Tasks are submitted (`.submit()`) and waited for in the flows, so independent ones (the compression rungs) run at
the same time on either runner."""

from __future__ import annotations

from tasks.config import OrchestrationConfig
from tasks.runners import check_dask_address, task_runner

__all__ = ["check_dask_address", "task_runner", "with_runner"]


def _orchestration(config) -> OrchestrationConfig:
    """The orchestration section of what a caller holds (a dict is read once here: the CLI's dumped config)."""
    if isinstance(config, OrchestrationConfig):
        return config
    if config is None or isinstance(config, dict):
        return OrchestrationConfig.model_validate((config or {}).get("orchestration") or {})
    return config.orchestration  # a LifecycleConfig


def with_runner(flow, config=None):
    """The flow with the task runner of `config`'s orchestration section."""
    orch = _orchestration(config)
    if orch.task_runner == "dask" and orch.dask_address:
        check_dask_address(orch.dask_address)  # one error in seconds, not retries for a minute
    return flow.with_options(task_runner=task_runner(orch))
