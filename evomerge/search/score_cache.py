"""Full-split scores of recipes, kept on disk and shared by every run on this machine.

Why: the end of every search re-scores its baselines (each source alone, the
textbook recipe) on the full search and test splits. Those recipes are the same
in every run of a study grid — other seeds, other samplers, other genomes — and
on the smol zoo they were most of a run's wall time. A score is a pure function
of the merged weights and the evaluation set-up, so it is looked up instead.

The key holds everything a score depends on: the recipe (method, models,
parameters, and the seed where the method draws random masks: a run's seed reaches
every recipe it writes, and only DARE and DELLA read it), each model directory's
files (name, size, modification time), the tasks and their directories' files, the
digest of every split's items, the tokenizer directory's files, the split, the evaluation settings
(dtype, batch size, device type, generation cap), the versions of torch,
transformers and lm-eval, and a digest of evomerge's own merge and evaluation
code (an upgrade, or a developer's edit, may change a merge or a score).
Change any and the entry is simply not found. ``final.score_cache=null`` turns
the cache off.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def _files(directory: str) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of every file under ``directory``: cheap and changes when any file does."""
    root = Path(directory)
    if not root.exists():
        return []
    if root.is_file():
        st = root.stat()
        return [(root.name, st.st_size, st.st_mtime_ns)]
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "transformers", "lm_eval"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "?"
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for sub in ("checkpoints", "engine", "evaluation", "methods"):
        for f in sorted((package / sub).rglob("*")):
            if f.is_file() and f.suffix in (".py", ".yaml"):
                digest.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes())
    out["evomerge code"] = digest.hexdigest()
    return out


def _scored(recipe: Any) -> dict[str, Any]:
    """What of ``recipe`` its merged weights depend on: all of it, less the seed and the random mode when its
    method draws no random numbers."""
    from evomerge.methods import get_method

    out = recipe.to_dict()
    if not get_method(recipe.merge_method).uses_uniforms:
        out["evomerge"] = {k: v for k, v in out["evomerge"].items() if k not in ("seed", "random_mode")}
    return out


class ScoreCache:
    """``get``/``put`` of one split's score record for one recipe, under a fixed evaluation context."""

    def __init__(self, root: str | Path, context: dict[str, Any], task_dirs: list[str], *,
                 tokenizer_dir: str | None = None) -> None:
        self.root = Path(root).expanduser()
        self.context = {**context, "task_dirs": {d: _files(d) for d in task_dirs}, "versions": _versions(),
                        "tokenizer": None if tokenizer_dir is None else _files(tokenizer_dir)}
        self._model_files: dict[str, Any] = {}

    def _key(self, recipe: Any, split: str) -> str:
        models = {}
        for ref in recipe.all_model_refs():
            if ref not in self._model_files:
                self._model_files[ref] = _files(ref)
            models[ref] = self._model_files[ref]
        blob = json.dumps({"recipe": _scored(recipe), "models": models, "split": split, **self.context},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, recipe: Any, split: str) -> Path:
        key = self._key(recipe, split)
        return self.root / key[:2] / f"{key}.json"

    def get(self, recipe: Any, split: str) -> dict[str, Any] | None:
        path = self._path(recipe, split)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # absent or unreadable: score it again

    def put(self, recipe: Any, split: str, record: dict[str, Any]) -> None:
        path = self._path(recipe, split)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)  # atomic: a concurrent reader sees the whole record or none
        except OSError:
            pass  # a read-only or full cache costs time, never a result
