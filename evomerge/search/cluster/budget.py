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

import copy
import time
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from evomerge.search import driver
from evomerge.search.optuna_io import storage_of, trial_id
from evomerge.search.storage import heartbeat_enabled

WORKER_ATTR = "worker"  # trial user attribute: the worker that runs (ran) it


class BudgetMet(Exception):
    """The study has its ``n_trials`` finished trials."""


class NoSlot(Exception):
    """Every remaining place in the budget is taken by a running trial: wait for one to end or die."""


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
    """Wraps the search's Mirror: ``ask`` starts a trial only when the budget has room for it."""

    def __init__(self, inner: Any, study: optuna.Study, mutex: Any, n_trials: int, worker: str) -> None:
        self.inner, self.study, self.mutex, self.n_trials, self.worker = inner, study, mutex, n_trials, worker
        self.storage = storage_of(study)  # heartbeats and state changes go through Optuna's cache
        self.heartbeats = heartbeat_enabled(self.storage)
        self.ran: list[int] = []
        self.last = Tally(0, 0, 0)
        self.healed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def look(self) -> Tally:
        """Fail dead workers' trials, retry them, and count (call with the mutex held)."""
        optuna.storages.fail_stale_trials(self.study)
        trials = self.study.get_trials(deepcopy=False)
        if self._heal(trials):
            trials = self.study.get_trials(deepcopy=False)
        self.last = tally(trials)
        return self.last

    def ask(self, dists: dict[str, BaseDistribution]) -> Any:
        with self.mutex:
            t = self.look()
            if t.finished >= self.n_trials:
                raise BudgetMet
            if t.finished + t.running >= self.n_trials:
                raise NoSlot
            trial = self.inner.ask(dists)
            if self.heartbeats:
                self.storage.record_heartbeat(trial.disk_id)
            trial.set_user_attr(WORKER_ATTR, self.worker)  # last: marks the trial as properly started
        self.ran.append(trial.number)
        return trial

    def _heal(self, trials: list[FrozenTrial]) -> bool:
        retried = driver.retry_of(trials)
        healed = False
        for t in trials:
            if t.state == TrialState.RUNNING and WORKER_ATTR not in t.user_attrs:
                # its worker died between taking the trial and marking it started
                _retry(self.study, t)
                self.storage.set_trial_user_attr(trial_id(t), "fail_reason",
                                                 "its worker died as the trial started; retried")
                self.storage.set_trial_state_values(trial_id(t), TrialState.FAIL)
                healed = True
            elif t.state == TrialState.FAIL and t.number not in retried and "fail_reason" not in t.user_attrs:
                # failed as stale by a worker that died before it could enqueue the retry
                _retry(self.study, t)
                healed = True
        self.healed += healed
        return healed


def _retry(study: optuna.Study, t: FrozenTrial) -> None:
    """Retry ``t`` with the parameters it was meant to run: an enqueued trial's fixed ones when it has them."""
    fixed = t.system_attrs.get("fixed_params")
    if fixed is not None:
        t = copy.copy(t)
        t.params = dict(fixed)
    driver.retry_trial(study, t)


class ClusterLoop(driver.SearchLoop):
    """The search loop of one worker: trials through the gate until the study-wide budget is met."""

    def __init__(self, *args: Any, mutex: Any, worker: str, poll_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = Gate(self.mirror, self.study, mutex, self.n_trials, worker)
        self.mirror = self.gate  # type: ignore[assignment] - SearchLoop._one_trial asks through the gate
        self.poll_s = poll_s
        self.taken_over: list[int] = []

    def run(self) -> driver.LoopStats:
        bar = tqdm(total=self.n_trials, desc="search (study-wide)", unit="trial", disable=not self.progress,
                   dynamic_ncols=True)
        failures = driver.FailureStreak(" on this worker")
        try:
            while True:
                try:
                    state, reason = self._one_trial()
                except BudgetMet:
                    break
                except NoSlot:
                    self._sync_bar(bar)
                    time.sleep(self.poll_s)
                    continue
                except optuna.exceptions.UpdateFinishedTrialError:
                    # another worker failed this trial as stale (this worker's heartbeat was late); its retry runs it
                    number = self.gate.ran[-1]
                    self.taken_over.append(number)
                    tqdm.write(f"trial {number} was failed by another worker (missed heartbeats); its retry will run it.")
                    continue
                failures.record(state, reason)
                self._sync_bar(bar)
                self._postfix(bar)
        except KeyboardInterrupt:
            self.stats.interrupted = True
        finally:
            bar.close()
        return self.stats

    def _sync_bar(self, bar: tqdm) -> None:
        bar.n = min(self.gate.last.finished, self.n_trials)
        bar.refresh()
