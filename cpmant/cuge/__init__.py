"""CUGE tasks (CPM-Ant's six) and the demo tasks built from the installed corpus: loaders, CPM-Ant formatting,
metrics.

    from cpmant.cuge import get_task, task_names
    task = get_task("demo-lcsts")            # or "lcsts" with --data DIR / $CUGE_DATA/lcsts
    train = task.load("train")               # list of Example (an Examples list with .rows / .malformed)
    loss = task.training_loss(model, tokenizer, train[:8])
    scores = task.evaluate(model, tokenizer, task.load("test"))   # {metric: percent}, task.primary_metric in it
"""

from . import tasks  # noqa: F401  (the six CUGE tasks register themselves)
from .base import SPLITS, Example, Examples, Task, get_task, register_task, task_names
from .demo import DEMOS, DemoTask, build_demo_task
from .mathexpr import EquationError, evaluate_expression

__all__ = ["SPLITS", "Example", "Examples", "Task", "DemoTask", "DEMOS", "get_task", "register_task", "task_names",
           "build_demo_task", "evaluate_expression", "EquationError"]
