"""Where a trial's search items go: looks in steps (successive halving) and fresh samples per generation.

The real :class:`~evomerge.search.fitness.Scorer` and the real loop, over a stand-in for lm-eval whose tasks
aggregate by mean and whose items a candidate answers right when the item's fixed difficulty is below the
candidate's first weight (fast: no lm-eval run, no zoo). What is tested is where items go and what is
recorded, not what a search finds.
"""
from __future__ import annotations

import random

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.search import driver, record
from evomerge.search.estimators import Irt, Paired, calibrate
from evomerge.search.fitness import Scorer, TaskSpec
from evomerge.search.spec import parse_search
from search_factory import TIES, family, genome  # noqa: F401  (family is a fixture)

SIZES = {"a": 80, "b": 60}


class _Task:
    def __init__(self, n: int) -> None:
        self.eval_docs = list(range(n))

    def aggregation(self):
        from lm_eval.api.metrics import mean

        return {"acc": mean}


class _Timing:
    seconds = 0.001


class _Engine:
    model = object()
    weight = 0.5

    def apply(self, recipe):
        w = recipe.models[0].parameters["weight"]
        self.weight = float(w[0] if isinstance(w, list) else w)
        return _Timing()


class _Items:
    """lm-eval's surface as the Scorer uses it. ``log``: every (task, item) scored, in order."""

    def __init__(self, engine: _Engine) -> None:
        self.engine, self.log = engine, []
        rng = random.Random(0)
        self.difficulty = {t: [rng.random() for _ in range(n)] for t, n in SIZES.items()}

    def task_dict(self, split):
        return {"tasks": {t: _Task(n) for t, n in SIZES.items()}}

    def evaluate(self, model, split, limit=None, samples=None):
        out = {}
        for t, ix in samples.items():
            self.log += [(t, i) for i in ix]
            out[t] = {"acc": sum(self.difficulty[t][i] < self.engine.weight for i in ix) / len(ix)}
        return out

    def per_item(self, model, split, samples=None):
        items = samples or {t: range(n) for t, n in SIZES.items()}
        if samples is not None:
            self.log += [(t, i) for t, ix in samples.items() for i in ix]
        return {t: {"acc": {i: float(self.difficulty[t][i] < self.engine.weight) for i in ix}} for t, ix in items.items()}


def _scorer(engine=None):
    engine = engine or _Engine()
    spec = TaskSpec(name="x", tasks={t: {"acc": 1.0} for t in SIZES})
    return Scorer(_Items(engine), spec, ["fitness"]), engine


# ---- the scorer: a look in steps, a fresh sample ----------------------------------------------
def test_a_look_scored_in_steps_is_the_look_scored_at_once_and_no_item_twice():
    scorer, engine = _scorer()
    whole = scorer.extend(engine.model, "search", scorer.look("search", 0.5))
    scorer.evaluator.log.clear()
    look = scorer.look("search", 0.5)
    fits = [scorer.extend(engine.model, "search", look, upto).fitness for upto in (0.125, 0.25, 0.5, None)]
    assert fits[-1] == pytest.approx(whole.fitness)
    log = scorer.evaluator.log
    assert len(log) == len(set(log)) == look.scored == 40 + 30  # half of each task, each item once
    assert look.done == {"a": 40, "b": 30}
    assert scorer.extend(engine.model, "search", look).fitness == pytest.approx(whole.fitness)  # nothing left to score
    assert len(scorer.evaluator.log) == 70


def test_the_default_look_is_the_first_items_and_a_fresh_sample_is_drawn_from_the_whole_split():
    scorer, _ = _scorer()
    assert scorer.look("search", 0.25).items == {"a": list(range(20)), "b": list(range(15))}
    s1, again, s2 = (scorer.look("search", 0.25, sample=k, seed=3).items for k in (1, 1, 2))
    assert s1 == again  # every trial (on any worker) of one sample scores the same items
    assert s1 != s2 and s1 != scorer.look("search", 0.25, sample=1, seed=4).items
    for t, n in SIZES.items():
        assert len(s1[t]) == len(set(s1[t])) == {"a": 20, "b": 15}[t] and set(s1[t]) <= set(range(n))
        assert s1[t] != sorted(s1[t])  # random order: a step's items are a random part of the sample
    many = set()
    for k in range(8):
        many |= set(scorer.look("search", 0.25, sample=k).items["a"])
    assert len(many) > 60  # the samples cover the split


def test_a_paired_estimate_puts_any_sample_on_the_whole_splits_scale():
    scorer, engine = _scorer()
    engine.weight = 0.6
    ref = scorer.reference(engine.model, "search", "textbook")
    assert ref.label == "textbook" and [len(ref.items[t]["acc"]) for t in SIZES] == [80, 60]
    whole = {t: sum(v) / len(v) for t, v in ((t, ref.items[t]["acc"]) for t in SIZES)}
    for sample in range(4):  # the reference itself: every step of every sample is its whole-split score, exactly
        look = scorer.look("search", 0.25, sample=sample, estimator=Paired(ref))
        for upto in (0.5, None):
            est = scorer.extend(engine.model, "search", look, upto)
            assert est.fitness == pytest.approx(sum(whole.values()) / 2, abs=1e-12)
    engine.weight = 0.62  # a candidate near the reference: the paired estimate varies less between samples
    raw, paired = [], []
    for sample in range(12):
        raw.append(scorer.extend(engine.model, "search", scorer.look("search", 0.25, sample=sample)).fitness)
        paired.append(scorer.extend(engine.model, "search",
                                    scorer.look("search", 0.25, sample=sample, estimator=Paired(ref))).fitness)
    truth = sum(sum(d < 0.62 for d in scorer.evaluator.difficulty[t]) / n for t, n in SIZES.items()) / 2
    spread = lambda xs: sum((x - truth) ** 2 for x in xs) / len(xs)  # noqa: E731
    assert spread(paired) < spread(raw) / 3


def _calibration(scorer, engine, weights=(0.2, 0.35, 0.5, 0.65, 0.8)):
    refs = []
    for w in weights:  # baselines across the range the candidates span
        engine.weight = w
        refs.append(scorer.reference(engine.model, "search", f"w{w}"))
    return calibrate(refs)


def test_an_irt_look_scores_each_item_once_and_estimates_the_whole_split_better_than_its_mean():
    scorer, engine = _scorer()
    irt = Irt(_calibration(scorer, engine))
    engine.weight = 0.57  # a candidate between the baselines
    scorer.evaluator.log.clear()
    look = scorer.look("search", 0.25, sample=0, estimator=irt)
    steps = [scorer.extend(engine.model, "search", look, upto) for upto in (0.5, None)]
    assert len(scorer.evaluator.log) == len(set(scorer.evaluator.log)) == look.scored == 20 + 15
    assert {t: len(look.values[t]["acc"]) for t in SIZES} == {"a": 20, "b": 15}  # each scored item's value, kept
    assert [look.metrics[t]["acc"] for t in SIZES] == [sum(look.values[t]["acc"]) / n for t, n in (("a", 20), ("b", 15))]
    whole = scorer.look("search", None, estimator=irt)
    assert scorer.extend(engine.model, "search", whole).fitness == pytest.approx(
        scorer.extend(engine.model, "search", scorer.look("search", None)).fitness, abs=1e-12)  # all items: the mean
    truth = sum(sum(d < 0.57 for d in scorer.evaluator.difficulty[t]) / n for t, n in SIZES.items()) / 2
    raw = [scorer.extend(engine.model, "search", scorer.look("search", 0.25, sample=k)).fitness for k in range(12)]
    est = [scorer.extend(engine.model, "search", scorer.look("search", 0.25, sample=k, estimator=irt)).fitness
           for k in range(12)]
    err = lambda xs: sum((x - truth) ** 2 for x in xs) / len(xs)  # noqa: E731
    assert err(est) < err(raw) / 3 and steps[-1].fitness == est[0]


# ---- the loop ---------------------------------------------------------------------------------
def _loop(family, n_trials, looks=(), fresh_items=None, keep=50.0, reference=False, estimator=None, scorer=None):
    g = genome(family, layers_per_group="global")
    scorer, engine = scorer or _scorer()
    study = optuna.create_study(direction="maximize")
    driver.enqueue_baselines(study, g.baselines())
    pruner = optuna.pruners.PercentilePruner(keep, n_startup_trials=3) if looks else optuna.pruners.NopPruner()
    if reference:
        estimator = Paired(scorer.reference(engine.model, "search", "textbook"))
    loop = driver.SearchLoop(study, lambda start: optuna.samplers.RandomSampler(seed=0), pruner, g, engine, scorer,
                             n_trials=n_trials, limit=0.5, looks=looks, fresh_items=fresh_items, seed=0,
                             estimator=estimator, fresh_seeds=False, progress=False)
    loop.run()
    return study, scorer


def test_successive_halving_stops_trials_at_every_step_and_records_what_each_cost(family):
    looks = (0.125, 0.25, 0.5)
    study, scorer = _loop(family, 40, looks=looks)
    trials = study.get_trials()
    whole = 40 + 30
    at_step = [5 + 4, 10 + 8, 20 + 15]  # items per task at each step: a fraction of 40 and 30, rounded up
    stopped = {k: 0 for k in range(len(looks))}
    for t in trials:
        rec = record.TrialRecord.of(t)
        if rec.baseline:  # baselines are scored whole, at once
            assert t.state == TrialState.COMPLETE and not t.intermediate_values and rec.items == whole
        elif t.state == TrialState.COMPLETE:
            assert sorted(t.intermediate_values) == [0, 1, 2] and rec.items == whole
        else:
            assert t.state == TrialState.PRUNED
            *steps, estimate = sorted(t.intermediate_values)
            assert steps == list(range(len(steps))) and estimate == len(looks)  # reports 0..k, then the estimate
            assert rec.items == at_step[len(steps) - 1]
            assert rec.fitness == t.value == t.intermediate_values[estimate]
            assert rec.first_look == t.intermediate_values[0]
            stopped[len(steps) - 1] += 1
    assert all(stopped[k] for k in (0, 1)), stopped  # trials stopped after the first and a later step
    spent = sum(record.TrialRecord.of(t).items for t in trials)
    assert spent == len(scorer.evaluator.log) < len(trials) * whole  # what the log says was scored, and a saving


def test_fresh_items_give_each_generation_its_own_sample(family):
    study, scorer = _loop(family, 20, fresh_items=5)
    seen: dict[int, set] = {}
    for t in study.get_trials():
        rec = record.TrialRecord.of(t)
        assert rec.sample == t.number // 5 and rec.items == 70
        seen.setdefault(rec.sample, set())
    assert sorted(seen) == [0, 1, 2, 3]
    assert len(set(scorer.evaluator.log)) > 100  # of 140: later generations scored items the first never saw
    study, _ = _loop(family, 8)
    assert all(record.TrialRecord.of(t).sample is None for t in study.get_trials())  # default: no sample recorded


def test_the_loop_tells_the_sampler_the_paired_estimate(family):
    """The reference is the engine's state before the loop (weight 0.5): a trial at that weight is told the
    reference's whole-split score whatever its sample."""
    study, scorer = _loop(family, 12, fresh_items=3, reference=True)
    difficulty = scorer.evaluator.difficulty
    for t in study.get_trials():
        w = genome(family, layers_per_group="global").recipe(t.params, seed=0).models[0].parameters["weight"]
        w = float(w[0] if isinstance(w, list) else w)
        ref = sum(sum(d < 0.5 for d in difficulty[k]) / n for k, n in SIZES.items()) / 2
        truth = sum(sum(d < w for d in difficulty[k]) / n for k, n in SIZES.items()) / 2
        assert abs(t.value - truth) <= abs(t.value - ref) + 0.2  # an estimate of the candidate, not the reference


def test_the_loop_scores_an_irt_look_item_by_item_and_no_item_twice(family):
    scorer, engine = _scorer()
    irt = Irt(_calibration(scorer, engine))
    scorer.evaluator.log.clear()
    study, scorer = _loop(family, 16, looks=(0.25, 0.5), fresh_items=4, estimator=irt, scorer=(scorer, engine))
    spent = sum(record.TrialRecord.of(t).items for t in study.get_trials())
    assert spent == len(scorer.evaluator.log) and all(0.0 <= t.value <= 1.0 for t in study.get_trials())


# ---- the config -------------------------------------------------------------------------------
def test_looks_and_fresh_items_are_read_once():
    spec = parse_search({**TIES, "pruning": {"first_look": [0.125, 0.25, 0.5], "keep": 50}, "fresh_items": 15,
                         "limit": 0.5})
    assert spec.pruning.looks == (0.125, 0.25, 0.5) and spec.pruning.first_look == 0.125 and spec.fresh_items == 15
    assert parse_search({**TIES, "pruning": {"first_look": 0.25}}).pruning.looks == (0.25,)
    assert parse_search(TIES).fresh_items is None and parse_search(TIES).estimator == "mean"
    assert parse_search({**TIES, "estimator": "paired"}).estimator == "paired"


@pytest.mark.parametrize("over,match", [
    ({"pruning": {"first_look": [0.5, 0.25]}}, r"search.pruning.first_look = \[0.5, 0.25\].*rising"),
    ({"pruning": {"first_look": [0.25, 40]}}, r"all of one kind"),
    ({"pruning": {"first_look": []}}, r"search.pruning.first_look"),
    ({"pruning": {"first_look": 0}}, r"search.pruning.first_look"),
    ({"pruning": {"startup_trials": -1}}, r"search.pruning.startup_trials"),
    ({"fresh_items": 0, "limit": 0.5}, r"search.fresh_items = 0"),
    ({"fresh_items": 5, "limit": None}, r"search.limit is null"),
    ({"estimator": "median"}, r"search.estimator = 'median': use 'mean'"),
])
def test_bad_item_settings_name_the_key(over, match):
    with pytest.raises(ConfigError, match=match):
        parse_search({**TIES, **over})


def test_fresh_items_over_a_limit_that_takes_every_item_are_refused_before_the_study():
    from evomerge.search.preflight import check_items

    scorer, _ = _scorer()
    assert check_items(scorer, 5, 0.5, "mean") == []
    (problem,) = check_items(scorer, 5, 100, "mean")
    assert "search.fresh_items = 5" in problem and "a: 80, b: 60" in problem


# ---- the whole app on the tiny zoo ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["paired", "irt"])
def test_a_search_in_steps_over_fresh_samples_runs_end_to_end_and_records_its_items(tiny_zoo, tmp_path, estimator):
    """The real console app, real lm-eval tasks: successive halving over fresh samples, then the usual final
    choice; the study and trials.csv say which items each trial scored and how many."""
    import csv
    import json
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge.run.app", "+search=ties_math", "search.n_trials=14", "search.limit=40",
         "search.pruning.first_look=[0.25,0.5]", "search.pruning.keep=50", "search.pruning.startup_trials=2",
         "search.fresh_items=4", f"search.estimator={estimator}", "search.layers_per_group=global", "sampler=random", "progress=false",
         "final.top_k=1", "final.export_model=false", "final.score_cache=null", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{run_dir / 'study.db'}")
    recs = [record.TrialRecord.of(t) for t in study.get_trials()]
    n_tasks = len(json.loads((run_dir / "splits.json").read_text())["tasks"])
    assert len(recs) == 14 and all(r.sample == r.number // 4 for r in recs)
    whole = 40 * n_tasks
    assert all(r.items == whole for r in recs if r.state == TrialState.COMPLETE)
    pruned = [r for r in recs if r.state == TrialState.PRUNED]
    assert pruned and all(r.items in (10 * n_tasks, 20 * n_tasks) for r in pruned)
    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert [int(r["items"]) for r in rows] == [r.items for r in recs]
    assert [int(r["sample"]) for r in rows] == [r.sample for r in recs]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["test_fitness"] is not None and summary["trials"]["PRUNED"] == len(pruned)
    sizes = {t: rec["search"]["n"] for t, rec in json.loads((run_dir / "splits.json").read_text())["tasks"].items()}
    textbook = summary["baselines"]["textbook"]
    if estimator == "irt":  # every baseline scored on every search item once, the items' difficulties kept
        cal = record.calibration_of(study)
        assert set(cal.labels) == set(summary["baselines"]) and record.reference_of(study) is None
        assert {t: len(ms["acc"]) for t, ms in cal.difficulty.items()} == sizes
        assert textbook["search_fitness"] == pytest.approx(textbook["search_full_fitness"], abs=0.05)
        return
    # the paired estimate: the reference (textbook) scored on every search item once, kept in the study; told
    # to the sampler on its 40-item sample, it is its score over every search item, as the final step measured
    ref = record.reference_of(study)
    assert ref.label == "textbook" and {t: len(ms["acc"]) for t, ms in ref.items.items()} == sizes
    assert textbook["search_fitness"] == pytest.approx(textbook["search_full_fitness"], abs=1e-9)
