"""The whole lifecycle on one config. For now: pretraining; later stages (compression, delta tuning,
validation) join as their issues land."""

from __future__ import annotations

from prefect import flow

from .pretrain import pretrain_flow


@flow(name="lifecycle", log_prints=True)
def lifecycle_flow(config: dict | None = None) -> dict:
    """Steps:
      1. pretrain (subflow): corpus -> vocab -> pretrain -> register `cpm-ant-<preset>@candidate`
    """
    return {"pretrain": pretrain_flow(config)}
