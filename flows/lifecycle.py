"""The whole lifecycle on one config: pretraining, then the compression ladder. Delta tuning and validation join
as their issues land."""

from __future__ import annotations

from prefect import flow

from .compress import compress_flow
from .pretrain import pretrain_flow


@flow(name="lifecycle", log_prints=True)
def lifecycle_flow(config: dict | None = None, force: bool = False) -> dict:
    """Steps:
      1. pretrain (subflow): corpus -> vocab -> pretrain -> register `cpm-ant-<preset>@candidate`, or the existing
         version made from the same config, data and code
      2. compress (subflow): the recipes of `compress.recipes` (default: the four-rung ladder and int8) from it,
         each reused when its inputs match
    `force` reruns every stage even when an identical result exists.
    """
    pre = pretrain_flow(config, force=force)
    comp = compress_flow(pre["model_uri"], None, config, force=force)
    return {"pretrain": pre, "compress": comp, "summary": pre["summary"] + comp["summary"]}
