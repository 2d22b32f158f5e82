"""Recording a stage: an MLflow run with energy (codecarbon, offline), emissions, cost and duration; batched
asynchronous metric logging so tracking stays under 1% of training time."""

from __future__ import annotations

import contextlib
import math
import queue
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


class MlflowCallbacks:
    """The core loop's callbacks, recording into the active MLflow run."""

    def __init__(self, logger: AsyncMetricLogger):
        self.logger = logger

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.logger.log(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.logger.log(step, {k: v for k, v in metrics.items() if k != "valid_tokens"})

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass


@contextlib.contextmanager
def tracked_stage(tracking: TrackingConfig, run_name: str, tags: dict[str, str] | None = None):
    """An MLflow run wrapped in codecarbon's offline tracker; logs energy_kwh, emissions_kg_co2e, cost_rmb,
    duration_s and the emissions CSV on exit (also when the stage fails)."""
    import mlflow
    from codecarbon import OfflineEmissionsTracker

    from registry.tracking import setup_tracking

    cost_rmb(tracking, 0.0, 0.0)  # an unpriced device is an error now, not after the stage has run
    setup_tracking(tracking.experiment)
    with mlflow.start_run(run_name=run_name, tags=tags) as run, tempfile.TemporaryDirectory() as tmp:
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
            mlflow.log_metrics(finite({
                "energy_kwh": energy,
                "emissions_kg_co2e": float(emissions),
                "cost_rmb": cost_rmb(tracking, duration, energy),
                "duration_s": duration,
            }))
            mlflow.log_params({"tracking.country_iso_code": tracking.country_iso_code,
                               "tracking.device": tracking.device, "tracking.devices": tracking.devices})
            csv = Path(tmp) / "emissions.csv"
            if csv.exists():
                mlflow.log_artifact(str(csv), artifact_path="emissions")
