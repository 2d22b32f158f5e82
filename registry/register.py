"""Register a checkpoint folder as a version of a registered model, with the contract's tags and an alias; find
the version an identical earlier run made.

Every version carries `cpmant.stage`, `cpmant.parent`, `cpmant.checkpoint_sha256`, `cpmant.config_sha256`,
`cpmant.data_sha256`, `cpmant.git_sha`. The folder and the name are checked before any run or model is created; a
failed registration leaves the checkpoint where it is and says how to register it again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cpmant.checkpoint import DELTA_WEIGHTS_FILE, WEIGHTS_FILE, read_meta, sha256_file
from cpmant.errors import CpmantError, a_or_an

from .params import DEFAULT_PARAMS
from .pulling import check_local_checkpoint
from .tags import (ALIAS_CANDIDATE, ALIAS_CHAMPION, CHECKPOINT_SHA256, CONFIG_SHA256, DATA_SHA256,
                   FILE_SHA256_PREFIX, GIT_SHA, LINEAGE, PARENT, STAGE, STAGES)
from .tracking import setup_tracking

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MAX_NAME_LENGTH = 256
NAME_FIX = "use letters, digits, '-', '_' and '.', e.g. cpm-ant-tiny (no '/', ':', '@', quotes or spaces at the ends)"


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


def check_name(name: str) -> str:
    """A registered-model name MLflow accepts and a models:/ URI can carry; a CpmantError otherwise."""
    from mlflow.exceptions import MlflowException

    if not isinstance(name, str) or not name.strip():
        raise CpmantError("the model name is empty", NAME_FIX)
    bad = sorted({c for c in name if c in "/:@'\"%" or not c.isprintable()})
    if bad or name != name.strip() or ".." in name or len(name) > MAX_NAME_LENGTH:
        why = (f"contains {', '.join(map(repr, bad))}" if bad else
               "is longer than 256 characters" if len(name) > MAX_NAME_LENGTH else
               "starts or ends with a space" if name != name.strip() else "contains '..'")
        raise CpmantError(f"bad model name {name!r}: it {why}", NAME_FIX)
    try:
        from mlflow.utils.validation import _validate_model_name

        _validate_model_name(name)
    except ImportError:
        pass
    except MlflowException as e:
        raise CpmantError(f"bad model name {name!r}: {e.message}", NAME_FIX) from None
    return name


def logged_model_name(name: str) -> str:
    """The logged model's name: the registered model's, with the characters MLflow refuses there ('.') as '-'."""
    return re.sub(r"[/:.%\"']", "-", name)


def version_tags(model_dir: Path, stage: str, parent: str = "") -> dict[str, str]:
    """The contract's six tags, one `cpmant.file_sha256.<file>` tag per checkpoint file (what `pull` verifies),
    and `cpmant.lineage`: this version's chain back to its corpus, readable in the MLflow UI."""
    meta = read_meta(model_dir)
    files = {f.name: sha256_file(f) for f in sorted(model_dir.iterdir()) if f.is_file()}  # each file hashed once
    tags = {
        STAGE: stage,
        PARENT: parent,
        CHECKPOINT_SHA256: files.get(WEIGHTS_FILE) or files.get(DELTA_WEIGHTS_FILE, ""),
        CONFIG_SHA256: str(meta.get("config_sha256", "")),
        DATA_SHA256: str(meta.get("data_sha256", "")),
        GIT_SHA: str(meta.get("git_sha", "")),
    }
    tags.update({FILE_SHA256_PREFIX + name: digest for name, digest in files.items()})
    return tags


def model_signature():
    """The pyfunc's signature: a list of prompts in, their continuations out, the generation params."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import DataType
    from mlflow.types.schema import ParamSchema, ParamSpec

    # `stop` is a list of strings: infer_signature takes a tuple for an error and an empty list for datetimes
    params = {k: v for k, v in _default_params().items() if k != "stop"}
    sig = infer_signature(["床前明月光"], ["，疑是地上霜。"], params=params)
    return ModelSignature(sig.inputs, sig.outputs,
                          ParamSchema([*sig.params.params, ParamSpec("stop", DataType.string, [], (-1,))]))


def register_checkpoint(model_dir: str | Path, name: str, stage: str = "pretrain", parent: str = "",
                        alias: str | None = ALIAS_CANDIDATE, extra_tags: dict[str, str] | None = None,
                        description: str = "", step: int = 0) -> Registered:
    """Log `model_dir` as a pyfunc model (named after `name`) in the active run (or a new one) and register it as a
    new version of `name`, described by `description` (default: stage and folder). `step` is the run's step the
    logged model is linked at (pass the final training step, so that the model shows the final metrics).

    Before anything is created: the stage, the name and the alias are checked, the folder is loaded and checked
    (a truncated or corrupt file is refused), and a parent URI is resolved to models:/NAME/VERSION."""
    import mlflow
    from mlflow.tracking import MlflowClient

    model_dir = Path(model_dir).expanduser().resolve()
    if stage not in STAGES:
        raise CpmantError(f"unknown stage {stage!r}", f"use one of {STAGES}")
    check_name(name)
    if alias is not None:
        from .aliases import check_alias

        check_alias(alias)
        refuse_champion_alias(alias)
    check_local_checkpoint(model_dir)
    again = f"the checkpoint is kept at {model_dir}; register it again with `cpmant register {model_dir} --name {name}`"
    try:
        setup_tracking()
        if parent:  # stored as models:/NAME/VERSION (an alias would drift); checked before anything is created
            from .pulling import resolve_version

            pname, pver = resolve_version(parent)
            parent = f"models:/{pname}/{pver}"
        tags = {**version_tags(model_dir, stage, parent), **(extra_tags or {})}
        started = mlflow.active_run() is None
        run = mlflow.start_run(run_name=f"register-{name}") if started else mlflow.active_run()
        status = "FAILED"
        try:
            prompts = ["床前明月光"]  # a list of prompts; a one-column DataFrame is accepted too
            # MLflow serves the example once at logging (a real smoke test of the version); one new token keeps
            # that check cheap for large checkpoints
            info = mlflow.pyfunc.log_model(
                name=logged_model_name(name), python_model=str(PYFUNC_CODE), artifacts={"checkpoint": str(model_dir)},
                signature=model_signature(), input_example=(prompts, {"max_new_tokens": 1}),
                pip_requirements=pip_requirements(), step=int(step),
            )
            mv = _register_with_retry(info.model_uri, name, tags)
            client = MlflowClient()
            from .ancestry import lineage_text

            client.set_model_version_tag(name, mv.version, LINEAGE, lineage_text(f"models:/{name}/{mv.version}"))
            text = description or (f"{stage} checkpoint from {model_dir.name}" + (f" (parent {parent})" if parent
                                                                                   else ""))
            client.update_model_version(name, mv.version, description=text)
            if alias:
                _set_alias_with_retry(client, name, alias, mv.version)
            status = "FINISHED"
        finally:
            if started:
                mlflow.end_run(status=status)
    except CpmantError as e:
        raise CpmantError(f"registering {name} failed: {e.problem}", f"{e.fix}; {again}") from e
    except Exception as e:  # MLflow/store errors: keep the checkpoint, say how to retry
        from cpmant.fsutil import disk_full_error, is_disk_full

        if is_disk_full(e):  # the artifact store's disk: one error naming it and the space the copy needs
            need = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
            full = disk_full_error(_artifact_folder(), need)
            raise CpmantError(f"registering {name} failed: {full.problem}", f"{full.fix}; {again}") from e
        raise CpmantError(f"registering {name} failed: {type(e).__name__}: {e}", again) from e
    return Registered(name, int(mv.version), run.info.run_id, alias)


def _artifact_folder() -> Path:
    """Where this store's artifacts are written (for messages); the home's mlartifacts for a server's proxy."""
    from urllib.parse import unquote, urlparse

    from .tracking import artifact_root

    return Path(unquote(urlparse(artifact_root()).path))


def refuse_champion_alias(alias: str | None) -> None:
    """Only validation and `cpmant promote` (which records who promoted and why) move `champion`."""
    if alias == ALIAS_CHAMPION:
        raise CpmantError("registering never moves the `champion` alias: only validation and `cpmant promote` do "
                          "(with an audit trail: who promoted, why, the previous champion)",
                          "register with the default alias (candidate), then run "
                          "`cpmant promote URI --reason TEXT`")


def recorded_lineage(model_dir: Path) -> tuple[str | None, str]:
    """(stage, parent URI) as the checkpoint's own metadata records them: a delta's (or a `full` fine-tune's)
    delta_config.json names its base; a compressed variant's metadata names its parent; a merged delta (`pull
    --merge`) names the delta; a pretraining run's names no parent. (None, "") when the folder records neither
    (e.g. a converted CPM-Live checkpoint)."""
    import json

    from cpmant.delta.checkpoint import DELTA_CONFIG_FILE, read_delta_config

    if (model_dir / DELTA_CONFIG_FILE).is_file():
        return "delta", str(read_delta_config(model_dir).get("base_uri") or "")
    try:
        meta = read_meta(model_dir)
    except (CpmantError, json.JSONDecodeError):
        return None, ""
    if meta.get("merged_from"):  # `cpmant pull --merge`: a delta folded into its base descends from that delta
        return "delta", str(meta["merged_from"])
    stage = meta.get("stage")
    if stage in STAGES:
        return stage, str(meta.get("parent") or "") if stage != "pretrain" else ""
    return None, ""


def _pinned(uri: str) -> str:
    from .pulling import resolve_version

    name, ver = resolve_version(uri)
    return f"models:/{name}/{ver}"


def decide_lineage(model_dir: Path, stage: str | None, parent: str) -> tuple[str, str]:
    """The stage and parent a folder is registered with: what its metadata records; a `stage` or `parent` given
    by the user that contradicts it is an error (a delta names its base in delta_config.json, a variant its
    parent in cpmant_meta.json). Without metadata, the flags (default: a pretrained base with no parent)."""
    rec_stage, rec_parent = recorded_lineage(model_dir)
    if rec_stage and stage and stage != rec_stage:
        raise CpmantError(f"--stage {stage} contradicts {model_dir}: its metadata records stage {rec_stage}"
                          + (f" with parent {rec_parent}" if rec_parent else ""),
                          "leave out --stage (the checkpoint's own metadata decides its stage and parent)")
    stage = rec_stage or stage or "pretrain"
    if rec_parent:
        if parent and _pinned(parent) != _pinned(rec_parent):
            raise CpmantError(f"--parent {parent} contradicts {model_dir}: its metadata records its parent as "
                              f"{rec_parent}", "leave out --parent (the checkpoint's own metadata decides it)")
        parent = rec_parent
    elif rec_stage == "pretrain" and parent:
        raise CpmantError(f"--parent {parent} contradicts {model_dir}: its metadata records a pretrained base "
                          "(no parent)", "leave out --parent")
    if stage != "pretrain" and not parent:
        raise CpmantError(f"{a_or_an(stage)} checkpoint needs its parent, and {model_dir} records none",
                          "pass --parent models:/NAME/VERSION (the version it was made from)")
    return stage, parent


def register_folder(model_dir: str | Path, name: str, stage: str | None = None, parent: str = "",
                    alias: str | None = ALIAS_CANDIDATE) -> tuple[Registered | str, bool]:
    """`cpmant register`: register a folder with the stage and parent its metadata records (flags may only agree),
    never with `champion`. A checkpoint already registered under `name` (same checkpoint sha256) is not
    registered again: (its models:/NAME/N, False) is returned; (Registered, True) for a new version."""
    model_dir = Path(model_dir).expanduser().resolve()
    check_name(name)
    refuse_champion_alias(alias)
    check_local_checkpoint(model_dir)
    setup_tracking()
    stage, parent = decide_lineage(model_dir, stage, parent)
    weights = model_dir / WEIGHTS_FILE if (model_dir / WEIGHTS_FILE).is_file() else model_dir / DELTA_WEIGHTS_FILE
    found = find_version(name, {CHECKPOINT_SHA256: sha256_file(weights)})
    if found:
        return found, False
    return register_checkpoint(model_dir, name, stage=stage, parent=parent, alias=alias), True


def find_version(name: str, match: dict[str, str]) -> str | None:
    """The newest version of registered model `name` whose tags include every key/value of `match`, as
    models:/NAME/N; None when the model does not exist or no version matches. A stage calls it with its inputs'
    hash (tags.INPUTS_SHA256) before training or compressing, and returns that version instead of a duplicate."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        check_name(name)
    except CpmantError:
        return None  # no such model can exist
    setup_tracking()
    client = MlflowClient()
    want = {str(k): str(v) for k, v in (match or {}).items()}
    best, token = None, None
    try:
        while True:
            page = client.search_model_versions(f"name = '{name}'", page_token=token)
            for mv in page:
                if getattr(mv, "status", "READY") not in ("READY", None):
                    continue  # a registration that failed or is still pending is nothing to reuse
                tags = mv.tags or {}
                if mv.name == name and all(tags.get(k) == v for k, v in want.items()):
                    if best is None or int(mv.version) > best:
                        best = int(mv.version)
            token = getattr(page, "token", None)
            if not token:
                break
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")):
            return None
        raise
    return None if best is None else f"models:/{name}/{best}"


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
