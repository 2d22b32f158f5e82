"""The method registry: a compression method is a config class plus an `apply` function, registered by name.

    @register_method("quantize", QuantizeConfig, uses=())
    def apply(ctx: MethodContext, cfg: QuantizeConfig) -> CPMAnt: ...

A recipe lists method configs (`methods: [{name: prune, heads_keep: 0.5}, {name: distill, steps: 100}]`); the
pipeline calls `METHODS[cfg.name].apply(ctx, cfg)` for each in order. Adding a method is one new module that
registers itself: no central if/elif, no field added to `Recipe`. A method shapes the shared data through hooks of
its config, never through a special case in the pipeline: `row_length()` (the corpus row length it trains on, which
the recipe's streams then have), `check_order()` (where it may sit in a recipe), `summary()` (its words in a
version's description).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field

from ...configio import FrozenModel

if TYPE_CHECKING:
    from ...model import CPMAnt
    from ...training.data import Batch, PretrainStream


class MethodConfig(FrozenModel):
    """Base of every method's config; `name` is the registered method name (a Literal in each subclass)."""

    name: str = Field(..., description="registered method name")

    def check_order(self, names: list[str], index: int) -> str | None:
        """A problem with this method at position `index` of a recipe's method names, or None."""
        return None

    def summary(self) -> str:
        """A few words for version descriptions (e.g. 'int8 weights')."""
        return self.name

    def row_length(self) -> int | None:
        """The length of the corpus rows this method trains on, which the recipe's data streams then have (the
        first method of a recipe that names one decides; None: no wish, ROW_LENGTH)."""
        return None


@dataclass
class MethodContext:
    """What a method works on: the student (replaced by each method), the teacher, the data, where to write."""

    teacher: "CPMAnt"
    student: "CPMAnt"
    train_stream: "PretrainStream"  # the parent's train split only (no held-out document)
    importance_batches: Callable[[], list["Batch"]]  # held-out rows that score importance (built on first call)
    work_dir: Path  # the variant's folder: a method may keep state under it (distillation checkpoints)
    vocab_path: Path
    identity: dict = field(default_factory=dict)  # what a resumable method's saved state must match
    callbacks: Any = None
    progress: bool = True
    report: dict = field(default_factory=dict)  # each method writes its section under its name
    step: int = 0  # training steps taken so far (the step final metrics are logged at)
    precision: str = "fp32"  # resolved (fp32 / bf16): autocast of distillation and importance forward passes


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[MethodContext, MethodConfig], "CPMAnt"]
    uses: tuple[str, ...]  # the CompressConfig fields this method reads (recorded as params, part of the reuse key)
    description: str
    overrides: dict[str, str] = field(default_factory=dict)  # CompressConfig field -> this config's field it sets


METHODS: dict[str, Method] = {}
ROW_LENGTH = 128  # tokens per corpus row of a recipe's data streams, unless a method asks for another (row_length)


def register_method(name: str, config_cls: type[MethodConfig], uses: tuple[str, ...] = (), description: str = "",
                    overrides: dict[str, str] | None = None):
    """Decorator: register `apply(ctx, cfg) -> new student` under `name` with its config class.

    uses: CompressConfig fields the method reads; overrides: CompressConfig fields that, when set, replace a field
    of this method's config in every recipe (e.g. distill_steps -> steps)."""
    default_name = config_cls.model_fields["name"].default
    if default_name != name:
        raise ValueError(f"{config_cls.__name__}.name must default to {name!r}, not {default_name!r}")

    def deco(apply):
        METHODS[name] = Method(name, config_cls, apply, tuple(uses), description or (apply.__doc__ or "").strip(),
                               dict(overrides or {}))
        return apply

    return deco


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def method_config(value: Any) -> MethodConfig:
    """A method config from a name (`"prune"`: its defaults), a mapping with `name`, or a MethodConfig.

    Raises ValueError (pydantic turns it into one line of the config error) naming the method and the field."""
    if isinstance(value, MethodConfig):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError(f"a method is a name or a mapping with `name` (one of: {', '.join(METHODS)}), "
                         f"not {value!r}")
    name = value["name"]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    from pydantic import ValidationError

    try:
        return METHODS[name].config_cls.model_validate(value)
    except ValidationError as e:
        raise ValueError("; ".join(
            f"{'.'.join([name, *(str(x) for x in err['loc'])])}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors())) from None
