"""Prefect flows: thin DAGs of tasks, one file per stage plus the whole lifecycle."""

from tasks.config import LifecycleConfig  # noqa: E402,F401  (the CLI reads configs through flows, not tasks)
