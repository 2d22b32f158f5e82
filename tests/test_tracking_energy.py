"""Energy and time counted once (tasks/metering.py): tracked runs that overlap in one process share one measurement,
each gets an equal share of every segment it was active in, and the shares add up to the measurement; the lifecycle's
runs log their wall time as `duration_s`."""

from __future__ import annotations

import csv
import io
import threading
import time

import pytest

pytestmark = pytest.mark.unit

POWER_W = 100.0
GRID_KG_PER_KWH = 0.582


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (making one takes seconds on a loaded machine)."""
    import mlflow

    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(tmp_path_factory.mktemp("home")))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)
    mp.undo()


class FakeSource:
    """A machine drawing POWER_W: energy = power x time since the previous read. It records every event's time and
    the total it measured, independently of the meter's arithmetic."""

    def __init__(self):
        self.events: list[float] = []
        self.total_kwh = 0.0

    def _since_last(self) -> tuple[float, float]:
        now = time.perf_counter()
        kwh = POWER_W * (now - self.events[-1]) / 3.6e6
        self.events.append(now)
        self.total_kwh += kwh
        return kwh, kwh * GRID_KG_PER_KWH

    def start(self):
        self.events.append(time.perf_counter())

    def read(self):
        return self._since_last()

    def stop(self):
        return self._since_last()


class Recording:
    """Wraps a real source and sums what it measured."""

    def __init__(self, source):
        self.source, self.total_kwh, self.total_kg = source, 0.0, 0.0

    def start(self):
        self.source.start()

    def _add(self, v):
        self.total_kwh, self.total_kg = self.total_kwh + v[0], self.total_kg + v[1]
        return v

    def read(self):
        return self._add(self.source.read())

    def stop(self):
        return self._add(self.source.stop())


def _two_overlapping_runs(tracking, meter, hold_a=0.3, hold_b=0.5):
    """Run A starts; run B starts once A is inside and A ends hold_a s after B entered; B ends hold_b s after it
    entered (a partial overlap). Returns the MLflow runs (a, b)."""
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking
    from tasks.metering import tracked_stage

    setup_tracking(tracking.experiment)  # a fresh store takes seconds to create: before the clocks start
    a_in, b_in, ids, errors = threading.Event(), threading.Event(), {}, []

    def run_a():
        try:
            with tracked_stage(tracking, "rung-a", meter=meter) as run:
                ids["a"] = run.info.run_id
                a_in.set()
                assert b_in.wait(60)
                end = time.perf_counter() + hold_a
                while time.perf_counter() < end:  # a busy loop: work, not a sleep
                    pass
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            a_in.set()

    def run_b():
        assert a_in.wait(60)
        try:
            with tracked_stage(tracking, "rung-b", meter=meter) as run:
                ids["b"] = run.info.run_id
                b_in.set()
                time.sleep(hold_b)
        except BaseException as e:
            errors.append(e)
            b_in.set()

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    client = MlflowClient()
    return client.get_run(ids["a"]), client.get_run(ids["b"])


def test_two_concurrent_runs_share_one_measurement(store):
    from mlflow.tracking import MlflowClient

    from tasks.config import TrackingConfig
    from tasks.metering import SharedMeter

    tracking = TrackingConfig(experiment="energy-test", electricity_rmb_per_kwh=1.0)
    sources: list[FakeSource] = []
    meter = SharedMeter(lambda: sources.append(FakeSource()) or sources[-1])
    a, b = _two_overlapping_runs(tracking, meter)
    assert len(sources) == 1  # one measurement for the two runs
    src = sources[0]
    t0, t1, t2, t3 = src.events  # A starts, B starts, A ends, B ends
    wall = t3 - t0
    ma, mb = a.data.metrics, b.data.metrics

    # the shares add up to the measurement (within 5%; the meter's clock reads microseconds after the source's)
    assert ma["energy_kwh"] + mb["energy_kwh"] == pytest.approx(src.total_kwh, rel=0.05)
    assert ma["energy_kwh"] + mb["energy_kwh"] == pytest.approx(POWER_W * wall / 3.6e6, rel=0.05)
    assert ma["duration_s"] + mb["duration_s"] == pytest.approx(wall, rel=0.05)
    assert ma["emissions_kg_co2e"] + mb["emissions_kg_co2e"] == pytest.approx(src.total_kwh * GRID_KG_PER_KWH,
                                                                              rel=0.05)
    # the rule: alone, A has all of [t0, t1]; both halve [t1, t2]; alone, B has all of [t2, t3]
    assert ma["duration_s"] == pytest.approx((t1 - t0) + (t2 - t1) / 2, rel=0.01)
    assert mb["duration_s"] == pytest.approx((t2 - t1) / 2 + (t3 - t2), rel=0.01)
    assert ma["energy_kwh"] == pytest.approx(POWER_W * ((t1 - t0) + (t2 - t1) / 2) / 3.6e6, rel=0.01)
    # each run's own wall time is `elapsed_s`: summed, they count the overlap twice
    assert ma["elapsed_s"] == pytest.approx(t2 - t0, rel=0.05) and mb["elapsed_s"] == pytest.approx(t3 - t1, rel=0.05)
    assert ma["elapsed_s"] + mb["elapsed_s"] > 1.2 * wall
    # cost follows: 0.35 RMB per device-hour on the apportioned duration + 1 RMB/kWh on the apportioned energy
    for m in (ma, mb):
        assert m["cost_rmb"] == pytest.approx(0.35 * m["duration_s"] / 3600 + 1.0 * m["energy_kwh"], rel=1e-9)
    assert ma["cost_rmb"] + mb["cost_rmb"] == pytest.approx(0.35 * wall / 3600 + src.total_kwh, rel=0.05)
    # the group's record is the measurement
    g = meter.last_group
    assert g.runs == 2 and g.energy_kwh == pytest.approx(src.total_kwh, rel=1e-9)
    # each run's segments are an artifact whose shares sum to its logged values
    text = MlflowClient().download_artifacts(b.info.run_id, "emissions/emissions.csv")
    rows = list(csv.DictReader(io.StringIO(open(text, encoding="utf-8").read())))
    assert [int(r["runs_active"]) for r in rows] == [2, 1]
    assert sum(float(r["share_wall_s"]) for r in rows) == pytest.approx(mb["duration_s"], rel=1e-6)


def test_a_run_alone_gets_the_whole_measurement_and_a_new_group_starts_after(store):
    from tasks.config import TrackingConfig
    from tasks.metering import SharedMeter, tracked_stage

    tracking = TrackingConfig(experiment="energy-test")
    sources: list[FakeSource] = []
    meter = SharedMeter(lambda: sources.append(FakeSource()) or sources[-1])
    for _ in range(2):
        with tracked_stage(tracking, "alone", meter=meter):
            time.sleep(0.05)
    assert len(sources) == 2  # no overlap: two measurements
    assert meter.last_group.runs == 1
    assert meter.last_group.wall_s == pytest.approx(sources[1].events[1] - sources[1].events[0], rel=0.01)


def test_real_codecarbon_shares_add_up(store):
    """The same with codecarbon's offline tracker (about 3 s: its hardware detection)."""
    from tasks.config import TrackingConfig
    from tasks.metering import CodecarbonSource, SharedMeter

    tracking = TrackingConfig(experiment="energy-test")
    rec: list[Recording] = []
    meter = SharedMeter(lambda: rec.append(Recording(CodecarbonSource(tracking))) or rec[-1])
    a, b = _two_overlapping_runs(tracking, meter, hold_a=0.2, hold_b=0.3)
    ma, mb = a.data.metrics, b.data.metrics
    assert len(rec) == 1 and rec[0].total_kwh > 0
    assert ma["energy_kwh"] + mb["energy_kwh"] == pytest.approx(rec[0].total_kwh, rel=0.05)
    assert ma["emissions_kg_co2e"] + mb["emissions_kg_co2e"] == pytest.approx(rec[0].total_kg, rel=0.05)
    assert ma["duration_s"] + mb["duration_s"] == pytest.approx(meter.last_group.wall_s, rel=0.05)
    assert ma["duration_s"] + mb["duration_s"] < ma["elapsed_s"] + mb["elapsed_s"]


def test_lifecycle_run_logs_its_wall_time_not_its_longest_row(store):
    from mlflow.tracking import MlflowClient

    from tasks.config import TrackingConfig
    from tasks.lifecycle import close_run, open_run

    tracking = TrackingConfig(experiment="energy-test")
    run_id = open_run(tracking, "lifecycle")
    rows = [{"model": "m1", "seconds": 3.0}, {"model": "m2", "seconds": 5.0}]
    close_run(tracking, run_id, rows, name="lifecycle", seconds=12.5)
    assert MlflowClient().get_run(run_id).data.metrics["duration_s"] == 12.5
