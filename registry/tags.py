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
# the reuse key: a hash of every input that decides a version's weights and reported metrics (resolved config,
# data hash, code version, parent version); a stage looks it up with `registry.find_version` before running
INPUTS_SHA256 = "cpmant.inputs_sha256"

STAGES = ("pretrain", "compress", "delta")
ALIAS_CANDIDATE, ALIAS_CHAMPION = "candidate", "champion"
ALIASES = (ALIAS_CANDIDATE, ALIAS_CHAMPION)
