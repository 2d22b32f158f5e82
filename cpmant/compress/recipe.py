"""Compression recipes: a name and the methods to apply in order, each with its own config.

    name: half-int8
    methods:
      - {name: prune, heads_keep: 0.5, dim_ff_keep: 0.5}
      - {name: distill, steps: 100, qat: true}
      - quantize                      # a bare name: the method's defaults

The method names and their configs come from the method registry (`cpmant.compress.methods.METHODS`); the recipe
names from `RECIPES`, where the built-in recipes register themselves (`register_recipe`). The published ladder
(CPM-ANT.md) is expressed as shares of the 10B's 48 layer slots, 32 heads and dim_ff 10240, so the same recipe gives
the published shapes on the `10b` preset and the same proportions on any other base. A user recipe is a YAML file
holding one `Recipe`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from ..config import ModelConfig
from ..configio import FrozenModel, build_config
from ..errors import CpmantError
from .methods import DistillConfig, MethodConfig, PruneConfig, method_config

BASE_LAYERS, BASE_HEADS, BASE_FF = 48, 32, 10240  # the 10B the ladder was cut from
PUBLISHED_LABEL = "published loss increase (CPM-Ant 10B ladder)"


def _default_methods() -> list[MethodConfig]:
    return [PruneConfig(), DistillConfig()]


class Recipe(FrozenModel):
    name: str = Field(..., description="suffix of the registered name: <base>-<name>")
    methods: list[SerializeAsAny[MethodConfig]] = Field(
        default_factory=_default_methods,
        description="methods applied in this order: names or mappings with `name` and that method's fields")
    published_loss_increase: float | None = Field(
        None, description=f"reference figure, not a measurement: the {PUBLISHED_LABEL} over the 10B")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v != v.strip():
            raise ValueError(f"recipe name {v!r} must be a non-empty word without '/'")
        return v

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v):
        if not isinstance(v, (list, tuple)):
            raise ValueError("methods is a list of method names or mappings with `name`")
        return [method_config(m) for m in v]

    @model_validator(mode="after")
    def _check(self):
        names = [m.name for m in self.methods]
        if not names:
            raise ValueError("a recipe needs at least one method")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"each method may appear once; repeated: {', '.join(dup)}")
        problems = [p for i, m in enumerate(self.methods) if (p := m.check_order(names, i))]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def method_names(self) -> list[str]:
        return [m.name for m in self.methods]

    def method(self, name: str) -> MethodConfig | None:
        """This recipe's config of method `name`, or None when the recipe does not use it."""
        return next((m for m in self.methods if m.name == name), None)

    def with_method(self, name: str, **update) -> "Recipe":
        """A copy whose `name` method config has `update` applied (validated)."""
        if self.method(name) is None:
            raise CpmantError(f"recipe {self.name!r} has no {name} method", f"its methods: {self.method_names}")
        methods = [method_config({**m.model_dump(), **update}) if m.name == name else m for m in self.methods]
        return self.model_copy(update={"methods": methods})

    def target_shape(self, base: ModelConfig) -> dict:
        """The pruned shape on `base` (the base's own shape when the recipe does not prune)."""
        prune = self.method("prune") or PruneConfig()
        return prune.target_shape(base)


# ---- the registry of named recipes -----------------------------------------------------------------------
RECIPES: dict[str, Recipe] = {}
LADDER: tuple[str, ...] = ("7b", "3b", "1b", "300m")
ALL = "all"  # the four ladder recipes


def register_recipe(recipe: Recipe) -> Recipe:
    """Make `recipe` selectable by its name (CLI choices and `compress.recipes` values come from RECIPES)."""
    if recipe.name == ALL:
        raise CpmantError(f"{ALL!r} is reserved for the ladder", "choose another recipe name")
    RECIPES[recipe.name] = recipe
    return recipe


def recipe_names() -> list[str]:
    """The values `--recipe` / `compress.recipes` accept besides YAML paths: each registered name and `all`."""
    return [*RECIPES, ALL]


def _ladder(name: str, att: int, ffn: int, heads: int, dim_ff: int, published: float) -> Recipe:
    prune = PruneConfig(att_keep=att / BASE_LAYERS, ffn_keep=ffn / BASE_LAYERS, heads_keep=heads / BASE_HEADS,
                        dim_ff_keep=dim_ff / BASE_FF)
    return Recipe(name=name, methods=[prune, DistillConfig()], published_loss_increase=published)


# The published ladder (CPM-ANT.md): kept sub-layers, heads, dim_ff; LM loss 2.420 (10B) -> 2.510, 2.603, 2.759,
# 2.998, i.e. +3.7%, +7.6%, +14.0%, +23.9%.
for _r in (
    _ladder("7b", 37, 32, 32, 10240, 2.510 / 2.420 - 1),
    _ladder("3b", 37, 32, 20, 3735, 2.603 / 2.420 - 1),
    _ladder("1b", 25, 21, 16, 700, 2.759 / 2.420 - 1),
    _ladder("300m", 25, 21, 4, 350, 2.998 / 2.420 - 1),
    Recipe(name="int8", methods=["quantize"]),
    Recipe(name="moe", methods=["moefy"]),
):
    register_recipe(_r)


def check_recipe_spec(spec: str) -> list[str]:
    """The items of a spec, each a registered name, `all` or a YAML path (not opened here); ValueError otherwise."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [i for i in items if i != ALL and i not in RECIPES and not i.endswith((".yaml", ".yml"))]
    if bad:
        raise ValueError(f"unknown recipe {bad[0]!r}; use one of {', '.join(recipe_names())}, "
                         "or a recipe YAML file (see configs/recipes/)")
    return items


def get_recipes(spec: str) -> list[Recipe]:
    """`3b`, `all` (the four ladder recipes), a comma list (`all,int8`), or paths to recipe YAML files."""
    try:
        items = check_recipe_spec(spec)
    except ValueError as e:
        raise CpmantError(str(e).split(";")[0],
                          f"use one of {', '.join(recipe_names())}, or a recipe YAML file (see configs/recipes/)")
    out: list[Recipe] = []
    for item in items:
        if item == ALL:
            out += [RECIPES[n] for n in LADDER]
        elif item in RECIPES:
            out.append(RECIPES[item])
        else:
            out.append(build_config(Recipe, Path(item)))
    if not out:
        raise CpmantError("no recipe given", "pass --recipe 3b, --recipe all, or --recipe my-recipe.yaml")
    return out
