"""What a finished (or interrupted) search leaves in its run directory.

Everything here reads the Optuna study, not the process that ran it, which is
why ``evomerge-export RUN_DIR --trial N`` can export any trial later, from any
machine that sees the storage and the model directories.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.engine.recipe import Recipe
from evomerge.errors import EvomergeError
from evomerge.engine.card import model_card
from evomerge.search import record


def genome_from_study(study: optuna.Study) -> Any:
    """The study's genome, rebuilt from what the search stored (no Hydra config needed)."""
    from evomerge.search.genome import Genome, Layout
    from evomerge.search.spec import parse_search

    info = record.manifest_of(study)
    if info is None:
        raise EvomergeError(f"study {study.study_name!r} was not written by evomerge (no {record.MANIFEST!r} attribute).")
    lay = info.layout
    layout = Layout(lay["n_layers"], tuple(lay["pre"]), tuple(lay["post"]), tuple(lay["layer_names"]))
    from evomerge.search.dataflow import DataflowGenome, is_dataflow, parse_dataflow

    if is_dataflow(info.search):  # a layer-stacking study (search/dataflow.py)
        return DataflowGenome(parse_dataflow(info.search), info.sources, layout, seed=info.seed)
    from evomerge.search.method_space import AutoGenome, is_auto, parse_auto

    if is_auto(info.search):  # the method is a gene (search/method_space.py)
        return AutoGenome(parse_auto(info.search), info.sources, info.base, layout, seed=info.seed)
    return Genome(parse_search(info.search), info.sources, info.base, layout, seed=info.seed)


def trial_recipe(genome: Any, trial: FrozenTrial) -> Recipe:
    return genome.recipe(trial.params, seed=record.seed_of(trial, genome.seed))


def scores_markdown(label: str, rec: dict[str, Any], search_limit: Any) -> str:
    """The model card's scores section: search and held-out test side by side."""
    lines = ["## Scores", "", f"Candidate: **{rec.get('label') or label}**. Fitness is the weighted mean of the task "
             f"metrics below.", "",
             "| split | fitness |", "|---|---|"]
    lines.append(f"| search ({'all items' if search_limit is None else f'limit {search_limit}'}) | {_f(rec.get('search_fitness'))} |")
    if rec.get("search_full_fitness") is not None:
        lines.append(f"| search (all items) | {_f(rec['search_full_fitness'])} |")
    if rec.get("select_fitness") is not None:
        lines.append(f"| select (never optimised; chose the winner) | {_f(rec['select_fitness'])} |")
    lines.append(f"| **test (held out)** | **{_f(rec.get('test_fitness'))}** |")
    metrics = rec.get("test_metrics") or {}
    if metrics:
        lines += ["", "Held-out test metrics:", "", "| task | metric | value |", "|---|---|---|"]
        for task, ms in metrics.items():
            for m, v in ms.items():
                if "stderr" not in m:
                    lines.append(f"| {task} | {m} | {_f(v)} |")
    chose = ("the select split, whose items the search never scored" if rec.get("select_fitness") is not None
             else "the search split only")
    lines += ["", f"Splits: search: optimised; {'select: chose; ' if rec.get('select_fitness') is not None else ''}"
                  f"test: reported only. The test split was never used to choose this model: candidates were "
                  f"ranked on {chose}."]
    return "\n".join(lines)


def export_trial(genome: Any, trial: FrozenTrial, out_dir: Path, *, scores: dict[str, Any] | None, title: str,
                 search_limit: Any = None, model: bool = True, device: str = "auto", progress: bool = True,
                 engine: Any = None,
                 fused: bool | str | dict[str, bool] = "auto", trust_remote_code: bool = False) -> Path:
    """``out_dir/recipe.yaml`` and (``model``) ``out_dir/model/`` with a model card stating the scores.

    ``fused``: the kernel of the engine that scored the trial ("auto": the engine's own rule for this
    device and model size). Why not eager torch, as a one-off merge would use: the compiled kernel may
    round a multiply-add differently, and in bfloat16 evaluation one bfloat16 step in three of 135M
    weights moved a smol winner's test score by three items of 1,500. Same kernel, same weights: the
    card's scores are the model's.

    ``engine``: the prepared engine that scored the trial, when it is still resident (a search ending):
    the model is written from its live tensors with the trial's recipe applied, not merged again from the
    models on disk, wherever those are the tensors the merge from disk would write (the engine's live
    model holds the output dtype, every tensor has a parameter of its own: engine/oneshot.py
    ``live_tensors``); else, and for ``evomerge-export`` later, it is merged from disk. The directory
    (recipe, card, config, tokenizer) and its staging and swap are the same either way.
    """
    from evomerge.engine.oneshot import merge_to_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = trial_recipe(genome, trial)
    recipe.source_file = str(out_dir / "recipe.yaml")
    recipe.save(out_dir / "recipe.yaml")
    if model:  # an earlier export is replaced whole once the new one is complete, card included
        sections = scores_markdown(title, scores, search_limit) if scores else ""
        if isinstance(fused, dict):  # an engine of several methods chose per method (engine/prepared.py)
            fused = fused.get(recipe.merge_method, "auto")
        merge_to_dir(recipe, out_dir / "model", device=device, progress=progress, fused=fused,
                     trust_remote_code=trust_remote_code, live=engine,
                     card=model_card(recipe, title=title, sections=sections))
    return out_dir


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    """One row per trial: number, state, parameters, fitness, per-task metrics, merge and eval seconds, the search
    items it scored (its cost) and which fresh sample they were."""
    from evomerge.search.driver import retry_of

    trials = study.get_trials(deepcopy=False)
    retried = retry_of(trials)
    params = sorted({p for t in trials for p in t.params})
    rows = [record.TrialRecord.of(t) for t in trials]
    metric_cols = sorted({f"{task}/{m}" for r in rows for task, ms in r.metrics.items() for m in ms if "stderr" not in m})
    n_values = max((len(t.values or []) for t in trials), default=0)
    final = record.final_scores(study)
    head = ["number", "state", "baseline", "fitness", *[f"value_{i}" for i in range(n_values) if n_values > 1],
            "first_fitness", "search_full_fitness", "select_fitness", "test_fitness", "merge_s", "eval_s", "items",
            "sample", "seed", "retry_of",
            "fail_reason", *metric_cols, *params]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for t, r in zip(trials, rows):
            state = t.state.name + (" (retried)" if t.state == TrialState.FAIL and t.number in retried else "")
            rec = final.get(t.number) or record.FinalScores()
            row = [t.number, state, r.baseline or "", _cell(r.fitness),
                   *[_cell(t.values[i]) if t.values and i < len(t.values) else "" for i in range(n_values) if n_values > 1],
                   _cell(r.first_look), _cell(rec.search_full), _cell(rec.select), _cell(rec.test),
                   *[_raw(v) for v in (r.merge_s, r.eval_s, r.items, r.sample, r.seed, r.retry_of, r.fail_reason)],
                   *[_cell(r.metrics.get(c.split("/", 1)[0], {}).get(c.split("/", 1)[1])) for c in metric_cols],
                   *[_cell(t.params.get(p)) for p in params]]
            w.writerow(row)
    return path


def trial_counts(study: optuna.Study) -> dict[str, int]:
    from evomerge.search.driver import retry_of

    trials = study.get_trials(deepcopy=False)
    retried = retry_of(trials)
    counts: dict[str, int] = {}
    for t in trials:
        key = "FAIL_RETRIED" if t.state == TrialState.FAIL and t.number in retried else t.state.name
        counts[key] = counts.get(key, 0) + 1
    counts["finished"] = sum(v for k, v in counts.items() if k in ("COMPLETE", "PRUNED", "FAIL"))
    return counts


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` whole or not at all (workers of a sweep may write the same file at once)."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _raw(v: Any) -> Any:
    return "" if v is None else v


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


# What a finished run leaves in its directory, each with what it is. The winner's files are listed only where
# they were written (no winner: no best/; ``final.export_model=false``: no best/model/); the others always are,
# the report and the summary being written after the listing is made.
RUN_FILES = {"best/recipe.yaml": "the winner's recipe (replays with `evomerge-merge` and mergekit)",
             "best/model/": "the merged winner", "trials.csv": "every trial, one row each",
             "summary.json": "the scores and the winner rule's comparison", "report.md": "this report"}


def run_files(run_dir: Path) -> list[str]:
    """The run files of :data:`RUN_FILES` that ``run_dir`` holds, as its report and summary list them."""
    return [name for name in RUN_FILES if not name.startswith("best/") or (run_dir / name).exists()]
