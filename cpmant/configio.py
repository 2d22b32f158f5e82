"""Typed, frozen configs: YAML files are saved instances; CLI overrides are dotted keys (`pretrain.lr=3e-3`).

pydantic does the typing and validation; this module only adds YAML loading, dotted overrides and one clear
error that lists every problem at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import CpmantError

T = TypeVar("T", bound=BaseModel)


class FrozenModel(BaseModel):
    """Base for every config: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise CpmantError(f"override {key!r}: {p!r} is not a section", "use dotted keys that name a field")
    d[parts[-1]] = value


def parse_overrides(items: list[str] | tuple[str, ...] | None) -> dict:
    """`["a.b=3", "c=x"]` -> {"a": {"b": 3}, "c": "x"}; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise CpmantError(f"override {item!r} has no '='", "write overrides as KEY=VALUE, e.g. pretrain.lr=0.01")
        k, v = item.split("=", 1)
        _set_dotted(out, k.strip(), yaml.safe_load(v))
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(cls: type[T], path: str | Path | None = None, overrides: dict | None = None) -> T:
    """Load `cls` from an optional YAML file, then apply overrides; all validation errors in one CpmantError."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise CpmantError(f"config path {p} is a folder, not a file", "pass the path of a YAML file (see configs/)")
        if not p.is_file():
            raise CpmantError(f"config file {p} does not exist", "pass the path of a YAML file (see configs/)")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise CpmantError(f"config file {p} is not valid YAML: {e}", "fix the YAML syntax") from e
        if not isinstance(data, dict):
            raise CpmantError(f"config file {p} must hold a mapping at top level", "write KEY: VALUE lines")
    data = deep_merge(data, overrides or {})
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise CpmantError(
            f"invalid {cls.__name__}: {problems}", "fix these fields in the config file or the overrides"
        ) from None


def dump_config(cfg: BaseModel, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
