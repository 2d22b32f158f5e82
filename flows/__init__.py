"""Prefect flows: thin DAGs of tasks, one file per stage plus the whole lifecycle (config in flows/config.py)."""
