"""MLflow's length limits in one place: every param, tag and note the project writes is cut here, with a marker
that says it was cut, never silently at a call site."""

from __future__ import annotations

from mlflow.utils.validation import MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

# a Prefect state message is no MLflow value, but it is cut the same way (tasks/outcomes.py)
STATE_MESSAGE = 2000
MARK = " [...]"


def cut(value: object, limit: int) -> str:
    """`value` as a string of at most `limit` characters, ending in MARK when it was longer."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - len(MARK)] + MARK


def param_value(value: object) -> str:
    return cut(value, MAX_PARAM_VAL_LENGTH)


def tag_value(value: object) -> str:
    return cut(value, MAX_TAG_VAL_LENGTH)


def version_tag_value(value: object) -> str:
    return cut(value, MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH)
