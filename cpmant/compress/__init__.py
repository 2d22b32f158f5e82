"""Compression: structured pruning, distillation, int8 quantization and MoEfication, combined by recipes.

Each method is a small module under `methods/` with its own config that registers itself in `METHODS`; named
recipes register in `RECIPES`. A CLI or a config builds its choices from these two registries.
"""

from .methods import METHODS, MethodConfig, register_method
from .recipe import ALL, LADDER, RECIPES, Recipe, get_recipes, recipe_names, register_recipe

__all__ = ["METHODS", "MethodConfig", "register_method", "ALL", "LADDER", "RECIPES", "Recipe", "get_recipes",
           "recipe_names", "register_recipe"]
