"""The merge engine: recipes, plans, the one-shot merge and the prepared (search) engine."""
from evomerge.engine.recipe import Recipe, load_recipe  # noqa: F401
