"""Promotion by aliases (`candidate`, `champion`), never the deprecated stages."""

from __future__ import annotations

from cpmant.errors import CpmantError

from .tags import ALIAS_CHAMPION, ALIASES

KNOWN = ALIASES


def check_alias(alias: str) -> None:
    from mlflow.exceptions import MlflowException

    if not isinstance(alias, str) or not alias or "/" in alias or "@" in alias:
        raise CpmantError(f"bad alias {alias!r}", f"use a plain word such as {' or '.join(ALIASES)}")
    try:  # MLflow's own rules (letters, digits, - and _; `latest` and `vN` are reserved)
        from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except ImportError:
        pass
    except MlflowException as e:
        raise CpmantError(f"bad alias {alias!r}: {e.message}",
                          f"use a plain word such as {' or '.join(ALIASES)}") from None


def set_alias(uri: str, alias: str) -> int:
    """Point `alias` of the model at the version `uri` names (moving it if it pointed elsewhere); return it."""
    from mlflow.tracking import MlflowClient

    from .pulling import resolve_version
    from .tracking import setup_tracking

    check_alias(alias)
    setup_tracking()
    name, version = resolve_version(uri)
    MlflowClient().set_registered_model_alias(name, alias, str(version))
    return version


def get_alias(name: str, alias: str) -> int | None:
    """The version number `alias` of model `name` points at; None when either does not exist."""
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
    return set_alias(uri, ALIAS_CHAMPION)
