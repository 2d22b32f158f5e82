"""Resolve a model URI (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, or a local folder) to a checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import yaml

from cpmant.checkpoint import is_complete
from cpmant.errors import CpmantError
from cpmant.paths import subdir

from .tracking import setup_tracking


def _parse(uri: str) -> tuple[str, str]:
    body = uri[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, "@" + alias
    if "/" in body:
        name, ver = body.rsplit("/", 1)
        return name, ver
    raise CpmantError(f"cannot parse model URI {uri!r}", "write models:/NAME/VERSION or models:/NAME@ALIAS")


def resolve_version(uri: str) -> tuple[str, int]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, ref = _parse(uri)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, ref[1:]) if ref.startswith("@") else client.get_model_version(
            name, ref)
    except MlflowException as e:
        raise CpmantError(f"{uri} is not in the registry ({e.message.splitlines()[0]})",
                          "list versions in the MLflow UI, or run `cpmant pretrain` to make one") from None
    return name, int(mv.version)


def checkpoint_dir(uri: str) -> Path:
    """A local checkpoint folder for `uri`; registry versions are downloaded once into CPMANT_HOME/cache/models."""
    p = Path(uri).expanduser()
    if not uri.startswith("models:/"):
        if is_complete(p):
            return p
        raise CpmantError(f"{uri} is neither a models:/ URI nor a complete checkpoint folder",
                          "pass models:/NAME/VERSION, models:/NAME@ALIAS, or a folder with cpmant_meta.json")
    import mlflow

    setup_tracking()
    name, version = resolve_version(uri)
    dest = subdir("cache", "models", name, str(version))
    model_root = dest / "model"
    if not (model_root / "MLmodel").exists():
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(model_root))
    mlmodel = yaml.safe_load((model_root / "MLmodel").read_text(encoding="utf-8"))
    rel = mlmodel["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
    ckpt = model_root / rel
    if not is_complete(ckpt):
        raise CpmantError(f"the download of {uri} has no complete checkpoint at {ckpt}",
                          f"delete {dest} and try again")
    return ckpt
