"""What a stage's task run shows in Prefect's UI: the stage's key lines (loss, metrics, decision) in the task run's
log, and a validation whose gate failed as a state of its own.

    log_lines(*lines) -> None
    pretrain_lines(result, run_id) / validation_lines(res) -> the lines of a pretraining / a validation
    validation_outcome(res) -> res, or Completed(name="Rejected", message=<the failed gates>, data=res)

A rejected validation is a Completed state named `Rejected` (Prefect shows the name in the flow-run graph, the task
list and the task run's page, with the message) and the flow goes on to the next candidate. A task that returns a
state hands its caller that state, so the flow calls the task with `return_state=True` and takes `.result()`: the
same dict either way (`passed` false, `failures`). A Failed state would fail the flow, and a rejection is an
answer, not an error."""

from __future__ import annotations

import logging

from registry.limits import STATE_MESSAGE, cut

REJECTED = "Rejected"  # the state name of a validation whose gate failed


def _logger():
    """The task (or flow) run's logger, whose lines Prefect stores with the run; outside a run, `cpmant`'s."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("cpmant")


def log_lines(*lines: str) -> None:
    """Log each line at INFO in the current Prefect run (the task run's log in the UI)."""
    log = _logger()
    for line in lines:
        log.info("%s", line)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def pretrain_lines(res, run_id: str) -> list[str]:
    """A pretraining's key lines (res: cpmant.training.TrainResult)."""
    start = "" if res.valid_loss_start is None else f"{_fmt(res.valid_loss_start)} -> "
    return [f"pretrained {res.steps} steps ({res.num_parameters / 1e6:.2f} M parameters): final loss "
            f"{_fmt(res.final_loss)}, held-out loss {start}{_fmt(res.valid_loss_end)}",
            f"{_fmt(res.tokens_per_second)} tokens/s, {_fmt(res.train_seconds)} s, MLflow run {run_id}"]


def validation_lines(res: dict) -> list[str]:
    """The validation's key lines: its measurements and its decision."""
    metrics = {k: v for k, v in (res.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(("_ci_low", "_ci_high"))}
    how = "reused validation run" if res.get("reused") else "validation run"
    lines = [f"{res.get('model')}: {how} {res.get('run_id')}", *([res["reason"]] if res.get("reason") else []),
             "metrics: " + (", ".join(f"{k} {_fmt(v)}" for k, v in sorted(metrics.items())) or "none")]
    if res.get("passed"):
        lines.append("decision: every gate passed" + (", now champion" if res.get("promoted") else ""))
    else:
        lines += [f"decision: rejected, gate failed: {f}" for f in res.get("failures") or ["(unnamed)"]]
    return lines


def validation_outcome(res: dict):
    """The validate task's return value, its key lines logged first: the result dict when every gate passed, else a
    Completed state named `Rejected` whose message names the failed gates (its data is the result dict: the
    caller's `.result()` of the state)."""
    log_lines(*validation_lines(res))
    if res.get("passed"):
        return res
    from prefect.states import Completed

    failures = res.get("failures") or ["a gate failed"]
    message = f"{res.get('model', '')} rejected: " + "; ".join(failures)
    return Completed(name=REJECTED, message=cut(message, STATE_MESSAGE), data=res)
