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
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError


@dataclass
class ModelSet:
    name: str
    base: str | None
    specialists: dict[str, str]
    task_dirs: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    build_seconds: float = 0.0
    zoo_tasks: dict[str, list[str]] = field(default_factory=dict)  # the zoo's named task groups


def _check_dir(path: Any, key: str) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key} must be a path to a model directory, got {path!r}.")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{key}: model directory {str(p)!r} does not exist. Fix the path (override it with "
                          f"`{key}=/path/to/model`) or pick another models group (e.g. `models=tiny`).")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{key}: {str(p)!r} has no config.json, so it is not a Hugging Face model directory; "
                          f"point {key} at the folder holding config.json and the safetensors files.")
    return str(p.resolve())


def check_models(cfg: dict[str, Any]) -> None:
    """Every directory the group names exists (before any zoo is built or model loaded)."""
    if cfg.get("base") is not None:
        _check_dir(cfg["base"], "models.base")
    specs = cfg.get("specialists") or {}
    if not isinstance(specs, dict):
        raise ConfigError("models.specialists must map names to model directories, e.g. {math: /models/math-ft}.")
    for name, path in specs.items():
        _check_dir(path, f"models.specialists.{name}")
    if not cfg.get("zoo") and not specs:
        raise ConfigError("models.specialists is empty and models.zoo is null: list your fine-tuned models "
                          "(`specialists: {name: /path}`) or use an embedded zoo (`models=tiny`).")
    for i, d in enumerate(cfg.get("task_dirs") or []):
        if not Path(str(d)).expanduser().is_dir():
            raise ConfigError(f"models.task_dirs[{i}]: task directory {d!r} does not exist; fix the path or remove it.")


def resolve_models(cfg: dict[str, Any], progress: bool = True) -> ModelSet:
    """Check the group, build (or reuse) the zoo when it names one, and return absolute paths."""
    check_models(cfg)
    base = None if cfg.get("base") is None else _check_dir(cfg["base"], "models.base")
    specialists = {str(k): _check_dir(v, f"models.specialists.{k}") for k, v in (cfg.get("specialists") or {}).items()}
    task_dirs = [str(Path(str(d)).expanduser().resolve()) for d in cfg.get("task_dirs") or []]
    seconds = 0.0
    zoo_tasks: dict[str, list[str]] = {}
    if cfg.get("zoo"):
        from evomerge.zoo import load_zoo
        from evomerge.zoo.build import ZOO_NAMES

        if cfg["zoo"] not in ZOO_NAMES:
            raise ConfigError(f"models.zoo = {cfg['zoo']!r} is not an embedded zoo; use one of {', '.join(ZOO_NAMES)}, "
                              f"or null with your own directories under models.base / models.specialists.")
        start = time.perf_counter()
        zoo = load_zoo(str(cfg["zoo"]), progress=progress)
        seconds = time.perf_counter() - start
        base = base or str(zoo.base)
        specialists = {**{k: str(v) for k, v in zoo.specialists.items()}, **specialists}
        task_dirs = [str(zoo.task_dir), *task_dirs]
        zoo_tasks = {k: list(v) for k, v in zoo.tasks.items()}
    tok = cfg.get("tokenizer")
    return ModelSet(zoo_tasks=zoo_tasks, name=str(cfg.get("name") or cfg.get("zoo") or "models"), base=base, specialists=specialists,
                    task_dirs=task_dirs, tokenizer=None if tok is None else _check_dir(tok, "models.tokenizer"),
                    build_seconds=seconds)


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
