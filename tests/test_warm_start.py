"""Warm start: a second search begins from the first one's best trials or its exported recipe.

The real console app on the tiny zoo (two small searches), the real Optuna study file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.search.record import manifest_of, ranking_fitness, search_fitness
from evomerge.search.warm import parse_warm, warm_points

APP = [sys.executable, "-m", "evomerge.run.app"]
SMALL = ["+search=ties_math", "search.limit=20", "search.pruning.enabled=false", "progress=false", "final.top_k=1",
         "final.export_model=false"]


def _app(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*APP, *SMALL, *args, f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                          timeout=900, env=env)


def _study(run_dir: Path) -> optuna.Study:
    storage = f"sqlite:///{run_dir / 'study.db'}"
    return optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)


@pytest.fixture(scope="module")
def first(tiny_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    run_dir = root / "first"
    proc = _app(run_dir, "search.n_trials=6", f"final.score_cache={root / 'scores'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _genome(run_dir: Path, **search_changes):
    from evomerge.export.run import genome_from_study
    from evomerge.search.genome import Genome
    from evomerge.search.spec import parse_search

    study = _study(run_dir)
    genome = genome_from_study(study)
    if not search_changes:
        return genome
    info = manifest_of(study)
    return Genome(parse_search({**info.search, **search_changes}), info.sources, info.base, genome.layout,
                  seed=info.seed)


@pytest.mark.slow
def test_a_second_search_enqueues_the_first_ones_best_trials_and_scores_them_alike(first, tmp_path):
    earlier = _study(first)
    searched = [t for t in earlier.get_trials(states=(TrialState.COMPLETE,)) if not t.user_attrs.get("baseline")]
    best2 = sorted(searched, key=ranking_fitness, reverse=True)[:2]
    second = tmp_path / "second"
    # 3 baselines + 2 warm trials = the whole budget: every trial of the second search is enqueued
    proc = _app(second, "search.n_trials=5", f"warm_start={{study: {first}, top: 2}}",
                f"final.score_cache={tmp_path / 'scores'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = {t.user_attrs.get("baseline"): t for t in _study(second).get_trials(states=(TrialState.COMPLETE,))}
    assert set(trials) == {"alone:add", "alone:sub", "textbook", *(f"warm:trial_{t.number}" for t in best2)}
    for t in best2:
        warm = trials[f"warm:trial_{t.number}"]
        assert warm.params == t.params
        assert search_fitness(warm) == search_fitness(t)  # same recipe, same items: the same score
    summary = json.loads((second / "summary.json").read_text())
    assert {f"warm:trial_{t.number}" for t in best2} <= set(summary["baselines"])  # re-scored like any baseline
    assert summary["trials"]["finished"] == 5


@pytest.mark.slow
def test_a_recipe_file_maps_back_into_the_genome_that_wrote_it(first):
    study = _study(first)
    winner = study.trials[study.user_attrs["winner"]]
    recipe = first / "best" / "recipe.yaml"
    genome = _genome(first)
    point, twice = warm_points(parse_warm({"recipes": [str(recipe), str(recipe)]}), genome)
    assert (point.label, twice.label) == ("warm:best/recipe", "warm:best/recipe#2")  # labels stay unique
    assert set(point.params) == set(winner.params)
    assert all(abs(point.params[k] - winner.params[k]) <= 5e-7 for k in winner.params)
    assert genome.recipe(point.params, seed=point.seed).to_dict() == genome.recipe(winner.params).to_dict()


@pytest.mark.slow
def test_another_genome_is_refused_with_the_mismatch_named(first, tmp_path):
    other = _genome(first, layers_per_group="global")  # one gene per model instead of one per layer
    with pytest.raises(ConfigError, match="searched other genes") as err:
        warm_points(parse_warm({"study": str(first), "top": 1}), other)
    assert "missing there: add.density" in str(err.value) and "not here: add.density.g0" in str(err.value)
    searched = next(t for t in _study(first).get_trials(states=(TrialState.COMPLETE,)) if not t.user_attrs.get("baseline"))
    per_layer = _genome(first).recipe(searched.params).save(tmp_path / "trial" / "recipe.yaml")  # values vary by layer
    with pytest.raises(ConfigError, match="cannot express it"):
        warm_points(parse_warm({"recipes": [str(per_layer)]}), other)
    (back,) = warm_points(parse_warm({"recipes": [str(per_layer)]}), _genome(first))  # its own genome can
    assert back.label == "warm:trial/recipe" and set(back.params) == set(searched.params)


@pytest.mark.parametrize("cfg,needle", [
    ({"study": "x", "recipes": ["y"]}, "either {study"),
    ({"top": 3}, "either {study"),
    ({"study": "x", "top": 0}, "warm_start.top = 0"),
    ({"recipes": []}, "warm_start.recipes = []"),
    ({"study": "x", "typo": 1}, "either {study"),
])
def test_bad_warm_start_configs_name_the_key(cfg, needle):
    with pytest.raises(ConfigError) as err:
        parse_warm(cfg)
    assert needle in str(err.value)


def test_a_missing_study_or_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no study file"):
        warm_points(parse_warm({"study": str(tmp_path)}), genome=None)
    with pytest.raises(ConfigError, match="does not exist"):
        warm_points(parse_warm({"recipes": [str(tmp_path / "nope.yaml")]}), genome=type("G", (), {"setting": 1})())
    assert parse_warm(None) is None and warm_points(None, genome=None) == []
