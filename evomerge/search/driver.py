"""The search loop: Optuna ask/tell around "merge in place, score in memory".

Budget and resume, precisely:

* a trial is **finished** when it is COMPLETE, PRUNED, or FAIL without a retry
  (the candidate itself failed: NaN weights, out of memory, an lm-eval error);
* a trial that was RUNNING when its process died, or when Ctrl-C arrived, is
  marked FAIL *and* re-enqueued with the same parameters; the new trial carries
  ``retry_of = <old number>``, which is what makes the old one "retried" and not
  counted;
* the loop runs while its :class:`Budget` lets it start a trial: finished <
  ``search.n_trials`` (baselines included) for one process (:class:`LocalBudget`),
  the study-wide gate for cluster workers (search/cluster/budget.py), so a
  resumed run finishes exactly the budget: nothing lost, nothing run twice.

Dead trials are found in one of two ways. Without heartbeats (SQLite, one
worker: the default) every trial still RUNNING at start-up belongs to a dead
process and is taken over. With ``storage.heartbeat_interval`` set (many
workers on one database) Optuna fails trials whose heartbeat went stale and
:func:`retry_trial` re-enqueues them; nothing else is taken over.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from evomerge.errors import EvomergeError
from evomerge.search import record
from evomerge.search.estimators import LookEstimator
from evomerge.search.optuna_io import storage_of, trial_id
from evomerge.search.storage import heartbeat_enabled

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from evomerge.search.fitness import Score

    from evomerge.search.mirror import Mirror, MirroredTrial

MAX_CONSECUTIVE_FAILURES = 5


class FailureStreak:
    """Stops a search whose candidates keep failing: a broken input would otherwise spend the whole
    budget on failures. ``where`` names the process in the message (" on this worker")."""

    def __init__(self, where: str = "") -> None:
        self.where, self.count, self.last_reason = where, 0, ""

    def record(self, state: TrialState, reason: str | None) -> None:
        self.count = self.count + 1 if state == TrialState.FAIL else 0
        self.last_reason = reason or self.last_reason
        if self.count >= MAX_CONSECUTIVE_FAILURES:
            raise EvomergeError(f"{self.count} candidates in a row failed{self.where}; the last one: "
                                f"{self.last_reason}. Fix the cause and rerun the same command to resume.")


T = TypeVar("T")


def lazy(make: Callable[[], T], on_built: Callable[[float], None]) -> Callable[[], T]:
    """``make()`` on first call only, then ``on_built(start time)``: a resumed study that is already
    done never pays for preparing the merge engine."""
    built: list[T] = []

    def get() -> T:
        if not built:
            start = time.perf_counter()
            built.append(make())
            on_built(start)
        return built[0]

    return get


def retry_of(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials that have a retry (enqueued or run)."""
    return {n for n in map(record.retry_of, trials) if n is not None}


def is_finished(t: FrozenTrial, retried: set[int]) -> bool:
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and t.number not in retried


def count_finished(study: optuna.Study) -> int:
    trials = study.get_trials(deepcopy=False)
    retried = retry_of(trials)
    return sum(is_finished(t, retried) for t in trials)


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a dead trial again, once, with the parameters it was meant to run: every dead trial is retried
    here (Optuna's heartbeat-stale callback, the budget gate's healing, Ctrl-C, a take-over at start-up).

    Why not Optuna's ``RetryHeartbeatStaleTrialCallback``: it re-creates the dead trial whole, and three of
    the things it carries over break a guarantee of docs/cluster.md.

    * Every user attribute, ``worker`` among them. The budget gate finds a worker that died while taking a
      trial by that attribute's absence (a RUNNING trial without ``worker``, search/cluster/budget.py); a
      retry born with the dead worker's label, whose own worker then died the same way, is never healed,
      and on PostgreSQL, which counts a trial without a heartbeat row as alive, stays RUNNING for ever: the
      study-wide budget never completes. (``fitness``, ``metrics`` and ``fail_reason`` would come along too.)
    * Every system attribute, the journal's heartbeat among them: the retry looks started before any worker
      took it.
    * ``trial.params``: an enqueued trial (a baseline) that died after a worker claimed it and before its
      parameters were copied to it has none or some of them, so its retry would run sampled values under
      the baseline's name. Here an enqueued trial's own ``fixed_params`` are retried.

    What Optuna's callback would add besides is its ``retry_history`` system attribute; ``retry_of`` says the
    same (the trial this one re-runs) and old studies already carry it.
    """
    trials = study.get_trials(deepcopy=False)
    if trial.number in retry_of(trials):
        return
    params = record.enqueued_params(trial)
    study.enqueue_trial(dict(trial.params if params is None else params), user_attrs=record.retry_attrs(trial),
                        skip_if_exists=False)


def take_over_dead_trials(study: optuna.Study) -> int:
    """Fail and re-enqueue the trials a dead process left RUNNING (SQLite, one worker)."""
    if heartbeat_enabled(storage_of(study)):
        optuna.storages.fail_stale_trials(study)
        return 0
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        retry_trial(study, t)
        optuna.trial.Trial(study, trial_id(t)).set_user_attr(record.FAIL_REASON, "the process died while this trial ran")
        study.tell(t.number, state=TrialState.FAIL)
        n += 1
    return n


def enqueue_baselines(study: optuna.Study, baselines: dict[str, dict[str, Any]],
                      seeds: dict[str, int | None] | None = None) -> int:
    """Enqueue each baseline once per study (idempotent across restarts).

    ``seeds``: a baseline's own mask seed (a warm start's earlier trial, see warm.py), so its recipe is the
    one that was scored before.
    """
    have = {record.baseline_of(t) for t in study.get_trials(deepcopy=False)}
    n = 0
    for name, params in baselines.items():
        if name not in have:
            seed = (seeds or {}).get(name)
            study.enqueue_trial(params, user_attrs=record.enqueue_attrs(baseline=name, seed=seed), skip_if_exists=False)
            n += 1
    return n


class _Heartbeat:
    """Records a RUNNING trial's heartbeat in the background (only when the storage has heartbeats)."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.storage = storage_of(study)
        self.trial_id = trial_id
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> "_Heartbeat":
        if heartbeat_enabled(self.storage):
            interval = self.storage.get_heartbeat_interval()
            self.storage.record_heartbeat(self.trial_id)

            def beat() -> None:
                while not self.stop.wait(interval):
                    self.storage.record_heartbeat(self.trial_id)

            self.thread = threading.Thread(target=beat, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


class BudgetMet(Exception):
    """The study has its ``n_trials`` finished trials."""


class NoSlot(Exception):
    """Every remaining place in the budget is taken by a running trial: wait for one to end or die."""


class Budget(Protocol):
    """When the loop may start a trial: the one policy that differs between one process and many workers."""

    label: str     # the progress bar's
    where: str     # names the process in the failure-streak message (" on this worker")
    poll_s: float  # how long to wait after :class:`NoSlot`

    def take(self, mirror: Mirror, dists: dict[str, BaseDistribution]) -> MirroredTrial:
        """Start a trial (through ``mirror``), or raise :class:`BudgetMet` (stop) or :class:`NoSlot` (wait)."""

    def finished(self) -> int:
        """Finished trials, as this budget last counted them."""

    def ended(self, state: TrialState) -> None:
        """A trial this process took has ended in ``state`` (not called for one another worker failed)."""


class LocalBudget:
    """One process owns the study: finished trials are counted from the storage once, then by the loop, so a
    trial costs no read of the whole study."""

    label, where, poll_s = "search", "", 0.0

    def __init__(self, study: optuna.Study, n_trials: int) -> None:
        self.study, self.n_trials, self.done = study, n_trials, count_finished(study)

    def take(self, mirror: Mirror, dists: dict[str, BaseDistribution]) -> MirroredTrial:
        if self.done >= self.n_trials:
            raise BudgetMet
        if mirror.shared:  # heartbeats on: fail (and retry) what a dead process left running
            optuna.storages.fail_stale_trials(self.study)
        return mirror.ask(dists)

    def finished(self) -> int:
        return self.done

    def ended(self, state: TrialState) -> None:
        self.done += 1


@dataclass
class LoopStats:
    merge_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    interrupted: bool = False

    def per_candidate(self) -> dict[str, float]:
        """Medians: the first candidate of a process pays one-time imports (the sampler's) that a mean would smear."""
        n = len(self.total_s)
        if not n:
            return {}
        m, e, t = (statistics.median(x) for x in (self.merge_s, self.eval_s, self.total_s))
        over = statistics.median(tt - mm - ee for tt, mm, ee in zip(self.total_s, self.merge_s, self.eval_s))
        return {"candidates": n, "merge_s": round(m, 4), "eval_s": round(e, 4), "overhead_s": round(over, 4),
                "total_s": round(t, 4), "sum_s": round(sum(self.total_s), 3)}


class TrialScorer(Protocol):
    """What the loop asks of a scorer (search/fitness.py's ``Scorer``; tests give stand-ins)."""

    def can_split(self, split: str) -> bool:
        """Whether a look can be scored in steps over item lists (else each step is scored from the first item)."""

    def look(self, split: str, limit: float | None, sample: int | None = None, seed: int = 0,
             estimator: LookEstimator | None = None) -> Any:
        """A trial's items, not yet scored."""

    def extend(self, model: Any, split: str, look: Any, upto: float | None = None) -> Score:
        """Score the look up to ``upto`` (None: all of it); the look so far as one Score."""

    def score(self, model: Any, split: str, limit: float | None) -> Score:
        """The first ``limit`` items, at once."""


class SearchLoop:
    """Runs trials while ``budget`` lets it start one (or until Ctrl-C); by default one process's
    :class:`LocalBudget`. ``ran``: the trials it started; ``taken_over``: those another worker failed under it.

    ``looks``: the steps of a searched trial's look before the whole of it (items per task, each a fraction of
    the look's items or a count; empty: no pruning). After step ``k`` the trial reports at step ``k`` and the
    pruner may stop it. ``fresh_items``: trial ``n`` scores fresh sample ``n // fresh_items`` of the search split
    (None: every trial the same first items), so no generation fits the items the previous ones were chosen on.
    ``estimator``: what puts every look on the whole search split's scale (search/estimators.py; None: its mean).
    """

    def __init__(self, study: optuna.Study, sampler_for: Any, pruner: optuna.pruners.BasePruner,
                 genome: Any, engine: Any, scorer: TrialScorer, *, n_trials: int, limit: float | None,
                 seed: int, fresh_seeds: bool, looks: tuple[float, ...] = (), fresh_items: int | None = None,
                 estimator: LookEstimator | None = None, progress: bool = True,
                 budget: Budget | None = None) -> None:
        from evomerge.search.mirror import Mirror

        self.study, self.genome, self.engine, self.scorer = study, genome, engine, scorer
        self.mirror = Mirror(study, sampler_for, pruner)
        self.budget = budget if budget is not None else LocalBudget(study, n_trials)
        self.n_trials, self.limit, self.looks, self.fresh_items = n_trials, limit, tuple(looks), fresh_items
        self.seed, self.fresh_seeds, self.progress, self.estimator = seed, fresh_seeds, progress, estimator
        # the space: fixed distributions, or define-by-run (a conditional space: search/method_space.py)
        self.dists = genome.suggest if getattr(genome, "conditional", False) else genome.distributions()
        self.stats = LoopStats()
        self.ran: list[int] = []
        self.taken_over: list[int] = []

    def run(self) -> LoopStats:
        budget = self.budget
        bar = tqdm(total=self.n_trials, initial=min(budget.finished(), self.n_trials), desc=budget.label,
                   unit="trial", disable=not self.progress, dynamic_ncols=True)
        failures = FailureStreak(budget.where)
        try:
            while True:
                start = time.perf_counter()
                try:
                    trial = budget.take(self.mirror, self.dists)
                except BudgetMet:
                    break
                except NoSlot:
                    self._show(bar)
                    time.sleep(budget.poll_s)
                    continue
                self.ran.append(trial.number)
                try:
                    state, reason = self._one_trial(trial, start)
                except optuna.exceptions.UpdateFinishedTrialError:
                    # another worker failed this trial as stale (this worker's heartbeat was late); its retry runs it
                    self.taken_over.append(trial.number)
                    tqdm.write(f"trial {trial.number} was failed by another worker (missed heartbeats); "
                               f"its retry will run it.")
                    continue
                budget.ended(state)
                self._show(bar)
                failures.record(state, reason)
                self._postfix(bar)
        except KeyboardInterrupt:
            self.stats.interrupted = True
        finally:
            bar.close()
        return self.stats

    def _show(self, bar: tqdm) -> None:
        bar.update(min(self.budget.finished(), self.n_trials) - bar.n)

    def _postfix(self, bar: tqdm) -> None:
        best = self.mirror.best_value()
        n = len(self.stats.total_s)
        if n:
            tail = slice(max(0, n - 5), n)
            m = sum(self.stats.merge_s[tail]) / len(self.stats.merge_s[tail])
            e = sum(self.stats.eval_s[tail]) / len(self.stats.eval_s[tail])
            bar.set_postfix_str(f"best={best:.4f} merge={m:.2f}s eval={e:.2f}s" if best is not None
                                else f"merge={m:.2f}s eval={e:.2f}s", refresh=True)

    def _one_trial(self, trial: MirroredTrial, start: float) -> tuple[TrialState, str | None]:
        seed = record.seed_of(trial, self.seed + trial.number if self.fresh_seeds else self.seed)
        baseline = record.baseline_of(trial)
        merge_s = eval_s = 0.0
        try:
            with _Heartbeat(self.study, trial.disk_id):
                if self.fresh_seeds:
                    trial.set_user_attr(record.SEED, seed)
                recipe = self.genome.recipe(trial.params, seed=seed)
                merge_s = self.engine.apply(recipe).seconds
                sample = None if self.fresh_items is None else trial.number // self.fresh_items
                steps = self.looks if baseline is None else ()  # a baseline is always scored whole
                look = None
                if self.scorer.can_split("search"):
                    look = self.scorer.look("search", self.limit, sample, seed=self.seed, estimator=self.estimator)
                    score_at: Callable[[float | None], Any] = lambda upto: self.scorer.extend(
                        self.engine.model, "search", look, upto)
                else:  # an evaluator that scores only a limit: each step from the first item (correct, slower)
                    score_at = lambda upto: self.scorer.score(
                        self.engine.model, "search", self.limit if upto is None else _of(self.limit, upto))
                for step, upto in enumerate(steps):
                    part = score_at(upto)
                    eval_s += part.seconds
                    trial.report(part.fitness, step=step)
                    if trial.should_prune():
                        estimate = part.fitness - self._look_offset(step)
                        trial.report(estimate, step=len(steps))  # a sampler reads a pruned trial's last report
                        self._record(trial, merge_s, eval_s, part.metrics, sample, look, first_fitness=part.fitness,
                                     fitness=estimate)
                        trial.finish(TrialState.PRUNED)
                        self._time(start, merge_s, eval_s)
                        return TrialState.PRUNED, None
                score = score_at(None)
                eval_s += score.seconds
                if not all(math.isfinite(v) for v in score.values):
                    raise EvomergeError(f"the evaluation returned a non-finite score {score.values}")
                self._record(trial, merge_s, eval_s, score.metrics, sample, look, fitness=score.fitness)
                trial.finish(TrialState.COMPLETE, score.values)
                self._time(start, merge_s, eval_s)
                return TrialState.COMPLETE, None
        except KeyboardInterrupt:
            trial.set_user_attr(record.FAIL_REASON, "interrupted (Ctrl-C); retried on resume")
            retry_trial(self.study, trial.frozen())
            trial.finish(TrialState.FAIL)
            raise
        except Exception as exc:  # noqa: BLE001 - any candidate failure is recorded, the search goes on
            reason = _reason(exc)
            trial.set_user_attr(record.FAIL_REASON, reason)
            self._record(trial, merge_s, eval_s, None, None, None)
            trial.finish(TrialState.FAIL)
            _free_accelerator_memory()
            tqdm.write(f"trial {trial.number} failed: {reason}")
            return TrialState.FAIL, reason

    def _look_offset(self, step: int) -> float:
        """How much higher step ``step`` of a look scores than the whole look, over this study's completed trials.

        Why a pruned trial is not told to the sampler as its raw first look: the first items of a task are
        not an average sample of its items. On the smol zoo they score 0.03-0.09 higher than the whole look
        for every candidate alike, so CMA-ES (which ranks a pruned trial by its last reported value) was
        told that the candidates the pruner had just rejected beat every candidate it kept, and walked
        towards them. The mean paired difference over completed trials puts the first look on the
        whole look's scale; completed trials had the better first looks, so it errs, if anything, on
        the side of a pruned trial looking worse. The reports at steps stay raw: the pruner compares a step's
        looks with the same step's looks, on the same items (with fresh items, on samples of the same size).
        """
        diffs = [t.intermediate_values[step] - t.values[0]
                 for t in self.mirror.mem.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if step in t.intermediate_values and t.values]
        return sum(diffs) / len(diffs) if diffs else 0.0

    def _record(self, trial: Any, merge_s: float, eval_s: float, metrics: dict | None, sample: int | None,
                look: Any, **scores: float) -> None:
        record.write_look(trial, merge_s, eval_s, metrics, sample=sample, items=None if look is None else look.scored,
                          **scores)

    def _time(self, start: float, merge_s: float, eval_s: float) -> None:
        self.stats.merge_s.append(merge_s)
        self.stats.eval_s.append(eval_s)
        self.stats.total_s.append(time.perf_counter() - start)


def _of(limit: float | None, first: float) -> float:
    """The first look as an lm-eval ``limit`` (for evaluators that cannot score item ranges)."""
    if first > 1:
        return float(int(first))
    if limit is None:
        return first
    return float(max(1, round(limit * first))) if limit >= 1 else limit * first


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return f"out of memory: {str(exc).splitlines()[0] if str(exc) else name}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}: {text}" if not isinstance(exc, EvomergeError) else text


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
