"""Promotion by aliases (`candidate`, `champion`), never the deprecated stages."""

from __future__ import annotations

from cpmant.errors import CpmantError

KNOWN = ("candidate", "champion")


def set_alias(uri: str, alias: str) -> int:
    """Point `alias` of the model at the version `uri` names (moving it if it pointed elsewhere); return it."""
    from mlflow.tracking import MlflowClient

    from .pull import resolve_version
    from .tracking import setup_tracking

    if not alias or "/" in alias or "@" in alias:
        raise CpmantError(f"bad alias {alias!r}", "use a plain word such as candidate or champion")
    setup_tracking()
    name, version = resolve_version(uri)
    MlflowClient().set_registered_model_alias(name, alias, str(version))
    return version


def get_alias(name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .tracking import setup_tracking

    setup_tracking()
    try:
        return int(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def remove_alias(name: str, alias: str) -> None:
    from mlflow.tracking import MlflowClient

    from .tracking import setup_tracking

    setup_tracking()
    MlflowClient().delete_registered_model_alias(name, alias)


def promote(uri: str) -> int:
    """Make `uri` the champion (validation calls this only when its gate passes)."""
    return set_alias(uri, "champion")
