"""An exact study-wide budget for many workers: the gate every trial passes through.

The rule, checked under the study mutex before a worker starts any trial::

    finished >= n_trials            -> the budget is met: stop
    finished + running >= n_trials  -> nothing to start now: wait and look again
    otherwise                       -> start one (a WAITING baseline or retry first, else a new trial)

``finished`` counts COMPLETE, PRUNED and FAIL-without-retry (as the single
worker driver does), ``running`` every RUNNING trial. Outside the mutex a
trial only ever moves from RUNNING to finished, or to FAIL with a WAITING
retry, so ``finished + running`` never grows except through the gate and can
never pass ``n_trials``: the study ends with exactly ``n_trials`` finished
trials however many workers race, and a worker stops only when they are all
there. Dead workers cannot stall it: their trials are failed by heartbeat,
retried with the same parameters, and the retry inherits the dead trial's
place in the budget.

Why a trial that never got its first heartbeat can be failed safely: a worker
writes the first heartbeat and then its ``worker`` attribute before it lets go
of the mutex, so a RUNNING trial without that attribute, seen by a worker that
holds the mutex, belongs to a worker that died inside its critical section.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from evomerge.search import driver, record
from evomerge.search.driver import BudgetMet, NoSlot
from evomerge.search.mirror import Mirror, MirroredTrial
from evomerge.search.optuna_io import storage_of, trial_id
from evomerge.search.storage import heartbeat_enabled


@dataclass(frozen=True)
class Tally:
    finished: int
    running: int
    waiting: int


def tally(trials: list[FrozenTrial]) -> Tally:
    retried = driver.retry_of(trials)
    return Tally(finished=sum(driver.is_finished(t, retried) for t in trials),
                 running=sum(t.state == TrialState.RUNNING for t in trials),
                 waiting=sum(t.state == TrialState.WAITING for t in trials))


class Gate:
    """The study-wide budget (a :class:`~evomerge.search.driver.Budget`): a trial starts only when the budget
    has room for it, decided under the study mutex."""

    label, where = "search (study-wide)", " on this worker"

    def __init__(self, study: optuna.Study, mutex: Any, n_trials: int, worker: str, poll_s: float) -> None:
        self.study, self.mutex, self.n_trials, self.worker, self.poll_s = study, mutex, n_trials, worker, poll_s
        self.storage = storage_of(study)  # heartbeats and state changes go through Optuna's cache
        self.heartbeats = heartbeat_enabled(self.storage)
        self.last = tally(study.get_trials(deepcopy=False))
        self.healed = 0

    def finished(self) -> int:
        return self.last.finished

    def ended(self, state: TrialState) -> None:
        pass  # counted again under the mutex before the next trial

    def look(self) -> Tally:
        """Fail dead workers' trials, retry them, and count (call with the mutex held)."""
        optuna.storages.fail_stale_trials(self.study)
        trials = self.study.get_trials(deepcopy=False)
        if self._heal(trials):
            trials = self.study.get_trials(deepcopy=False)
        self.last = tally(trials)
        return self.last

    def take(self, mirror: Mirror, dists: dict[str, BaseDistribution]) -> MirroredTrial:
        with self.mutex:
            t = self.look()
            if t.finished >= self.n_trials:
                raise BudgetMet
            if t.finished + t.running >= self.n_trials:
                raise NoSlot
            trial = mirror.ask(dists)
            if self.heartbeats:
                self.storage.record_heartbeat(trial.disk_id)
            trial.set_user_attr(record.WORKER, self.worker)  # last: marks the trial as properly started
        return trial

    def _heal(self, trials: list[FrozenTrial]) -> bool:
        retried = driver.retry_of(trials)
        healed = False
        for t in trials:
            if t.state == TrialState.RUNNING and record.worker_of(t) is None:
                # its worker died between taking the trial and marking it started
                driver.retry_trial(self.study, t)
                self.storage.set_trial_user_attr(trial_id(t), record.FAIL_REASON,
                                                 "its worker died as the trial started; retried")
                self.storage.set_trial_state_values(trial_id(t), TrialState.FAIL)
                healed = True
            elif t.state == TrialState.FAIL and t.number not in retried and record.fail_reason_of(t) is None:
                # failed as stale by a worker that died before it could enqueue the retry
                driver.retry_trial(self.study, t)
                healed = True
        self.healed += healed
        return healed
