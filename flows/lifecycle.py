"""The whole lifecycle on one config: pretraining, then the compression ladder. Delta tuning and validation join
as their issues land."""

from __future__ import annotations

from prefect import flow

from .compress import compress_flow
from .pretrain import pretrain_flow


@flow(name="lifecycle", log_prints=True)
def lifecycle_flow(config: dict | None = None) -> dict:
    """Steps:
      1. pretrain (subflow): corpus -> vocab -> pretrain -> register `cpm-ant-<preset>@candidate`
      2. compress (subflow): the recipes of `compress.recipes` (default: the four-rung ladder and int8) from it
    """
    pre = pretrain_flow(config)
    comp = compress_flow(pre["model_uri"], None, config)
    return {"pretrain": pre, "compress": comp}
