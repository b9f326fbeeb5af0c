"""Model zoos: a base model and specialists fine-tuned from it, each on its own skill.

A merge search needs inputs whose merge is worth searching for: specialists that
each beat the base on their own skill, where no single model is best on the target
mix, and a merge of specialists beats each of them. ``tiny`` (character-level
Llama, built in about two minutes on two CPU cores) serves tests, CI and the quick
default; ``smol`` (SmolLM2-135M-Instruct and full fine-tunes of it) is the real one.

    zoo = load_zoo("tiny")          # builds on first use, then served from the cache
    zoo.base, zoo.specialists["add"], zoo.task_dir, zoo.tasks["math"]
"""
from evomerge.zoo.build import (
    ZOO_NAMES,
    Zoo,
    ZooError,
    build_zoo,
    cache_root,
    config_hash,
    load_zoo,
    zoo_dir,
)

__all__ = ["ZOO_NAMES", "Zoo", "ZooError", "build_zoo", "cache_root", "config_hash", "load_zoo", "zoo_dir"]
