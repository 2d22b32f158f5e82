"""One reuse rule for every stage: a stage computes its reuse key (cpmant.hashing.sha256_json over every input that
shapes its result: resolved settings, data hashes, code version, the parent version's checkpoint hash), writes it
beside the result and on the registered version or run (tags.INPUTS_SHA256), and one lookup by that key decides
whether an existing result is returned. The decision says why, in one line, printed in the stage's log:

    reused models:/cpm-ant-tiny-3b/1: same key 1a2b3c4d5e6f
    made anew: no version of cpm-ant-tiny-3b has key 1a2b3c4d5e6f
    made anew: --force compress

    decide(stage, key, found, what, force) -> Reuse   the decision (and the printed line)
    reused_state(reuse, data) -> a Completed state named "Reused" whose message is the reason (Prefect's UI shows it)
"""

from __future__ import annotations

from dataclasses import dataclass

REUSED = "Reused"  # the Prefect state name of a task that returned an existing result
SHORT = 12  # hex digits of a key shown in a reason


@dataclass(frozen=True)
class Reuse:
    stage: str  # pretrain | compress | tune | validate (and the task's own label, e.g. "compress 3b")
    key: str  # the full reuse key
    found: str | None  # the existing result's URI (models:/NAME/N, runs:/ID) when reused, else None
    reason: str  # one line: why it was reused or made

    @property
    def reused(self) -> bool:
        return self.found is not None


def decide(stage: str, key: str, found: str | None, what: str, force: bool = False) -> Reuse:
    """The stage's decision from one lookup (`found`: the newest result recorded with `key`, or None) and prints
    its reason. `what` names where the lookup searched ("cpm-ant-tiny-3b", "validations of models:/x/1")."""
    short = key[:SHORT]
    if force:
        reuse = Reuse(stage, key, None, f"{stage}: made anew: --force {stage.split()[0]} (key {short})")
    elif found:
        reuse = Reuse(stage, key, found, f"{stage}: reused {found}: same key {short}")
    else:
        reuse = Reuse(stage, key, None, f"{stage}: made anew: no result of {what} has key {short}")
    print(reuse.reason)
    return reuse


def reused_state(reuse: Reuse, data):
    """What a task returns when it reused a result: a Completed state named `Reused` with the reason as its message
    and `data` as its result (callers take `.result()`, as for a fresh result)."""
    from prefect.states import Completed

    return Completed(name=REUSED, message=reuse.reason, data=data)
