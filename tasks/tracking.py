"""Recording a stage: an MLflow run with energy (codecarbon, offline), emissions, cost and duration; batched
asynchronous metric logging so tracking stays under 1% of training time."""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import signal
import tempfile
import threading
import time
from pathlib import Path

from mlflow.entities import Metric

from .config import TrackingConfig


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """Only finite values: a NaN metric at a step makes MLflow's later log_model at that step fail on SQLite
    (the metrics table's unique key; mlflow/mlflow#26108), which would lose the registration."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def retry_transient(task, task_run, state) -> bool:
    """A task's `retry_condition_fn`: retry only failures that may pass on a second try. A CpmantError (bad input,
    bad environment) is deterministic: it fails at once, without the retry delay."""
    from cpmant.errors import CpmantError

    return not isinstance(getattr(state, "data", None), CpmantError)


@contextlib.contextmanager
def default_sigterm():
    """SIGTERM's default action while a task forks worker processes (the corpus encoder's pool): a flow run
    installs Prefect's SIGTERM bridge (it raises TerminationSignal), and forked workers would inherit it and print
    a TerminationSignal traceback each when the pool terminates them at its end."""
    try:
        old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: nothing was changed
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def cost_rmb(tracking: TrackingConfig, duration_s: float, energy_kwh: float) -> float:
    price = tracking.device_hour_rmb.get(tracking.device)
    if price is None:
        from cpmant.errors import CpmantError

        raise CpmantError(f"no price for device {tracking.device!r} in tracking.device_hour_rmb",
                          f"add it, e.g. tracking.device_hour_rmb.{tracking.device}=1.0")
    return price * tracking.devices * duration_s / 3600.0 + tracking.electricity_rmb_per_kwh * energy_kwh


class AsyncMetricLogger:
    """Queue metrics and send them with MlflowClient.log_batch from a background thread every `flush_steps`."""

    def __init__(self, run_id: str, flush_steps: int = 50):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.flush_steps = MlflowClient(), run_id, flush_steps
        self.buffer: list[Metric] = []
        self.sent: set[tuple[str, int]] = set()
        self.q: queue.Queue = queue.Queue()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._work, daemon=True, name="mlflow-metrics")
        self.thread.start()

    def _work(self):
        while True:
            batch = self.q.get()
            if batch is None:
                return
            try:
                for i in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
                    self.client.log_batch(self.run_id, metrics=batch[i : i + 1000], synchronous=True)
            except Exception as e:  # keep training; report at close
                self.errors.append(e)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Queue finite metrics for `step`; a (key, step) already sent is not sent again, so a replayed step
        never repeats a (key, step, timestamp, value) row."""
        ts = int(time.time() * 1000)
        for k, v in finite(metrics).items():
            if (k, step) not in self.sent:
                self.sent.add((k, step))
                self.buffer.append(Metric(k, v, ts, step))
        if step % self.flush_steps == 0:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.q.put(self.buffer)
            self.buffer = []

    def close(self) -> None:
        """Send what is left. A logging failure is reported as a warning: it must not undo a finished stage."""
        self.flush()
        self.q.put(None)
        self.thread.join()
        if self.errors:
            import warnings

            warnings.warn(f"MLflow metric logging lost some metrics: {self.errors[0]}", RuntimeWarning,
                          stacklevel=2)


# per-step metrics whose name the stage's summary metric takes (logged once, at the final step)
STEP_METRIC_NAMES = {"tokens_per_second": "step_tokens_per_second"}


class MlflowCallbacks:
    """The core loop's callbacks, recording into the active MLflow run. A step's throughput is logged as
    `step_tokens_per_second`: `tokens_per_second` is the stage's summary (the steady-state average)."""

    def __init__(self, logger: AsyncMetricLogger):
        self.logger = logger

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.logger.log(step, {STEP_METRIC_NAMES.get(k, k): v for k, v in metrics.items()})

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.logger.log(step, {k: v for k, v in metrics.items() if k != "valid_tokens"})

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass


class StageRun:
    """The active MLflow run of a stage (`.info`, `.data` as mlflow's Run) and the step its final values are
    logged at: set `final_step` once it is known (a training run's last step) so that the summary metrics, the
    energy and the cost sit beside the last loss, where the logged model reads them."""

    def __init__(self, run):
        self.run, self.final_step = run, 0

    def __getattr__(self, name):
        return getattr(self.run, name)

    def log_final(self, metrics: dict[str, float]) -> None:
        """Log summary metrics at the final step (finite values only)."""
        import mlflow

        mlflow.log_metrics(finite(metrics), step=self.final_step)


def recorded_tracking(tracking: TrackingConfig) -> dict:
    """The tracking section as a run records it: without where the run is filed (parent run, alias policy)."""
    from .config import NON_RESULT_FIELDS

    return tracking.model_dump(mode="json", exclude=set(NON_RESULT_FIELDS["tracking"]) - {"metric_flush_steps"})


@contextlib.contextmanager
def tracked_stage(tracking: TrackingConfig, run_name: str, tags: dict[str, str] | None = None):
    """An MLflow run wrapped in codecarbon's offline tracker; logs energy_kwh, emissions_kg_co2e, cost_rmb,
    duration_s (at the run's final step) and the emissions CSV on exit (also when the stage fails). Yields a
    StageRun."""
    import mlflow
    from codecarbon import OfflineEmissionsTracker

    from registry.tracking import setup_tracking

    tags = {**tracking.parent_tags(), **(tags or {})}  # nested under the lifecycle's stage run, when there is one
    cost_rmb(tracking, 0.0, 0.0)  # an unpriced device is an error now, not after the stage has run
    setup_tracking(tracking.experiment)
    logging.getLogger("codecarbon").setLevel(logging.ERROR)  # its start-up chatter is not the user's business
    with mlflow.start_run(run_name=run_name, tags=tags) as mlrun, tempfile.TemporaryDirectory() as tmp:
        run = StageRun(mlrun)
        tracker = OfflineEmissionsTracker(
            country_iso_code=tracking.country_iso_code, output_dir=tmp, output_file="emissions.csv",
            measure_power_secs=tracking.measure_power_secs, log_level="error", save_to_file=True,
            allow_multiple_runs=True, project_name=run_name,
        )
        tracker.start()
        t0 = time.perf_counter()
        try:
            yield run
        finally:
            duration = time.perf_counter() - t0
            emissions = tracker.stop() or 0.0
            data = tracker.final_emissions_data
            energy = float(getattr(data, "energy_consumed", 0.0) or 0.0)
            run.log_final({
                "energy_kwh": energy,
                "emissions_kg_co2e": float(emissions),
                "cost_rmb": cost_rmb(tracking, duration, energy),
                "duration_s": duration,
            })
            mlflow.log_params({"tracking.country_iso_code": tracking.country_iso_code,
                               "tracking.device": tracking.device, "tracking.devices": tracking.devices})
            csv = Path(tmp) / "emissions.csv"
            if csv.exists():
                mlflow.log_artifact(str(csv), artifact_path="emissions")
