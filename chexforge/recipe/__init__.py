"""Recipes: the YAML schema, its loader and the label vocabulary."""

from .loader import (
           load_recipe,
           parse_recipe,
           recipe_dict,
           recipe_from_json,
           recipe_to_yaml,
           stable_hash,
)
from .schema import Cohort, Recipe

__all__ = ["Cohort", "Recipe", "load_recipe", "parse_recipe", "recipe_dict", "recipe_from_json", "recipe_to_yaml",
           "stable_hash"]
