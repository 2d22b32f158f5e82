"""Register a checkpoint folder as a version of a registered model, with the contract's tags and an alias.

Every version carries `cpmant.stage`, `cpmant.parent`, `cpmant.checkpoint_sha256`, `cpmant.config_sha256`,
`cpmant.data_sha256`, `cpmant.git_sha`. A failed registration leaves the checkpoint where it is and says how to
register it again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cpmant.checkpoint import WEIGHTS_FILE, read_meta, sha256_file
from cpmant.errors import CpmantError

from .params import DEFAULT_PARAMS
from .tracking import setup_tracking

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
STAGES = ("pretrain", "compress", "delta")


@dataclass(frozen=True)
class Registered:
    name: str
    version: int
    run_id: str
    alias: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def pip_requirements() -> list[str]:
    reqs = []
    for pkg in ("torch", "transformers", "safetensors", "jieba", "numpy", "mlflow", "cpmant"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return reqs


from .pull import FILE_TAG_PREFIX


def version_tags(model_dir: Path, stage: str, parent: str = "") -> dict[str, str]:
    """The contract's six tags, one `cpmant.file_sha256.<file>` tag per checkpoint file (what `pull` verifies),
    and `cpmant.lineage`: this version's chain back to its corpus, readable in the MLflow UI."""
    meta = read_meta(model_dir)
    files = {f.name: sha256_file(f) for f in sorted(model_dir.iterdir()) if f.is_file()}  # each file hashed once
    tags = {
        "cpmant.stage": stage,
        "cpmant.parent": parent,
        "cpmant.checkpoint_sha256": files[WEIGHTS_FILE],
        "cpmant.config_sha256": str(meta.get("config_sha256", "")),
        "cpmant.data_sha256": str(meta.get("data_sha256", "")),
        "cpmant.git_sha": str(meta.get("git_sha", "")),
    }
    tags.update({FILE_TAG_PREFIX + name: digest for name, digest in files.items()})
    return tags


def register_checkpoint(model_dir: str | Path, name: str, stage: str = "pretrain", parent: str = "",
                        alias: str | None = "candidate", extra_tags: dict[str, str] | None = None) -> Registered:
    """Log `model_dir` as a pyfunc model in the active run (or a new one) and register it as a new version of `name`."""
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    model_dir = Path(model_dir).resolve()
    if stage not in STAGES:
        raise CpmantError(f"unknown stage {stage!r}", f"use one of {STAGES}")
    again = f"the checkpoint is kept at {model_dir}; register it again with `cpmant register {model_dir} --name {name}`"
    try:
        setup_tracking()
        if parent:  # stored as models:/NAME/VERSION (an alias would drift); checked before anything is created
            from .pull import resolve_version

            pname, pver = resolve_version(parent)
            parent = f"models:/{pname}/{pver}"
        tags = {**version_tags(model_dir, stage, parent), **(extra_tags or {})}
        started = mlflow.active_run() is None
        run = mlflow.start_run(run_name=f"register-{name}") if started else mlflow.active_run()
        try:
            # our predict takes a DataFrame or a list, so it carries no type hints; the signature is explicit
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
            prompts = ["床前明月光"]  # a list of prompts; a one-column DataFrame is accepted too
            signature = infer_signature(prompts, ["，疑是地上霜。"], params=_default_params())
            # MLflow serves the example once at logging (a real smoke test of the version); one new token keeps
            # that check cheap for large checkpoints
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), artifacts={"checkpoint": str(model_dir)},
                signature=signature, input_example=(prompts, {"max_new_tokens": 1}),
                pip_requirements=pip_requirements(),
            )
            mv = _register_with_retry(info.model_uri, name, tags)
            client = MlflowClient()
            from .lineage import lineage_text

            client.set_model_version_tag(name, mv.version, "cpmant.lineage", lineage_text(f"models:/{name}/{mv.version}"))
            client.update_model_version(name, mv.version, description=f"{stage} checkpoint from {model_dir.name}")
            if alias:
                _set_alias_with_retry(client, name, alias, mv.version)
        finally:
            if started:
                mlflow.end_run()
    except CpmantError as e:
        raise CpmantError(f"registering {name} failed: {e.problem}", f"{e.fix}; {again}") from e
    except Exception as e:  # MLflow/store errors: keep the checkpoint, say how to retry
        raise CpmantError(f"registering {name} failed: {type(e).__name__}: {e}", again) from e
    return Registered(name, int(mv.version), run.info.run_id, alias)


def _register_with_retry(model_uri: str, name: str, tags: dict, attempts: int = 8):
    """mlflow.register_model, retried when a concurrent registration wins the race for the next version number
    (a unique-key violation) or SQLite is briefly locked by another writer."""
    import random
    import time

    import mlflow
    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            return mlflow.register_model(model_uri, name, tags=tags)
        except MlflowException as e:
            text = str(e).lower()
            transient = any(w in text for w in ("unique", "integrity", "locked", "duplicate"))
            if not transient or i == attempts - 1:
                raise
            time.sleep(0.2 * (i + 1) + random.random() * 0.3)
    raise AssertionError("unreachable")


def _set_alias_with_retry(client, name: str, alias: str, version, attempts: int = 5) -> None:
    """Setting an alias that does not exist yet is an INSERT: two registrations racing for it make one fail with a
    unique violation (seen on the PostgreSQL-backed server). Once the row exists a retry is an UPDATE; the last
    registration to arrive holds the alias."""
    import time

    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as e:
            text = str(e).lower()
            if not any(w in text for w in ("unique", "duplicate", "alias_pk", "locked")) or i == attempts - 1:
                raise
            time.sleep(0.1 * (i + 1))


def _default_params() -> dict:
    return dict(DEFAULT_PARAMS)
