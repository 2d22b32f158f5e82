"""Lineage: a version's chain back through `cpmant.parent` tags to its corpus hash and code version.

(This module is `registry.ancestry`, so that `registry.lineage` is only ever the function.)
"""

from __future__ import annotations

from cpmant.errors import CpmantError

from . import tags as _tags
from .tags import CHECKPOINT_SHA256, CONFIG_SHA256, DATA_SHA256, GIT_SHA, PARENT, STAGE

# a delta version's task and method (tags set by the tune stage); registry/tags.py is their home once it has them
TASK, METHOD = _tags.TASK, _tags.METHOD
# what each stage's version is in the chain corpus -> base -> variant -> delta
ROLES = {"pretrain": "base", "compress": "variant", "delta": "delta"}


def lineage(uri: str, max_depth: int = 32) -> list[dict]:
    """[{uri, name, version, stage, role, parent, data_sha256, config_sha256, checkpoint_sha256, git_sha, run_id,
    aliases, task, method}, ...] from `uri` (first) back to its base model (last); role is base, variant or delta
    (ROLES), task and method are a delta's (empty otherwise). A URI that is not a registered version is a
    CpmantError (never an empty chain)."""
    from mlflow.tracking import MlflowClient

    from .pulling import resolve_version
    from .tracking import setup_tracking

    if not isinstance(uri, str) or not uri.strip():
        raise CpmantError("no model URI given", "pass models:/NAME/VERSION or models:/NAME@ALIAS")
    setup_tracking()
    client = MlflowClient()
    chain, seen = [], set()
    cur = uri
    while cur:
        if cur in seen or len(chain) >= max_depth:
            raise CpmantError(f"the lineage of {uri} loops or is deeper than {max_depth} at {cur}",
                              "fix the cpmant.parent tag of that version")
        seen.add(cur)
        name, version = resolve_version(cur)
        mv = client.get_model_version(name, str(version))
        t = mv.tags
        chain.append({"uri": f"models:/{name}/{version}", "name": name, "version": version,
                      "stage": t.get(STAGE, ""), "role": ROLES.get(t.get(STAGE, ""), t.get(STAGE, "") or "?"),
                      "parent": t.get(PARENT, ""),
                      "data_sha256": t.get(DATA_SHA256, ""),
                      "config_sha256": t.get(CONFIG_SHA256, ""),
                      "checkpoint_sha256": t.get(CHECKPOINT_SHA256, ""),
                      "git_sha": t.get(GIT_SHA, ""), "run_id": mv.run_id,
                      "aliases": list(getattr(mv, "aliases", []) or []),
                      "task": t.get(TASK, ""), "method": t.get(METHOD, "")})
        cur = t.get(PARENT, "")
    return chain


def lineage_text(uri: str) -> str:
    """One line for a tag: `models:/a/2 <- models:/b/1 <- data:96986e4b… (code 1a2b3c4)`."""
    chain = lineage(uri)
    parts = [c["uri"] for c in chain]
    base = chain[-1]
    parts.append(f"data:{base['data_sha256'][:16]}")
    return " <- ".join(parts) + f" (code {base['git_sha'][:12]})"


def lineage_path(chain: list[dict]) -> str:
    """The chain oldest first, each step named by its role:
    `corpus data:96986e4b… -> base models:/cpm-ant-tiny/1 -> variant models:/cpm-ant-tiny-int8/1 -> delta
    models:/cpm-ant-tiny-int8-demo-ccpm-lora/1 (task demo-ccpm, method lora)`."""
    if not chain:
        raise CpmantError("the lineage is empty", "pass the URI of a registered version to `cpmant lineage`")
    parts = [f"corpus data:{chain[-1]['data_sha256'][:16]}"]
    for c in reversed(chain):
        role = c.get("role") or ROLES.get(c["stage"], c["stage"] or "?")
        what = ", ".join(f"{k} {c[k]}" for k in ("task", "method") if c.get(k))
        parts.append(f"{role} {c['uri']}" + (f" ({what})" if what else ""))
    return " -> ".join(parts)


def format_lineage(chain: list[dict]) -> str:
    """A tree for the terminal, newest first, ending at the corpus and code version, under a one-line path
    (lineage_path: corpus -> base -> variant -> delta)."""
    if not chain:
        raise CpmantError("the lineage is empty", "pass the URI of a registered version to `cpmant lineage`")
    lines = [lineage_path(chain), ""]
    for depth, c in enumerate(chain):
        pad = "" if depth == 0 else "   " * (depth - 1) + "└─ "
        alias = f" @{','.join(c['aliases'])}" if c["aliases"] else ""
        role = c.get("role") or ROLES.get(c["stage"], c["stage"] or "?")
        what = "".join(f"  {k}={c[k]}" for k in ("task", "method") if c.get(k))
        lines.append(f"{pad}{role} {c['uri']}{alias}  stage={c['stage']}{what}  "
                     f"checkpoint={c['checkpoint_sha256'][:12]}  config={c['config_sha256'][:12]}  "
                     f"code={c['git_sha'][:12]}  run={c['run_id']}")
    base = chain[-1]
    lines.append("   " * (len(chain) - 1) + f"└─ corpus data_sha256={base['data_sha256']}")
    return "\n".join(lines)
