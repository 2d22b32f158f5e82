"""The delta-tuning stage's Prefect tasks: the zero-shot score of the base per task, one tracked and registered
delta per (model, task, method) (or the one recorded with the same reuse key), then a comparison table per task.

    names.py      the stage's labels, get_task, delta_name (names arrive checked by TuneConfig, the edge)
    keys.py       the one reuse rule: zero_shot_key, delta_key (cpmant.hashing), the task data's hash
    zero_shot.py  zero_shot(tune, tracking, base_uri, task_name, force) -> row
    delta.py      tune_delta(tune, tracking, base_uri, task_name, method, force) -> row
    compare.py    comparison_table(tracking, base_uri, task_name, zero, rows, tune) -> table rows;
                  paired_comparisons, table_rows, reading (no Prefect or MLflow needed)
    scores.py     test scores with intervals and stored per-example predictions

The core does the work (`cpmant.cuge`: tasks, formatting, metrics; `cpmant.delta`: methods, the tuning loop,
delta-only checkpoints, scoring); registry/tune_records.py records it in MLflow. A row says why it was reused or
made (`reason`, the line tasks.reuse.decide printed).
"""

from __future__ import annotations

from .compare import TABLE_COLUMNS, comparison_table, paired_comparisons, reading, table_rows
from .delta import tune_delta
from .names import DEMO_NOTE, FULL, ZERO_SHOT, delta_name
from .zero_shot import zero_shot

__all__ = ["TABLE_COLUMNS", "DEMO_NOTE", "FULL", "ZERO_SHOT", "comparison_table", "delta_name", "paired_comparisons",
           "reading", "table_rows", "tune_delta", "zero_shot"]
