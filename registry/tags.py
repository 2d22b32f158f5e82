"""The public contract's MLflow names (ARCHITECTURE.md): version and run tags, in one place."""

from __future__ import annotations

STAGE = "cpmant.stage"  # pretrain | compress | delta (versions); also validate (runs)
PARENT = "cpmant.parent"  # the parent's models:/NAME/VERSION, empty for a base
CHECKPOINT_SHA256 = "cpmant.checkpoint_sha256"
CONFIG_SHA256 = "cpmant.config_sha256"
DATA_SHA256 = "cpmant.data_sha256"
GIT_SHA = "cpmant.git_sha"
CONTRACT_TAGS = (STAGE, PARENT, CHECKPOINT_SHA256, CONFIG_SHA256, DATA_SHA256, GIT_SHA)

# beyond the contract's six
LINEAGE = "cpmant.lineage"  # the chain back to the corpus, readable in the UI
FILE_SHA256_PREFIX = "cpmant.file_sha256."  # + file name: one tag per checkpoint file
PRESET = "cpmant.preset"  # run tag of a pretraining run
# the reuse key (one rule per stage, tasks/reuse.py): cpmant.hashing.sha256_json of every input that decides a
# version's weights and reported metrics (resolved config,
# data hash, code version, parent version); a stage looks it up with `registry.find_version` before running
INPUTS_SHA256 = "cpmant.inputs_sha256"

TASK = "cpmant.task"  # a delta's task (version and run tag)
METHOD = "cpmant.method"  # a delta's method (version and run tag)
# validation and promotion (registry/promotion.py)
MODEL = "cpmant.model"  # run tag: the models:/NAME/VERSION a validation or promotion run is about
VALIDATION = "cpmant.validation"  # version and run tag: passed | failed
VALIDATION_RUN = "cpmant.validation_run_id"  # version tag: the run that decided
VALIDATION_FAILURES = "cpmant.validation_failures"  # version and run tag: the failed gates, "; "-separated
VALIDATION_SETTINGS = "cpmant.validation_settings_sha256"  # run tag: the measurement settings only
VALIDATION_EVIDENCE = "cpmant.validation_evidence"  # version and run tag: the interval gates' intervals and decisions
PROMOTED_BY = "cpmant.promoted_by"  # version tag: a user name, or "validation"
PROMOTION_REASON = "cpmant.promotion_reason"
PROMOTED_AT = "cpmant.promoted_at"  # UTC, ISO 8601
PREVIOUS_CHAMPION = "cpmant.previous_champion"  # the version champion pointed at before ("" if none)
PROMOTION_RUN = "cpmant.promotion_run_id"

# run tags of the process that started a run (every run a `cpmant` command starts, via MLFLOW_RUN_CONTEXT): a run
# left RUNNING whose process is gone is marked KILLED by the next command (cpmant_cli/stale_runs.py)
PROCESS_PID, PROCESS_STARTED, PROCESS_HOST = "cpmant.pid", "cpmant.pid_started", "cpmant.host"

# a lifecycle's MLflow runs (tasks/lifecycle.py): the models a run made or reused (distinct models:/ URIs) and what
# was reused: "yes" | "no" on a stage run, the reused stages ("pretrain,compress", or "none") on the parent run
MODELS, REUSED = "cpmant.models", "cpmant.reused"

STAGES = ("pretrain", "compress", "delta")
ALIAS_CANDIDATE, ALIAS_CHAMPION = "candidate", "champion"
ALIASES = (ALIAS_CANDIDATE, ALIAS_CHAMPION)

# validation and promotion, on a validation run
VALIDATION_CHAMPION = "cpmant.validation_champion"  # run tag: the champion version measured beside the candidate
PROMOTED = "cpmant.promoted"  # run tag: "true" | "false", whether this validation moved champion
HELDOUT_SHA256 = "cpmant.heldout_sha256"  # run tag: the held-out rows a loss or perplexity was measured on
GATE_PREFIX = "cpmant.gate."  # + "<metric>.<against>": run tag of a validation, why that gate failed

# a lifecycle's parent and stage runs (tasks/lifecycle.py): "parent" on the lifecycle run, the stage's name on a
# stage run
LIFECYCLE = "cpmant.lifecycle"

# delta tuning runs and versions (tasks/tune/, registry/tune_records.py)
TUNE_KIND = "cpmant.tune.kind"  # run tag: zero-shot | delta | comparison
TASK_DATA_SHA256 = "cpmant.task_data_sha256"  # the task's examples (train, valid, test) as loaded

