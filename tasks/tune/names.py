"""Names of the delta-tuning stage: its fixed labels, a task by name (cpmant.cuge's registry) and a delta's
registered name. Task and method names arrive checked: TuneConfig's validator is their one check (the edge)."""

from __future__ import annotations

ZERO_SHOT = "zero-shot"
FULL = "full"
EVAL_SPLIT = "test"  # every row of a comparison table is scored on the same split
SPLITS = ("train", "valid", EVAL_SPLIT)
DEMO_NOTE = "demo task built from the installed corpus: not a CUGE score"


def get_task(task_name: str):
    """The registered task (imported when first needed: cpmant.cuge loads torch)."""
    from cpmant.cuge import get_task as get

    return get(task_name)


def delta_name(base_name: str, task_name: str, method: str) -> str:
    """`<model>-<task>-<method>`, e.g. cpm-ant-tiny-demo-ccpm-lora."""
    return f"{base_name}-{task_name}-{method}"
