"""Metering a stage: its MLflow run (opened through registry/) with energy (codecarbon, offline), emissions, cost
and duration; batched asynchronous metric logging so tracking stays under 1% of training time.

Energy and time are counted once. codecarbon measures the whole machine, and a stage's runs may overlap (the
compression rungs run side by side), so the runs of one process that overlap in time share one measurement
(SharedMeter: ref-counted, started by the first run, stopped by the last). The rule for a run's share: the measured
interval is cut into segments at every run's start and end, and each segment's wall time, energy and emissions are
split equally among the runs active in it. A run's share is final when it ends; the shares of overlapping runs add up
to the measurement, so `duration_s` summed over a stage's runs is the stage's tracked wall time, and `energy_kwh`,
`emissions_kg_co2e` and `cost_rmb` summed are the stage's. `elapsed_s` is a run's own wall time.

Processes cannot share a tracker: each process has its own meter. Inside a Dask worker the meter counts its process's
share of CPU and RAM (codecarbon's `process` mode) rather than the whole machine, so that N workers do not count the
machine N times (the machine's idle draw is then in no run)."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import queue
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from registry import run_records, runs
from registry.tracking import setup_tracking

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
    """Queue metrics and send them (registry.run_records.log_batch) from a background thread every `flush_steps`."""

    def __init__(self, run_id: str, flush_steps: int = 50):
        self.client, self.run_id, self.flush_steps = run_records.metric_client(), run_id, flush_steps
        self.buffer: list[tuple[str, float, int, int]] = []  # (key, value, step, timestamp ms)
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
                for ts in dict.fromkeys(t for *_, t in batch):  # one call per timestamp (usually one)
                    run_records.log_batch(self.run_id, [(k, v, step) for k, v, step, t in batch if t == ts],
                                          timestamp_ms=ts, client=self.client)
            except Exception as e:  # keep training; report at close
                self.errors.append(e)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Queue finite metrics for `step`; a (key, step) already sent is not sent again, so a replayed step
        never repeats a (key, step, timestamp, value) row."""
        ts = int(time.time() * 1000)
        for k, v in finite(metrics).items():
            if (k, step) not in self.sent:
                self.sent.add((k, step))
                self.buffer.append((k, v, step, ts))
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
        runs.log_metrics(finite(metrics), step=self.final_step)


def recorded_tracking(tracking: TrackingConfig) -> dict:
    """The tracking section as a run records it: without where the run is filed (parent run, alias policy)."""
    from .config import NON_RESULT_FIELDS

    return tracking.model_dump(mode="json", exclude=set(NON_RESULT_FIELDS["tracking"]) - {"metric_flush_steps"})


# ---- energy, measured once per stage ------------------------------------------------------------------------
class EnergySource(Protocol):
    """What a SharedMeter reads: energy and emissions since the previous read (or since `start`)."""

    def start(self) -> None: ...

    def read(self) -> tuple[float, float]:  # (kWh, kg CO2e) since the previous read
        ...

    def stop(self) -> tuple[float, float]:  # the last segment; the source is released
        ...


class CodecarbonSource:
    """codecarbon's offline tracker in task mode: each read closes one codecarbon task (the segment since the last
    read, measured by codecarbon's own `stop_task`) and opens the next. `tracking_mode` "machine" measures the
    whole machine; "process" this process's share of its CPU and RAM (used inside Dask workers, see SharedMeter)."""

    def __init__(self, tracking: TrackingConfig, tracking_mode: str = "machine"):
        self.tracking, self.mode, self.tracker = tracking, tracking_mode, None

    def start(self) -> None:
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)  # its start-up chatter is not the user's business
        try:
            self.tracker = OfflineEmissionsTracker(
                country_iso_code=self.tracking.country_iso_code,
                measure_power_secs=self.tracking.measure_power_secs, log_level="error", output_methods=[],
                allow_multiple_runs=True, tracking_mode=self.mode, project_name="cpmant")
            self.tracker.start_task()
        except Exception as e:  # no measurement must not fail the stage: its runs then record 0 kWh
            warnings.warn(f"codecarbon could not start ({e}): energy is recorded as 0 kWh", RuntimeWarning,
                          stacklevel=2)
            self.tracker = None

    def _segment(self) -> tuple[float, float]:
        if self.tracker is None:
            return 0.0, 0.0
        try:
            data = self.tracker.stop_task()
        except Exception as e:  # a failed reading must not fail the stage: the segment counts as unmeasured
            warnings.warn(f"codecarbon could not measure a segment ({e}); it counts as 0 kWh", RuntimeWarning,
                          stacklevel=3)
            return 0.0, 0.0
        if data is None:
            return 0.0, 0.0
        return float(data.energy_consumed or 0.0), float(data.emissions or 0.0)

    def read(self) -> tuple[float, float]:
        out = self._segment()
        if self.tracker is not None:
            self.tracker.start_task()
        return out

    def stop(self) -> tuple[float, float]:
        out = self._segment()
        if self.tracker is not None:
            self.tracker.stop()
        return out


SEGMENT_COLUMNS = ("start_s", "end_s", "runs_active", "segment_energy_kwh", "segment_emissions_kg_co2e",
                   "share_wall_s", "share_energy_kwh", "share_emissions_kg_co2e")


@dataclass
class EnergyShare:
    """One run's share of a meter's measurement: its apportioned wall time, energy and emissions, and the segments
    they came from (start and end relative to the group's start, runs active, the segment's measured values)."""

    wall_s: float = 0.0
    energy_kwh: float = 0.0
    emissions_kg_co2e: float = 0.0
    segments: list[dict] = field(default_factory=list)

    def add(self, segment: dict) -> None:
        self.wall_s += segment["share_wall_s"]
        self.energy_kwh += segment["share_energy_kwh"]
        self.emissions_kg_co2e += segment["share_emissions_kg_co2e"]
        self.segments.append(segment)

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=SEGMENT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.segments)
        return out.getvalue()


@dataclass
class MeterGroup:
    """A meter's measurement from the first run's start to the last run's end (the runs that overlapped)."""

    runs: int = 0
    wall_s: float = 0.0
    energy_kwh: float = 0.0
    emissions_kg_co2e: float = 0.0


class SharedMeter:
    """One energy measurement shared by the tracked runs that overlap in time in this process (ref-counted: the
    source starts with the first run and stops with the last).

    The rule: the measured interval is cut into segments at every run's start and end; each segment's wall time,
    energy and emissions are split equally among the runs active in it. A run's share is final when it ends (later
    segments are not its), and the shares of a group add up to the group's measurement (`last_group`)."""

    def __init__(self, source_factory: Callable[[], EnergySource], clock: Callable[[], float] = time.perf_counter):
        self.source_factory, self.clock = source_factory, clock
        self.lock = threading.Lock()
        self.active: list[EnergyShare] = []
        self.source: EnergySource | None = None
        self.group = self.last_group = None
        self.t_start = self.t_last = 0.0

    def enter(self) -> EnergyShare:
        share = EnergyShare()
        with self.lock:
            if not self.active:
                self.source = self.source_factory()
                self.source.start()
                self.group, self.t_start = MeterGroup(), self.clock()
                self.t_last = self.t_start
            else:
                self._segment(self.source.read())
            self.active.append(share)
            self.group.runs += 1
        return share

    def exit(self, share: EnergyShare) -> EnergyShare:
        with self.lock:
            last = len(self.active) == 1
            self._segment(self.source.stop() if last else self.source.read())
            self.active = [s for s in self.active if s is not share]
            if last:
                self.source, self.last_group = None, self.group
        return share

    def _segment(self, measured: tuple[float, float]) -> None:
        """The segment since the last event, split equally among the active runs."""
        now = self.clock()
        dt, (kwh, kg), n = now - self.t_last, measured, len(self.active)
        g = self.group
        g.wall_s, g.energy_kwh, g.emissions_kg_co2e = g.wall_s + dt, g.energy_kwh + kwh, g.emissions_kg_co2e + kg
        for s in self.active:
            s.add({"start_s": self.t_last - self.t_start, "end_s": now - self.t_start, "runs_active": n,
                   "segment_energy_kwh": kwh, "segment_emissions_kg_co2e": kg, "share_wall_s": dt / n,
                   "share_energy_kwh": kwh / n, "share_emissions_kg_co2e": kg / n})
        self.t_last = now


_METERS: dict[tuple, SharedMeter] = {}
_METERS_LOCK = threading.Lock()


def _in_dask_worker() -> bool:
    if "distributed" not in sys.modules:  # never import Dask for a thread run
        return False
    try:
        sys.modules["distributed"].get_worker()
        return True
    except Exception:
        return False


def process_meter(tracking: TrackingConfig) -> SharedMeter:
    """This process's meter for the tracking settings: the runs of a stage overlapping in threads share it. Inside
    a Dask worker process the tracker counts this process's share of CPU and RAM (codecarbon's `process` mode):
    meters of other processes cannot be shared, and each counting the whole machine would count it once per
    worker."""
    mode = "process" if _in_dask_worker() else "machine"
    key = (tracking.country_iso_code, tracking.measure_power_secs, mode)
    with _METERS_LOCK:
        if key not in _METERS:
            _METERS[key] = SharedMeter(lambda: CodecarbonSource(tracking, mode))
        return _METERS[key]


@contextlib.contextmanager
def tracked_stage(tracking: TrackingConfig, run_name: str, tags: dict[str, str] | None = None,
                  meter: SharedMeter | None = None):
    """An MLflow run with its share of the stage's energy measurement (`meter`, default: this process's codecarbon
    meter, shared by the runs that overlap it). On exit (also when the stage fails) it logs at the run's final step
    its shares: `duration_s` (wall time), `energy_kwh`, `emissions_kg_co2e`, `cost_rmb` (device-hours on the
    apportioned duration plus electricity on the apportioned energy), and `elapsed_s` (its own wall time); the
    segments its share came from as `emissions/emissions.csv`. Yields a StageRun."""
    tags = {**tracking.parent_tags(), **(tags or {})}  # nested under the lifecycle's stage run, when there is one
    cost_rmb(tracking, 0.0, 0.0)  # an unpriced device is an error now, not after the stage has run
    setup_tracking(tracking.experiment)
    meter = meter or process_meter(tracking)
    with run_records.start_run(run_name, tags) as mlrun:
        run = StageRun(mlrun)
        share = meter.enter()
        t0 = time.perf_counter()
        try:
            yield run
        finally:
            elapsed = time.perf_counter() - t0
            meter.exit(share)
            run.log_final({
                "energy_kwh": share.energy_kwh,
                "emissions_kg_co2e": share.emissions_kg_co2e,
                "cost_rmb": cost_rmb(tracking, share.wall_s, share.energy_kwh),
                "duration_s": share.wall_s,
                "elapsed_s": elapsed,
            })
            runs.log_params({"tracking.country_iso_code": tracking.country_iso_code,
                             "tracking.device": tracking.device, "tracking.devices": tracking.devices})
            runs.log_text(share.csv(), "emissions/emissions.csv")
