"""The Dask task runner (prefect-dask): a local cluster of worker processes, or an existing scheduler by address.
The ladder's rungs on a 2-worker local cluster give the serial run's numbers: that end-to-end check runs inside
tests/test_lifecycle.py (its `--force compress` step), which has the serial reference already."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_runner_choice():
    from cpmant.errors import CpmantError
    from flows.runners import task_runner
    from tasks.config import OrchestrationConfig

    assert type(task_runner(OrchestrationConfig())).__name__ == "ThreadPoolTaskRunner"
    local = task_runner(OrchestrationConfig(task_runner="dask", dask_workers=2))
    assert type(local).__name__ == "DaskTaskRunner"
    assert local.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                    "dashboard_address": None}
    remote = task_runner(OrchestrationConfig(task_runner="dask", dask_address="tcp://127.0.0.1:8786"))
    assert remote.address == "tcp://127.0.0.1:8786"
    with pytest.raises(CpmantError):
        task_runner(OrchestrationConfig(task_runner="dask", dask_address="127.0.0.1:8786"))


def test_with_runner_reads_the_orchestration_section_of_any_config():
    """The CLI hands a config dict, the lifecycle its validated config's section: the same runner either way."""
    from prefect import flow

    from flows.config import LifecycleConfig
    from flows.runners import with_runner

    @flow
    def noop() -> None:
        return None

    dask = {"orchestration": {"task_runner": "dask", "dask_workers": 3}}
    for given in (dask, LifecycleConfig.model_validate(dask), LifecycleConfig.model_validate(dask).orchestration):
        runner = with_runner(noop, given).task_runner
        assert type(runner).__name__ == "DaskTaskRunner" and runner.cluster_kwargs["n_workers"] == 3
    assert type(with_runner(noop, None).task_runner).__name__ == "ThreadPoolTaskRunner"
