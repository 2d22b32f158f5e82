"""Prefect tasks: each wraps one core step and records it in MLflow (run, metrics, artifacts, energy, cost)."""
