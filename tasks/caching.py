"""Prefect caching of the expensive tasks: a cache key made of content hashes of every input that shapes a result,
and the results persisted under CPMANT_HOME.

    ContentHash(code=(...))            a CachePolicy: task name + resolved inputs + code + libraries + store
    code_sha256(modules) -> str        sha256 over the source files of packages/modules (sorted, content only)
    cached(task, force=False)          the task with results (and cache records) under $CPMANT_HOME/prefect/results
                                       and `refresh_cache=force`; call it where the flow runs (CPMANT_HOME is read
                                       then)
    was_cached(state) -> bool          whether a task run's final state came from the cache

What goes into a key (`ContentHash.key_parts`):
- the task's resolved inputs: config sections as JSON, minus fields that shape no result
  (tasks.config.NON_RESULT_FIELDS: where runs are filed, which alias a version gets, metric batching); a corpus
  as its data hash (PreparedData.data_sha256, the content of every document, and the vocab's hash); a registry
  URI (`models:/NAME@ALIAS` too) as the version it resolves to now and that version's checkpoint, data and config
  hashes, so moving an alias or re-registering misses the cache; `force` never;
- the code: the source of every module of the packages the task runs (cpmant/ and registry/, the core and the
  registry helpers it calls) plus the task's own module and the tasks/ helpers (tracking, config, plots, caching),
  by content, so an edited file misses the cache whatever git says;
- torch's, transformers' and Prefect's versions, and the MLflow store (a cached result names versions of one store).

Registry reuse (`registry.register.find_version` in the tasks) stays: the Prefect cache skips even that look-up
and the checkpoint hashing, and the registry answers when the cache is cold (a fresh Prefect home, another machine).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

ROOT = Path(__file__).resolve().parent.parent
# the packages every cached task runs: the ML core and the registry helpers
CORE_PACKAGES = ("cpmant", "registry")
# the tasks/ helpers a task module uses besides itself
TASK_HELPERS = ("tasks.tracking", "tasks.config", "tasks.plots", "tasks.caching")


def _files_of(module: str) -> list[Path]:
    """The .py files of a package (recursively) or the one file of a module, under the repository."""
    rel = Path(*module.split("."))
    pkg, mod = ROOT / rel, (ROOT / rel).with_suffix(".py")
    if pkg.is_dir():
        return sorted(p for p in pkg.rglob("*.py") if "__pycache__" not in p.parts)
    if mod.is_file():
        return [mod]
    from cpmant.errors import CpmantError

    raise CpmantError(f"cache policy names {module!r}, which is no module of this repository",
                      "name a package or module under the repository root (e.g. cpmant, tasks.compress)")


def code_sha256(modules: tuple[str, ...] | list[str]) -> str:
    """sha256 over (relative path, content) of every source file of `modules`, in sorted order."""
    h = hashlib.sha256()
    for f in sorted({p for m in modules for p in _files_of(m)}):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _libraries() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in ("torch", "transformers", "prefect", "opendelta"):
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = ""
    return out


def _model_version(uri: str) -> dict[str, Any]:
    """A registry URI as what it names now: NAME/VERSION and the version's content hashes."""
    from mlflow.tracking import MlflowClient

    from registry import tags as T
    from registry.pulling import resolve_version
    from registry.tracking import setup_tracking

    setup_tracking()
    name, version = resolve_version(uri)
    tags = MlflowClient().get_model_version(name, str(version)).tags
    return {"version": f"models:/{name}/{version}",
            **{k: tags.get(k, "") for k in (T.CHECKPOINT_SHA256, T.DATA_SHA256, T.CONFIG_SHA256)}}


def normalize(value: Any, name: str = "") -> Any:
    """A task input as the content that shapes the result (JSON-able)."""
    from pydantic import BaseModel

    from cpmant.training.prepare import PreparedData

    from .config import NON_RESULT_FIELDS

    if isinstance(value, BaseModel):
        d = value.model_dump(mode="json")
        from .config import TrackingConfig

        if isinstance(value, TrackingConfig):
            for k in NON_RESULT_FIELDS["tracking"]:
                d.pop(k, None)
        return {"__type__": type(value).__name__, **d}
    if isinstance(value, PreparedData):
        return {"__type__": "PreparedData", "data_sha256": value.data_sha256, "vocab_sha256": value.vocab_sha256}
    if isinstance(value, str) and value.startswith("models:/"):
        return _model_version(value)
    if isinstance(value, dict):
        return {str(k): normalize(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


@dataclass
class ContentHash(CachePolicy):
    """Cache key: sha256 of the task's name, its resolved inputs (`exclude` left out; `force` always), the source
    of `code` (default: the core packages, the task's module and the tasks/ helpers), library versions and the
    MLflow store."""

    code: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def key_parts(self, task_name: str, task_module: str, inputs: dict[str, Any]) -> dict[str, Any]:
        from registry.tracking import tracking_uri

        skip = {"force", *self.exclude}
        modules = (*CORE_PACKAGES, *TASK_HELPERS, task_module, *self.code)
        return {"task": task_name,
                "inputs": {k: normalize(v, k) for k, v in sorted(inputs.items()) if k not in skip},
                "code": code_sha256(modules), "libraries": _libraries(), "store": tracking_uri()}

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        parts = self.key_parts(task_ctx.task.name, task_ctx.task.fn.__module__, inputs or {})
        blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
        return f"{task_ctx.task.name}-{hashlib.sha256(blob.encode()).hexdigest()}"


def results_dir() -> Path:
    """Where cached task results (and their keys) are persisted: $CPMANT_HOME/prefect/results."""
    from cpmant.paths import cpmant_home

    d = cpmant_home() / "prefect" / "results"
    d.mkdir(parents=True, exist_ok=True)
    return d


def cached(task, force: bool = False):
    """`task` with its results persisted under CPMANT_HOME and `refresh_cache=force` (a forced run overwrites the
    cached result). The policy must be set on the task (ContentHash); this binds its storage."""
    # a Path: Prefect makes a LocalFileSystem of it where the task runs (no saved block needed, Dask workers too);
    # the cache record (key -> result and its metadata) is one file per key there
    return task.with_options(result_storage=results_dir(), persist_result=True, refresh_cache=bool(force))


def was_cached(state) -> bool:
    """A final task state read from the cache (Prefect names it `Cached`)."""
    return getattr(state, "name", "") == "Cached"

