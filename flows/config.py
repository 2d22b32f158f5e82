"""The lifecycle config: one YAML file (a saved `LifecycleConfig`, see configs/) with a section per stage plus
tracking. Flows read it; each task takes only its sections. Also `force` as the set of stages to rerun
(`check_force`, made once where a flow is entered; `forced(force, stage)` below)."""

from __future__ import annotations

from pydantic import Field

from tasks.config import (CompressConfig, CpmantError, FrozenModel, OrchestrationConfig, PretrainConfig,
                          TrackingConfig, TuneConfig, ValidateConfig)


class LifecycleConfig(FrozenModel):
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    validation: ValidateConfig = Field(default_factory=ValidateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)


STAGES = ("pretrain", "compress", "tune", "validate", "report")

# what a caller may pass as `force`: a CLI flag or a Prefect deployment's parameter (True = every stage, False or
# None = none, a stage name, or a list / tuple / set of them)
ForceInput = bool | str | list[str] | tuple[str, ...] | set[str] | frozenset[str] | None


def check_force(force: ForceInput) -> frozenset[str]:
    """`force` as the set of stages to rerun, made once at the edge (the CLI, a flow's entry point): True = every
    stage. An unknown stage name is one CpmantError naming it and the stages."""
    if force is None or isinstance(force, bool):
        return frozenset(STAGES) if force else frozenset()
    names = (force,) if isinstance(force, str) else tuple(force)
    bad = [n for n in names if n not in STAGES]
    if bad:
        raise CpmantError(f"--force {' '.join(map(str, bad))}: no such stage",
                          f"name stages among {', '.join(STAGES)} (or give --force alone to rerun every stage)")
    return frozenset(names)


def forced(force: ForceInput, stage: str) -> bool:
    """Whether `stage` reruns under `force` (a set from check_force, or anything it accepts)."""
    return stage in (force if isinstance(force, frozenset) else check_force(force))
