"""The merge search: an Optuna study over merge recipes, scored in memory (``evomerge`` console script)."""
