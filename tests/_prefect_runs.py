"""What Prefect's API (the tests' `prefect_harness`) recorded: task runs by name and a task run's log lines, as its
UI shows them."""

from __future__ import annotations


def task_runs(names: list[str] | None = None) -> list:
    """The task runs recorded so far (those named `names` when given), newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    flt = TaskRunFilter(name=TaskRunFilterName(any_=names)) if names else None
    with get_client(sync_client=True) as client:
        return client.read_task_runs(task_run_filter=flt, sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)


def task_run_log(task_run_id) -> list[str]:
    """The messages of a task run's log (after sending whatever is still queued)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])), limit=200)
    return [log.message for log in logs]
