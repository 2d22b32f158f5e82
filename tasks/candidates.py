"""Which alias a new version gets. `candidate` is the version the lifecycle validates (and has validated): only the
lifecycle moves it once a model has one (it sets `tracking.register_alias=candidate` and pins every version it
validates). A stage run outside the lifecycle (an ad-hoc `cpmant pretrain`, a scheduled deployment) registers its
new version as `challenger` when the model already has a `candidate`, so it never silently replaces the version
the last lifecycle validated; a model's first version is its `candidate`. `champion` moves only when validation
passes (or by `cpmant promote`)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from .config import TrackingConfig
from .metering import retry_transient

ALIAS_CHALLENGER = "challenger"


def new_version_alias(tracking: TrackingConfig, name: str) -> str:
    from registry.aliases import get_alias
    from registry.tags import ALIAS_CANDIDATE

    if tracking.register_alias:
        return tracking.register_alias
    return ALIAS_CANDIDATE if get_alias(name, ALIAS_CANDIDATE) is None else ALIAS_CHALLENGER


@task(name="pin-candidates", task_run_name="pin-candidates", cache_policy=NONE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def pin_candidates(tracking: TrackingConfig, uris: list[str]) -> list[str]:
    """Point `candidate` of each model at the version the lifecycle made or reused (the one it validates)."""
    from registry.aliases import set_alias
    from registry.tags import ALIAS_CANDIDATE
    from registry.tracking import setup_tracking

    setup_tracking(tracking.experiment)
    out = []
    for uri in uris:
        set_alias(uri, ALIAS_CANDIDATE)
        out.append(uri)
    return out
