"""The ``models`` config group: an embedded zoo, or the user's own directories.

A models group names a base and specialists (name -> directory). With
``zoo: tiny`` (or ``smol``) they come from evomerge's embedded zoo, built on
first use and cached; ``base`` / ``specialists`` entries then override or add
to the zoo's. With ``zoo: null`` the group lists directories only, which is
how a user points evomerge at their own models. ``sets`` names subsets that
search configs refer to (``ties_math`` merges ``sets.math`` when the group
defines it, every specialist otherwise), so one search config serves every
models group.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from evomerge.errors import ConfigError
from evomerge.search.config import ModelsConfig


@dataclass
class ModelSet:
    name: str
    base: str | None
    specialists: dict[str, str]
    task_dirs: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    build_seconds: float = 0.0
    zoo_tasks: dict[str, list[str]] = field(default_factory=dict)  # the zoo's named task groups


def resolve_models(cfg: ModelsConfig, progress: bool = True) -> ModelSet:
    """Build (or reuse) the zoo when the group names one, and return absolute paths (``cfg``'s directories
    were checked by search/config.py's parse_models)."""
    base, specialists, task_dirs = cfg.base, dict(cfg.specialists), list(cfg.task_dirs)
    seconds = 0.0
    zoo_tasks: dict[str, list[str]] = {}
    if cfg.zoo:
        from evomerge.zoo import load_zoo

        start = time.perf_counter()
        zoo = load_zoo(cfg.zoo, progress=progress)
        seconds = time.perf_counter() - start
        base = base or str(zoo.base)
        specialists = {**{k: str(v) for k, v in zoo.specialists.items()}, **specialists}
        task_dirs = [str(zoo.task_dir), *task_dirs]
        zoo_tasks = {k: list(v) for k, v in zoo.tasks.items()}
    return ModelSet(zoo_tasks=zoo_tasks, name=cfg.name, base=base, specialists=specialists, task_dirs=task_dirs,
                    tokenizer=cfg.tokenizer, build_seconds=seconds)


def pick_sources(models: ModelSet, wanted: list[str] | None) -> dict[str, str]:
    """Name -> directory of the models the search merges (``wanted`` None: every specialist)."""
    if wanted is None:
        return dict(models.specialists)
    missing = [w for w in wanted if w not in models.specialists]
    if missing:
        raise ConfigError(f"search.sources names {', '.join(map(repr, missing))}, which models group {models.name!r} "
                          f"does not have; it has {', '.join(models.specialists) or 'no specialists'}. "
                          f"Set search.sources to some of those (or null for all).")
    return {w: models.specialists[w] for w in wanted}
