"""What a search process shares with others: the coordination the one search session plugs in.

A search is the same path whether one process runs it or many workers share its study
(run/session.py); what differs is stated once, here, as the :class:`Coordination` a session is given:

* the **session lock**: a study file another search holds is refused (one process), or shared by the
  workers of one sweep;
* the **storage**: the run folder's own, or a shared one with heartbeats, so dead workers are found;
* the **setup lock**: checking the search space and enqueuing the baselines happens once per study;
* the **sampler seed**: with one seed every worker would propose the same candidates;
* the **budget** (search/driver.py's :class:`~evomerge.search.driver.Budget`): this process counts its own
  trials, or every trial passes the study-wide gate (search/cluster/budget.py);
* the **export claim**: one process re-scores the winners and exports them.

:class:`Local` is the single process; the cluster worker's is ``Shared`` in run/cluster.py.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import optuna

from evomerge.search import driver
from evomerge.search.config import RunConfig
from evomerge.search.storage import make_storage, session_lock


@dataclass
class Outcome:
    """What this process did in the study: the trials it started, those failed under it by another worker
    (its heartbeat was late), whether it was interrupted, and whether it did the final export."""

    ran: list[int] = field(default_factory=list)
    taken_over: list[int] = field(default_factory=list)
    interrupted: bool = False
    exported: bool = False


class Coordination(Protocol):
    out_dir: Path  # where best/, summary.json and report.md go

    def session_lock(self, study_name: str) -> AbstractContextManager[object]:
        """Held for the whole session: another process on the same study file is refused, or joins as a worker."""

    def open_storage(self) -> optuna.storages.BaseStorage: ...

    def setup_lock(self, storage: optuna.storages.BaseStorage, study_name: str) -> AbstractContextManager[object]:
        """Held while the study is checked and its baselines enqueued: each baseline once per study."""

    def device(self, name: str) -> str:
        """The device this process scores on (``device=auto``: a worker's own GPU)."""

    def sampler_seed(self, seed: int) -> int:
        """The sampler's seed (the DARE/DELLA mask seed stays the study's ``seed``)."""

    def begin(self, study: optuna.Study, n_trials: int) -> None:
        """The study is open and set up (called under the setup lock): recover, record, say where it stands."""

    def budget(self, study: optuna.Study, n_trials: int) -> driver.Budget: ...

    def export(self, study: optuna.Study, outcome: Outcome, n_trials: int) -> AbstractContextManager[bool]:
        """Whether this process does the final evaluation and export (True inside: it does, and holds the
        claim while it works)."""

    def finish(self, study: optuna.Study, summary: dict[str, Any] | None, outcome: Outcome,
               timings: dict[str, Any]) -> dict[str, Any]:
        """What the session returns: the summary, or (a worker that did not export) its record."""

    def summary_keys(self, study: optuna.Study) -> dict[str, Any]:
        """Keys this coordination adds to summary.json."""


class Local:
    """One process owns the study: an exclusive session lock on a file storage, no setup lock (the session
    lock already excludes every other process), the study's own sampler seed, a budget counted by this
    process, and the export always its own (also after Ctrl-C: the best so far)."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        self.storage_cfg, self.out_dir = config.storage.mapping(), run_dir

    def session_lock(self, study_name: str) -> AbstractContextManager[object]:
        return session_lock(self.storage_cfg, self.out_dir, study_name, shared=False)

    def open_storage(self) -> optuna.storages.BaseStorage:
        return make_storage(self.storage_cfg, self.out_dir, driver.retry_trial)

    def setup_lock(self, storage: optuna.storages.BaseStorage, study_name: str) -> AbstractContextManager[object]:
        return nullcontext()

    def device(self, name: str) -> str:
        return name

    def sampler_seed(self, seed: int) -> int:
        return seed

    def begin(self, study: optuna.Study, n_trials: int) -> None:
        taken = driver.take_over_dead_trials(study)
        if taken:
            print(f"evomerge: {taken} trial(s) interrupted by a dead process were marked failed and will be retried.")
        done = driver.count_finished(study)
        if done:
            print(f"evomerge: resuming study {study.study_name!r}: {min(done, n_trials)} of {n_trials} trials done.")

    def budget(self, study: optuna.Study, n_trials: int) -> driver.Budget:
        return driver.LocalBudget(study, n_trials)

    @contextmanager
    def export(self, study: optuna.Study, outcome: Outcome, n_trials: int) -> Iterator[bool]:
        if outcome.interrupted:
            print(f"\nevomerge: interrupted; exporting the best so far. Rerun the same command to resume "
                  f"({driver.count_finished(study)} of {n_trials} trials done).")
        yield True

    def finish(self, study: optuna.Study, summary: dict[str, Any] | None, outcome: Outcome,
               timings: dict[str, Any]) -> dict[str, Any]:
        assert summary is not None  # a single process always exports
        return summary

    def summary_keys(self, study: optuna.Study) -> dict[str, Any]:
        return {}
