"""The config sections tasks take: each task gets its stage's section (PretrainConfig, CompressConfig) and the
tracking section defined here (energy, emissions, cost). The whole-lifecycle config lives with the flows
(flows/config.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cpmant.compress.config import CompressConfig  # noqa: F401  (the compress tasks' section)
from cpmant.configio import FrozenModel  # noqa: F401  (the base of every config section)
from cpmant.errors import CpmantError  # noqa: F401  (bad input, for flows/config.py: flows import only tasks)
from cpmant.delta.config import TuneConfig  # noqa: F401  (the delta-tuning tasks' section)
from cpmant.training.config import PretrainConfig  # noqa: F401  (the pretrain tasks' section)
from cpmant.validation.config import ValidateConfig  # noqa: F401  (the validation tasks' section)


class TrackingConfig(FrozenModel):
    experiment: str = Field("cpmant", description="MLflow experiment")
    country_iso_code: str = Field("CHN", description="grid for codecarbon's offline carbon intensity")
    measure_power_secs: float = Field(5.0, gt=0, description="codecarbon sampling interval")
    device: str = Field("cpu", description="key into device_hour_rmb for this machine's devices")
    devices: int = Field(1, ge=1, description="devices billed (GPUs, or 1 for a CPU machine)")
    # Prices: the A100 hour is derived from CPM-Ant's report (430K RMB / 47,040 A100-hours = 9.14 RMB);
    # the CPU price is a 2-core public-cloud VM; electricity at an average Chinese industrial tariff.
    device_hour_rmb: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 0.35, "a100": 9.14, "h200": 30.0},
        description="price of one device-hour in RMB",
    )
    electricity_rmb_per_kwh: float = Field(0.0, ge=0, description="added per kWh (0 when the hour price has it)")
    metric_flush_steps: int = Field(50, ge=1, description="per-step metrics are sent to MLflow in batches")
    # set by the lifecycle, not by users: they shape where runs are filed and which alias a new version gets, never
    # a result, so reuse keys and recorded configs leave them out
    parent_run_id: str | None = Field(None, description="MLflow run the stage's runs nest under (the lifecycle's "
                                      "stage run); None = top-level runs")
    register_alias: str | None = Field(None, description="alias a new version gets; None = `candidate` when the "
                                       "model has none yet, else `challenger` (only the lifecycle moves `candidate`)")

    def parent_tags(self) -> dict[str, str]:
        """The run tag that files a run under `parent_run_id` in MLflow (works across threads and processes)."""
        return {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}


# fields of the config that never change a result: left out of cache keys and reuse hashes
NON_RESULT_FIELDS = {"tracking": ("parent_run_id", "register_alias", "metric_flush_steps")}


class OrchestrationConfig(FrozenModel):
    """How the flows run their tasks (Prefect task runners)."""

    task_runner: Literal["thread", "dask"] = Field(
        "thread", description="thread (Prefect's ThreadPoolTaskRunner) or dask (prefect-dask's DaskTaskRunner)")
    dask_address: str | None = Field(None, description="an existing Dask scheduler (tcp://HOST:PORT); None = a "
                                     "local cluster started for the flow run")
    dask_workers: int = Field(2, ge=1, description="worker processes of the local Dask cluster (1 thread each)")
    max_workers: int | None = Field(None, ge=1, description="threads of the thread runner (None = Prefect's default)")
