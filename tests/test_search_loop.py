"""The search loop and its budget bookkeeping, with stand-ins for the engine and the evaluator (fast: no lm-eval, no zoo)."""
from __future__ import annotations


import optuna
import pytest
from optuna.trial import TrialState

from evomerge.search import driver
from search_factory import ConstantScorer, family, genome  # noqa: F401  (family is a fixture)

# ---- budget and resume bookkeeping (in-memory Optuna, no models) -----------------------------
def test_budget_counts_retries_once():
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    driver.enqueue_baselines(study, {"a": {"x": 0.0}, "b": {"x": 1.0}})
    driver.enqueue_baselines(study, {"a": {"x": 0.0}, "b": {"x": 1.0}})  # idempotent
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2
    t = study.ask(dist)
    study.tell(t, 0.5)
    t2 = study.ask(dist)  # "dies" while running
    assert driver.take_over_dead_trials(study) == 1
    assert driver.take_over_dead_trials(study) == 0
    trials = study.get_trials()
    assert trials[t2.number].state == TrialState.FAIL
    retry = [x for x in trials if x.user_attrs.get("retry_of") == t2.number]
    assert len(retry) == 1 and retry[0].params == {} and retry[0].user_attrs["baseline"] == "b"
    assert driver.count_finished(study) == 1  # the retried FAIL does not count
    t3 = study.ask(dist)
    assert t3.params == {"x": 1.0} and t3.user_attrs["retry_of"] == t2.number
    study.tell(t3, state=TrialState.FAIL)  # a candidate failure counts
    assert driver.count_finished(study) == 2



def test_a_baseline_that_died_before_it_had_its_parameters_is_retried_with_them():
    """A process can die after claiming an enqueued trial (WAITING -> RUNNING) and before the mirror copied its
    parameters to it: the retry must run the baseline's own parameters, not the few (or none) the dead trial had."""
    from evomerge.search.optuna_io import storage_of, trial_id

    study = optuna.create_study(direction="maximize")
    driver.enqueue_baselines(study, {"a": {"x": 0.25, "y": 0.75}})
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert storage_of(study).set_trial_state_values(trial_id(waiting), TrialState.RUNNING)  # claimed, then died
    assert study.get_trials()[0].params == {}
    assert driver.take_over_dead_trials(study) == 1
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.user_attrs == {"baseline": "a", "retry_of": 0}
    dist = {"x": optuna.distributions.FloatDistribution(0, 1), "y": optuna.distributions.FloatDistribution(0, 1)}
    assert study.ask(dist).params == {"x": 0.25, "y": 0.75}


# ---- the search loop with stand-ins for the engine and the evaluator (fast, no lm-eval) -------
class _Timing:
    seconds = 0.001


class _Engine:
    """Fails (like a NaN merge) when the first model's first weight gene is below ``fail_below``."""

    def __init__(self, fail_below: float = -1.0, interrupt_at: int | None = None) -> None:
        self.model, self.fail_below, self.interrupt_at, self.calls = object(), fail_below, interrupt_at, 0

    def apply(self, recipe):
        from evomerge.errors import MergeError

        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        w = recipe.models[0].parameters["weight"]
        if (w[0] if isinstance(w, list) else w) < self.fail_below:
            raise MergeError("merging tensor 'x' produced NaN or infinite values")
        self.last = recipe
        return _Timing()


class _EasyFirstItems(ConstantScorer):
    """A two-stage scorer whose first look scores every candidate ``bias`` above its whole look (the first
    items of a task are easier), the whole look being the first model's weight."""

    def __init__(self, engine: _Engine, bias: float) -> None:
        self.engine, self.bias = engine, bias

    def _score(self, fitness: float):
        from evomerge.search.fitness import Score

        return Score(values=[fitness], fitness=fitness, metrics={"t": {"acc": fitness}}, seconds=0.001)

    def _whole(self) -> float:
        w = self.engine.last.models[0].parameters["weight"]
        return float(w[0] if isinstance(w, list) else w)

    def score(self, model, split, limit):
        return self._score(self._whole())

    def can_split(self, split):
        return True

    def look(self, split, limit, sample=None, seed=0, estimator=None):
        return None

    def extend(self, model, split, look, upto=None):
        return self._score(self._whole() + (self.bias if upto is not None else 0.0))


def _loop(family, engine, n_trials, storage=None, scorer=None, pruner=None):
    g = genome(family, layers_per_group="global")
    study = optuna.create_study(direction="maximize", storage=storage)
    driver.enqueue_baselines(study, g.baselines())
    loop = driver.SearchLoop(study, lambda start: optuna.samplers.RandomSampler(seed=0),
                             pruner or optuna.pruners.NopPruner(), g, engine, scorer or ConstantScorer(), n_trials=n_trials,
                             limit=None, looks=(0.25,) if pruner else (),
                             seed=0, fresh_seeds=False, progress=False)
    return study, loop


def test_a_pruned_trial_tells_the_sampler_its_first_look_on_the_whole_looks_scale(family):
    """Told its raw first look, a pruned candidate would outrank every kept one whenever the first items are
    easier (on the smol zoo by 0.07), and CMA-ES would walk towards what the pruner rejected."""
    engine = _Engine()
    study, loop = _loop(family, engine, n_trials=30, scorer=_EasyFirstItems(engine, bias=0.3),
                        pruner=optuna.pruners.PercentilePruner(50.0, n_startup_trials=3))
    loop.run()
    g = genome(family, layers_per_group="global")
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert len(pruned) >= 5
    for t in pruned:
        whole = g.recipe(t.params, seed=0).models[0].parameters["weight"]
        whole = whole[0] if isinstance(whole, list) else whole
        assert t.intermediate_values[0] == pytest.approx(whole + 0.3)  # the pruner compares raw first looks
        assert t.value == t.intermediate_values[1] == pytest.approx(whole)  # what samplers read
        assert t.user_attrs["fitness"] == pytest.approx(whole) and t.user_attrs["first_fitness"] == pytest.approx(whole + 0.3)
    kept = [t.value for t in study.get_trials() if t.state == TrialState.COMPLETE and not t.user_attrs.get("baseline")]
    assert max(t.value for t in pruned) < max(kept)


def test_failed_candidates_are_recorded_and_the_search_goes_on(family):
    study, loop = _loop(family, _Engine(fail_below=0.3), n_trials=12)
    loop.run()
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all("NaN" in t.user_attrs["fail_reason"] for t in failed)
    assert driver.count_finished(study) == 12 and len(trials) == 12
    assert [t.user_attrs.get("baseline") for t in trials[:4]] == ["alone:m0", "alone:m1", "alone:m2", "textbook"]


def test_many_failures_in_a_row_stop_with_the_reason(family):
    from evomerge.errors import EvomergeError

    study, loop = _loop(family, _Engine(fail_below=2.0), n_trials=20)
    with pytest.raises(EvomergeError, match="5 candidates in a row failed.*NaN"):
        loop.run()


def test_ctrl_c_marks_the_trial_and_queues_its_retry(family, tmp_path):
    study, loop = _loop(family, _Engine(interrupt_at=6), n_trials=10, storage=f"sqlite:///{tmp_path / 's.db'}")
    stats = loop.run()
    assert stats.interrupted
    trials = study.get_trials()
    dead = trials[5]
    assert dead.state == TrialState.FAIL and "interrupted" in dead.user_attrs["fail_reason"]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == 5
    assert driver.count_finished(study) == 5
    # resuming runs the retry first, with the dead trial's parameters, and ends at exactly the budget
    g = genome(family, layers_per_group="global")
    loop2 = driver.SearchLoop(study, lambda start: optuna.samplers.RandomSampler(seed=1), optuna.pruners.NopPruner(),
                              g, _Engine(), ConstantScorer(), n_trials=10, limit=None,
                              seed=0, fresh_seeds=False, progress=False)
    loop2.run()
    trials = study.get_trials()
    retried = [t for t in trials if t.user_attrs.get("retry_of") == 5]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and retried[0].params == dead.params
    assert driver.count_finished(study) == 10
