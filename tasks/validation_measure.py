"""What the validation stage measures and with which key: loading a registered version (a delta composed on its
base), running the suite (cpmant.validation.suite) on it with the champion and a delta's base beside it, a reference
version's metrics (its recorded validation, else measured once per process), and the stage's one reuse key.

    settings_sha256(cfg) -> str                     the measurement settings and the code version
    reuse_key(cfg, facts, heldout_sha256) -> str    THE reuse key of a validation (tag cpmant.inputs_sha256)
    heldout_id(facts) -> str                        the identity of the held-out rows the version is measured on
    measure(uri, cfg, stage, parent, champion="", no_champion="no champion") -> the suite's report
    reference(uri, cfg, own=False) -> (metrics | None, where from)
"""

from __future__ import annotations

from pathlib import Path

from cpmant.checkpoint import git_sha
from cpmant.errors import CpmantError
from cpmant.hashing import sha256_json
from cpmant.validation.config import ValidateConfig
from cpmant.validation.gates import HELDOUT_ID
from registry import tags as T
from registry.limits import cut
from registry.validation_records import VersionFacts, recorded_validation, tuning_data_dir, version_facts

_MEASURED: dict[tuple[str, str], dict] = {}  # (version URI, settings sha256) -> metrics of a reference measured here
WHY_MAX = 480  # a skipped reference's reason, kept short enough for a param (registry/limits.py cuts it)


def settings_sha256(cfg: ValidateConfig) -> str:
    """What decides the measured numbers: the measurement settings and the code version."""
    return sha256_json({"settings": cfg.measurement(), "code": git_sha()})


def reuse_key(cfg: ValidateConfig, facts: VersionFacts, heldout_sha256: str = "") -> str:
    """The reuse key of a validation: the version and its recorded weights' hash (its cpmant.checkpoint_sha256 tag;
    the weights are not hashed again), the measurement settings and code, the held-out rows' identity and the
    gates. The champion it is compared with is not in the key: a run is reused only while that champion still
    holds (tasks/validate.py)."""
    return sha256_json({"model": facts.uri, "weights": facts.tags.get(T.CHECKPOINT_SHA256, ""),
                        "settings": settings_sha256(cfg), "heldout_sha256": heldout_sha256,
                        "gates": {k: g.model_dump(mode="json") for k, g in cfg.gates.items()}})


def heldout_id(facts: VersionFacts) -> str:
    """The identity of the held-out rows a version is measured on (its lineage's; "" when it cannot be read)."""
    from cpmant.heldout import folder_heldout_sha256
    from registry.pulling import checkpoint_dir

    try:
        # (metadata and vocab only: the weights are verified when measured)
        return folder_heldout_sha256(_data_dir(checkpoint_dir(facts.uri, verify=False), facts.parent))
    except (CpmantError, OSError):
        return ""


# ---- loading a version ---------------------------------------------------------------------------------------
def _delta_task(model_dir: Path) -> str | None:
    """The task a delta (or a full fine-tune) was tuned on, from its delta_config.json; None for other models."""
    if not (model_dir / "delta_config.json").is_file():
        return None
    from cpmant.delta.checkpoint import read_delta_config

    return read_delta_config(model_dir).get("task") or None


def _loader(uri: str):
    """A `load()` -> (model, tokenizer) of a registered version for the suite (registry.pulling.load_model composes
    a delta on its base)."""
    from registry.pulling import load_model

    return lambda: load_model(uri)


def _data_dir(model_dir: Path, parent: str) -> Path:
    """The folder whose data lineage gives the held-out split: the model's own, else (a delta) its parent's."""
    from cpmant.lineage import read_lineage
    from registry.pulling import checkpoint_dir

    try:
        read_lineage(model_dir)
        return model_dir
    except CpmantError:
        if not parent:
            raise
        return _data_dir(checkpoint_dir(parent), "")


def measure(uri: str, cfg: ValidateConfig, stage: str, parent: str, champion: str = "",
            no_champion: str = "no champion") -> dict:
    """The suite's report of a registered version; `champion` (a version URI, "" for none: `no_champion` says why)
    is measured beside it in the same run (timings; a delta's task), and a delta's base (`parent`) is scored
    zero-shot on the same examples."""
    from cpmant.validation.suite import run_suite
    from registry.pulling import checkpoint_dir

    model_dir = checkpoint_dir(uri)
    task_name = _delta_task(model_dir) if stage == "delta" else None
    base = task_name and parent
    return run_suite(_loader(uri), _data_dir(model_dir, parent), cfg, stage=stage, task=task_name,
                     task_data=tuning_data_dir(uri) if task_name else None, progress=False,
                     champion_load=_loader(champion) if champion else None, no_champion=no_champion,
                     base_load=_loader(parent) if base else None, base_key=parent if base else None)


def reference_metrics(uri: str, cfg: ValidateConfig, own: bool = False) -> tuple[dict | None, str]:
    """(metrics, where from) of a reference version (a parent, a champion): its latest validation run with the same
    measurement settings, else measured now (no run). `own`: the candidate is the champion itself: only an earlier
    run serves (measuring it again would compare it with itself)."""
    rec = recorded_validation(uri, settings_sha256(cfg))
    if rec is not None:
        # the held-out rows' identity is a tag of the run (a string, not a metric)
        return {**rec["metrics"], HELDOUT_ID: rec["tags"].get(T.HELDOUT_SHA256)}, f"validation run {rec['run_id']}"
    if own:
        return None, ""
    memo = (uri, settings_sha256(cfg))
    if memo not in _MEASURED:  # a parent of several candidates is measured once per process
        facts = version_facts(uri)
        _MEASURED[memo] = measure(facts.uri, cfg, facts.stage, facts.parent)["metrics"]
    return _MEASURED[memo], "measured now"


def reference(uri: str, cfg: ValidateConfig, own: bool = False) -> tuple[dict | None, str]:
    """reference_metrics, or (None, why) when there is no reference or it cannot be had (a deleted parent): its
    comparisons are then skipped, and the report says so."""
    if not uri:
        return None, ""
    try:
        return reference_metrics(uri, cfg, own)
    except CpmantError as e:
        return None, cut(f"unavailable: {e.problem}", WHY_MAX)
