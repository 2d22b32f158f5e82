"""The lifecycle config: one YAML file (a saved `LifecycleConfig`, see configs/) with a section per stage plus
tracking. Flows read it; each task takes only its sections."""

from __future__ import annotations

from pydantic import Field

from tasks.config import (CompressConfig, FrozenModel, OrchestrationConfig, PretrainConfig, TrackingConfig, TuneConfig,
                          ValidateConfig)


class LifecycleConfig(FrozenModel):
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    validation: ValidateConfig = Field(default_factory=ValidateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)


STAGES = ("pretrain", "compress", "tune", "validate", "report")


def check_force(force: bool | list[str] | tuple[str, ...] | str | None) -> bool | tuple[str, ...]:
    """`force` as given to a flow: True/False, or the stages to rerun (a list, or one name)."""
    if force is None or isinstance(force, bool):
        return bool(force)
    names = (force,) if isinstance(force, str) else tuple(force)
    bad = [n for n in names if n not in STAGES]
    if bad:
        from cpmant.errors import CpmantError

        raise CpmantError(f"--force {' '.join(bad)}: no such stage", f"name stages among {', '.join(STAGES)} "
                          "(or give --force alone to rerun every stage)")
    return names


def forced(force: bool | list[str] | tuple[str, ...] | str | None, stage: str) -> bool:
    """Whether `stage` reruns under `force` (True = every stage; a list = those stages)."""
    f = check_force(force)
    return f if isinstance(f, bool) else stage in f
