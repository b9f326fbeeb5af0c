"""Materialise evomerge's lm-eval tasks into a directory lm-eval can index.

Why materialise instead of pointing lm-eval at the package: lm-eval resolves a
relative ``data_files`` path against the current directory, not the YAML's folder,
so a task must name its data by absolute path. The package keeps YAML templates
(behaviour lives there) whose data paths start with ``${DATA_DIR}``; this module
writes the generated data next to copies of them with that placeholder replaced.
The result is an ordinary lm-eval task directory: ``lm_eval --include_path DIR
--tasks evomerge_add`` works on it as well as :class:`~evomerge.evaluation.Evaluator`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from evomerge.evaluation.data import SKILLS, ItemCounts, write_eval_data

PREFIX = "evomerge_"
PLACEHOLDER = "${DATA_DIR}"


def task_name(skill: str, ll: bool = False) -> str:
    """lm-eval name of a skill's task; the prefix keeps clear of lm-eval's built-ins."""
    return f"{PREFIX}{skill}{'_ll' if ll else ''}"


def task_groups(skills: list[str] | None = None) -> dict[str, list[str]]:
    """Named task lists: ``math`` / ``text`` / ``all`` (exact match) and ``*_ll`` twins."""
    skills = list(SKILLS) if skills is None else skills
    groups: dict[str, list[str]] = {}
    for kind in ("math", "text"):
        names = [s for s in skills if SKILLS[s].kind == kind]
        groups[kind] = [task_name(s) for s in names]
        groups[f"{kind}_ll"] = [task_name(s, True) for s in names]
    groups["all"] = [task_name(s) for s in skills]
    groups["all_ll"] = [task_name(s, True) for s in skills]
    return groups


def _templates() -> list[tuple[str, str]]:
    root = resources.files("evomerge.evaluation") / "tasks"
    return sorted((p.name, p.read_text()) for p in root.iterdir() if p.name.endswith(".yaml"))


def materialise_tasks(
    task_dir: Path, skills: list[str] | None = None, seed: int = 0, *, final_dir: Path | None = None,
    counts: ItemCounts = ItemCounts(),
) -> Path:
    """Write data and task YAMLs for ``skills`` into ``task_dir`` (replaced atomically).

    ``final_dir`` is where the directory will live when a caller builds it in a
    temporary place and renames it later (the zoo does): the YAMLs must name the
    data's final absolute path. ``counts``: the items per split (the zoo's own). Returns
    the absolute task directory. YAMLs of skills not asked for are left out, so an
    include_path never names a task without data.
    """
    skills = list(SKILLS) if skills is None else skills
    task_dir = Path(task_dir).resolve()
    task_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{task_dir.name}.", dir=task_dir.parent))
    try:
        write_eval_data(tmp / "data", skills, seed, counts)
        wanted = {f"{task_name(s, ll)}.yaml" for s in skills for ll in (False, True)}
        data_dir = str(Path(final_dir or task_dir).resolve() / "data")
        for name, text in _templates():
            if name.startswith("_") or name in wanted:
                (tmp / name).write_text(text.replace(PLACEHOLDER, data_dir))
        if task_dir.exists():
            shutil.rmtree(task_dir)
        os.replace(tmp, task_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return task_dir


def tasks_need_refresh(task_dir: Path) -> bool:
    """True when a task directory's YAMLs name data that is not where they say.

    A zoo copied or moved to another cache root keeps YAMLs with the old absolute
    paths; re-materialising (a fraction of a second) is cheaper than failing.
    """
    marker = str(Path(task_dir).resolve() / "data")
    yamls = [p for p in Path(task_dir).glob(f"{PREFIX}*.yaml")]
    return not yamls or any(marker not in p.read_text() for p in yamls)
