"""Sample in memory, record on disk: Optuna's sampler without a database round trip per gene.

Why: with an RDB storage, every ``ask`` re-reads the running trials a few times
and writes each parameter in its own transaction: on SQLite, a sizeable part of
a tiny-zoo candidate's time went to bookkeeping (results/search_speed.md).

So the sampler and the pruner run on an in-memory study that mirrors the
persistent one, and the persistent study (the truth: resume, dashboard,
export, other workers) gets a handful of writes per trial: the new trial with
all its parameters and the sampler's system attributes in one transaction,
then its user attributes, its first-look value and its final state.

Enqueued trials (baselines, retries) live on disk and are claimed there with
Optuna's own atomic WAITING -> RUNNING transition, so two workers never run
the same one. When the storage is shared (heartbeats on), finished trials of
other workers are pulled into the mirror before each ask; a lone SQLite
worker only reads the disk at start-up.
"""
from __future__ import annotations

import datetime
from typing import Any, Callable, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from evomerge.search import record
from evomerge.search.optuna_io import storage_of, study_id, trial_id
from evomerge.search.storage import heartbeat_enabled

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class MirroredTrial:
    """One trial: the in-memory one the sampler made and its persistent twin."""

    def __init__(self, mirror: "Mirror", mem: optuna.Trial, disk_id: int, number: int, params: dict[str, Any],
                 user_attrs: dict[str, Any]) -> None:
        self.mirror, self.mem, self.disk_id, self.number = mirror, mem, disk_id, number
        self.params = params
        self.user_attrs = dict(user_attrs)
        self._last: float | None = None

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value
        self.mirror.storage.set_trial_user_attr(self.disk_id, key, value)

    def report(self, value: float, step: int) -> None:
        self.mem.report(value, step)
        self.mirror.storage.set_trial_intermediate_value(self.disk_id, step, value)
        self._last = value

    def should_prune(self) -> bool:
        return self.mem.should_prune()

    def finish(self, state: TrialState, values: Sequence[float] | None = None) -> None:
        """Tell both studies; a pruned trial's value is its last reported one, as in Optuna."""
        if state == TrialState.PRUNED:
            self.mirror.mem.tell(self.mem, state=state)
            values = None if self._last is None else [self._last]
        elif state == TrialState.COMPLETE:
            self.mirror.mem.tell(self.mem, list(values or []))
        else:
            self.mirror.mem.tell(self.mem, state=state)
            values = None
        self.mirror.storage.set_trial_state_values(self.disk_id, state, None if values is None else list(values))

    def frozen(self) -> FrozenTrial:
        return self.mirror.storage.get_trial(self.disk_id)


class Mirror:
    """``sampler_for(start)`` makes the sampler once the enqueued trials (baselines) are done, ``start`` being
    the parameters of the best finished baseline (None when there is none); until then a random sampler
    stands in, and is never consulted, since enqueued trials carry their parameters."""

    def __init__(self, study: optuna.Study, sampler_for: Callable[[dict[str, Any] | None], optuna.samplers.BaseSampler],
                 pruner: optuna.pruners.BasePruner) -> None:
        self.disk = study
        self.storage = storage_of(study)
        self.study_id = study_id(study)
        self.sampler_for = sampler_for
        self._sampler_ready = False
        self.mem = optuna.create_study(sampler=optuna.samplers.RandomSampler(), pruner=pruner,
                                       directions=study.directions)
        self.shared = heartbeat_enabled(self.storage)
        self._seen: set[int] = set()
        self._waiting: list[int] = []
        self.sync()

    def sync(self) -> None:
        """Copy finished disk trials the mirror has not seen, and note the disk's WAITING trials."""
        new: list[FrozenTrial] = []
        waiting: list[int] = []
        for t in self.disk.get_trials(deepcopy=False):
            if t.state == TrialState.WAITING:
                waiting.append(trial_id(t))
            elif t.state in FINISHED and trial_id(t) not in self._seen:
                new.append(t)
                self._seen.add(trial_id(t))
        self.mem.add_trials(new)
        self._waiting = waiting

    def _claim_waiting(self) -> FrozenTrial | None:
        while self._waiting:
            tid = self._waiting.pop(0)
            try:
                if self.storage.set_trial_state_values(tid, TrialState.RUNNING):
                    return self.storage.get_trial(tid)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker ran it already
        return None

    def _ask_mem(self, dists: dict[str, BaseDistribution] | Callable[[optuna.Trial], Any]) -> optuna.Trial:
        """A trial of the in-memory study: over fixed distributions, or define-by-run (``dists`` suggests)."""
        if callable(dists):
            mt = self.mem.ask()
            dists(mt)
            return mt
        return self.mem.ask(dists)

    def ask(self, dists: dict[str, BaseDistribution] | Callable[[optuna.Trial], Any]) -> MirroredTrial:
        if self.shared:
            self.sync()
        claimed = self._claim_waiting()
        if claimed is not None:
            fixed = record.enqueued_params(claimed) or {}
            self.mem.enqueue_trial(fixed, user_attrs=claimed.user_attrs, skip_if_exists=False)
            mt = self._ask_mem(dists)
            ft = storage_of(self.mem).get_trial(trial_id(mt))
            for name, value in ft.params.items():
                dist = ft.distributions[name]
                self.storage.set_trial_param(trial_id(claimed), name, dist.to_internal_repr(value), dist)
            for key, value in ft.system_attrs.items():
                if key != record.FIXED_PARAMS:
                    self.storage.set_trial_system_attr(trial_id(claimed), key, value)
            disk_id, number, attrs = trial_id(claimed), claimed.number, claimed.user_attrs
        else:
            if not self._sampler_ready:
                self.mem.sampler = self.sampler_for(self._best_baseline())
                self._sampler_ready = True
            mt = self._ask_mem(dists)
            ft = storage_of(self.mem).get_trial(trial_id(mt))
            template = FrozenTrial(
                number=0, state=TrialState.RUNNING, value=None, datetime_start=datetime.datetime.now(),
                datetime_complete=None, params=ft.params, distributions=ft.distributions, user_attrs={},
                system_attrs=ft.system_attrs, intermediate_values={}, trial_id=0,
            )
            disk_id = self.storage.create_new_trial(self.study_id, template_trial=template)
            number, attrs = self.storage.get_trial_number_from_id(disk_id), {}
        self._seen.add(disk_id)
        return MirroredTrial(self, mt, disk_id, number, dict(ft.params), attrs)

    def _best_baseline(self) -> dict[str, Any] | None:
        done = [t for t in self.mem.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if record.baseline_of(t) and t.values]
        if not done or len(self.mem.directions) != 1:
            return None
        return dict(max(done, key=lambda t: t.values[0]).params)

    def best_value(self) -> float | None:
        if len(self.mem.directions) != 1:
            return None
        try:
            return self.mem.best_value
        except ValueError:
            return None
