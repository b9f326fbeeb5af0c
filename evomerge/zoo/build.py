"""Build, cache and load zoos: a base model, its specialists and their tasks.

Why a content-hash manifest: a zoo takes minutes to build and is an input to every
search, test and table, so a second ``build`` must be instant and a changed recipe
must never be served from a stale cache. The manifest (written last) records the
hash of the zoo's build config; it matching is what "built" means.

Why tmp dir + rename: a build killed half way must leave either the old zoo or
none, never a directory that looks finished. A lock file serialises concurrent
builders (two test sessions, two engineers) so the work is done once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from evomerge.errors import ZooError
from evomerge.locks import FileMutex
from evomerge.evaluation.data import ItemCounts
from evomerge.evaluation.taskdir import materialise_tasks, task_groups, tasks_need_refresh

ZOO_NAMES = ("tiny", "smol")
FORMAT_VERSION = 1  # bump when the on-disk layout changes


@dataclass
class Zoo:
    name: str
    root: Path
    base: Path
    specialists: dict[str, Path]
    task_dir: Path
    tasks: dict[str, list[str]]  # e.g. {"math": [...], "all": [...]} task-name groups
    manifest: dict = field(default_factory=dict, repr=False)
    from_cache: bool = False  # True when build_zoo found it built (nothing was trained)

    def models(self) -> dict[str, Path]:
        """Every model directory of the zoo, base first."""
        return {"base": self.base, **self.specialists}


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$EVOMERGE_CACHE``, else ``~/.cache/evomerge``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("EVOMERGE_CACHE")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "evomerge"


def zoo_dir(name: str, cache_dir: Path | None = None) -> Path:
    return cache_root(cache_dir) / "zoo" / _check_name(name)


def _check_name(name: str) -> str:
    if name not in ZOO_NAMES:
        raise ZooError(f"unknown zoo {name!r}; the zoos are: {', '.join(ZOO_NAMES)}.")
    return name


def _recipe(name: str) -> ModuleType:
    if name == "tiny":
        from evomerge.zoo import tiny

        return tiny
    from evomerge.zoo import smol

    return smol


def config_hash(name: str) -> str:
    """Hash of everything that decides the zoo's contents (recipe + format version)."""
    spec = {"format": FORMAT_VERSION, "zoo": name, "spec": _recipe(name).spec()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _as_zoo(name: str, root: Path, manifest: dict, from_cache: bool = False) -> Zoo:
    return Zoo(
        name=name,
        root=root,
        base=root / "base",
        specialists={s: root / s for s in manifest["specialists"]},
        task_dir=root / "tasks",
        tasks=manifest["tasks"],
        manifest=manifest,
        from_cache=from_cache,
    )


def _cached(name: str, root: Path) -> Zoo | None:
    manifest = _read_manifest(root)
    if not manifest or manifest.get("config_hash") != config_hash(name):
        return None
    zoo = _as_zoo(name, root, manifest, from_cache=True)
    if not all((p / "config.json").is_file() for p in zoo.models().values()):
        return None
    return zoo


def _open_permissions(root: Path) -> None:
    """mkdtemp makes 0700 dirs and safetensors 0600 files: a shared cache needs umask's."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _refresh_tasks(zoo: Zoo) -> None:
    if tasks_need_refresh(zoo.task_dir):  # the cache was moved: YAMLs name old paths
        materialise_tasks(zoo.task_dir, zoo.manifest["skills"], zoo.manifest["seed"],
                          counts=ItemCounts(**zoo.manifest["eval_items"]))


def build_zoo(
    name: str = "tiny", *, cache_dir: Path | None = None, force: bool = False, progress: bool = True,
    from_scratch: bool = False,
) -> Zoo:
    """Build the zoo ``name`` unless an up-to-date one is cached; return it.

    ``from_scratch``: train every stage, even one whose result ships with the package (tiny's base).
    """
    root = zoo_dir(name, cache_dir)
    recipe = _recipe(name)
    if not force and (zoo := _cached(name, root)) is not None:
        _refresh_tasks(zoo)
        return zoo
    recipe.check_requirements()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileMutex(root.parent / f".{name}.lock"):
        if not force and (zoo := _cached(name, root)) is not None:  # built while we waited
            return zoo
        t0 = time.perf_counter()
        digest = config_hash(name)  # of the recipe this build runs, even if the code changes meanwhile
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=root.parent))
        try:
            info = recipe.build(tmp, progress=progress, from_scratch=from_scratch)
            skills = list(info["skills"])
            materialise_tasks(tmp / "tasks", skills, info["seed"], final_dir=root / "tasks", counts=recipe.EVAL_ITEMS)
            manifest = {
                "name": name,
                "config_hash": digest,
                "format": FORMAT_VERSION,
                "seed": info["seed"],
                "skills": skills,
                "eval_items": recipe.EVAL_ITEMS.as_dict(),
                "specialists": info["specialists"],
                "tasks": {**task_groups(skills), **info.get("task_groups", {})},
                "build_seconds": round(time.perf_counter() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "threads": _threads(),
                **{k: v for k, v in info.items() if k not in ("skills", "seed", "specialists", "task_groups")},
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
            _open_permissions(tmp)
            old = None
            if root.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root.parent))
                os.replace(root, old / name)
            os.replace(tmp, root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _as_zoo(name, root, manifest)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def load_zoo(
    name: str = "tiny", *, cache_dir: Path | None = None, progress: bool = True
) -> Zoo:
    """The cached zoo ``name``; builds it first if it is missing or out of date."""
    return build_zoo(name, cache_dir=cache_dir, force=False, progress=progress)
