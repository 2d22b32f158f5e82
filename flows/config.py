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
