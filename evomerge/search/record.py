"""The study record: every key evomerge stores in an Optuna study, written here and read back typed.

A study is the whole truth of a search (resume, export, the report, other workers, a dashboard), so what
evomerge stores in it is a file format: a study written by any earlier version still loads. This module
owns that format. Every key is spelled here once, as a constant or inside the one function that writes it;
the rest of evomerge writes and reads through the functions below and never spells a key.

Study user attributes:

=================  ===================================================================================
``evomerge``       :class:`StudyManifest`: what rebuilds the genome with no config at hand (the search
                   config, sources, base, mask seed, layer layout) and the fingerprint of everything that
                   gives a parameter or a score its meaning. Written once, when the study is created.
``objectives``     the objective names, one per study direction. Written by every session.
``final:<N>``      :class:`FinalScores` of trial ``N``: its re-scoring at the end of the search.
``winner``         the number of the trial the last final step chose.
``reference``      :class:`ReferenceScores`: a baseline's metrics on every search item (``search.estimator:
                   paired``), written once, before the first searched trial.
``irt``            :class:`ItemCalibration`: each search item's difficulty, fitted to every baseline's
                   per-item results (``search.estimator: irt``), written once, before the first searched trial.
=================  ===================================================================================

Study system attribute ``evomerge:final``: the :class:`ExportClaim` (which cluster worker does, or did,
the final evaluation and export).

Trial user attributes (:class:`TrialRecord` reads them all):

=================  ===================================================================================
``baseline``       the label of an enqueued recipe (a hand-set one or a warm start's); absent: searched.
``seed``           the DARE/DELLA mask seed of the trial's recipe; absent: the genome's seed.
``retry_of``       the number of the trial this one re-runs (that trial died while it ran).
``worker``         the cluster worker that runs (ran) the trial.
``fitness``        the search fitness: the weighted mean of the task metrics on the search split's
                   ``limit`` items; a pruned trial's: its first look put on the whole look's scale.
``first_fitness``  a pruned trial's raw look at the step where it was pruned (Optuna's report at that step).
``metrics``        task -> metric -> value of the trial's look at the search split (a pruned trial's: as far
                   as it got).
``items``          how many search items (over all tasks) the trial scored: its evaluation cost.
``sample``         the fresh sample of search items the trial scored (``search.fresh_items``); absent: the
                   first ``limit`` items of each task, as every trial without it.
``merge_s``        seconds to apply the recipe; ``eval_s``: seconds to score it.
``fail_reason``    why the trial failed (or why it was failed for a dead worker).
=================  ===================================================================================

Trial system attributes: ``evomerge:heartbeat`` (the last heartbeat of a trial in a journal storage, see
backends.py), and Optuna's own ``fixed_params`` (the parameters a trial was enqueued with; only read).

Invariants, which every writer keeps and every reader may rely on:

* A key never changes meaning. A reader takes every shape an earlier version wrote: a key that is
  missing reads as its default (None, an empty mapping), never as an error; so there is no format
  version, and adding a key is the only way the format grows.
* Values are JSON (Optuna stores attributes as JSON text): tuples come back as lists, mapping keys as
  strings. Readers give back the types of this module's dataclasses.
* Every COMPLETE or PRUNED trial evomerge runs has ``fitness``; a trial pruned by an earlier version
  (before pruned trials recorded it) or written by another tool has not, and :func:`search_fitness`
  says what stands for it. That function is the only reading of a trial's fitness.
* ``final:<N>`` is written once per trial and never rewritten: its presence means "re-scored", and a
  rerun of the final step (or another worker's) reuses it. Absent keys inside it were not measured.
* ``winner`` names a trial that has ``final:<N>``.
* The export claim is taken (or taken over from a dead holder) only under the study mutex
  (search/cluster/export_claim.py); then only its holder writes it (its beat, then ``done``), and once
  it says ``done`` it is never changed again.
* A cluster trial's ``worker`` is its worker's last write when it takes the trial: a RUNNING trial
  without it belongs to a worker that died while taking it (search/cluster/budget.py).
* ``baseline`` and ``retry_of`` are set when a trial is enqueued, before any worker can run it; ``seed``
  then too where the trial's recipe has a seed of its own (a warm start's), else as the trial starts
  (``random_mode: fresh``). A retry carries its dead trial's ``baseline`` and ``seed`` and sets its own
  ``retry_of``; nothing else of the dead trial.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.search.optuna_io import set_study_system_attr, study_system_attr

# ---- the keys -------------------------------------------------------------------------------------
MANIFEST = "evomerge"              # study user attribute: StudyManifest
OBJECTIVES = "objectives"          # study user attribute: list of objective names
FINAL_PREFIX = "final:"            # study user attribute per trial: FinalScores
WINNER = "winner"                  # study user attribute: a trial number
REFERENCE = "reference"            # study user attribute: ReferenceScores
CALIBRATION = "irt"                # study user attribute: ItemCalibration
EXPORT_CLAIM = "evomerge:final"    # study system attribute: ExportClaim

BASELINE = "baseline"              # trial user attributes (see the table above)
SEED = "seed"
RETRY_OF = "retry_of"
WORKER = "worker"
FITNESS = "fitness"
FIRST_FITNESS = "first_fitness"
METRICS = "metrics"
ITEMS = "items"
SAMPLE = "sample"
MERGE_S = "merge_s"
EVAL_S = "eval_s"
FAIL_REASON = "fail_reason"

HEARTBEAT = "evomerge:heartbeat"   # trial system attribute: time.time() of the last heartbeat
FIXED_PARAMS = "fixed_params"      # trial system attribute, Optuna's own (enqueue_trial): read only


# ---- the study ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyManifest:
    """What a study needs to be understood without its config (study user attribute ``evomerge``)."""

    fingerprint: str | None            # genome fingerprint "/" fitness key (None: a study from before it)
    search: dict[str, Any]             # the search config group, sources filled in
    sources: dict[str, str]            # source name -> model directory
    base: str | None
    seed: int                          # the study's DARE/DELLA mask seed
    layout: dict[str, Any]             # genome.Layout's fields: n_layers, pre, post, layer_names
    tasks: dict[str, dict[str, float]] | None = None  # task -> metric -> weight
    objectives: list[str] | None = None
    limit: float | None = None         # search-time items per task (None: all)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StudyManifest":
        return cls(fingerprint=d.get("fingerprint"), search=dict(d["search"]), sources=dict(d["sources"]),
                   base=d.get("base"), seed=int(d.get("seed", 0)), layout=dict(d["layout"]), tasks=d.get("tasks"),
                   objectives=d.get("objectives"), limit=d.get("limit"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def manifest_of(study: optuna.Study) -> StudyManifest | None:
    """The study's manifest; None when evomerge did not write the study."""
    info = study.user_attrs.get(MANIFEST)
    return StudyManifest.from_dict(info) if info else None


def set_manifest(study: optuna.Study, manifest: StudyManifest) -> None:
    study.set_user_attr(MANIFEST, manifest.as_dict())


def objectives_of(study: optuna.Study) -> list[str] | None:
    value = study.user_attrs.get(OBJECTIVES)
    return None if value is None else [str(v) for v in value]


def set_objectives(study: optuna.Study, names: list[str]) -> None:
    study.set_user_attr(OBJECTIVES, list(names))


@dataclass(frozen=True)
class FinalScores:
    """A trial's re-scoring at the end of the search (study user attribute ``final:<N>``): fitness, metrics
    (task -> metric -> value) and objective values on each split it was scored on in full. A split it was
    not scored on reads None."""

    test: float | None = None
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    test_values: list[float] = field(default_factory=list)
    search_full: float | None = None   # every item of the search split (search.limit ignored)
    search_full_metrics: dict[str, dict[str, float]] | None = None
    select: float | None = None        # the select split (the one that chooses the winner)
    select_metrics: dict[str, dict[str, float]] | None = None
    chosen_items: dict[str, list[float]] | None = None  # task -> each item's task score on the split that
                                       # chooses (select, else search_full), in item order: the paired margin
    test_items: dict[str, list[float]] | None = None    # the same on the test split: the paired held-out report

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FinalScores":
        return cls(test=d.get("test"), test_metrics=d.get("test_metrics") or {}, test_values=d.get("test_values") or [],
                   search_full=d.get("search_full"), search_full_metrics=d.get("search_full_metrics"),
                   select=d.get("select"), select_metrics=d.get("select_metrics"), chosen_items=d.get("chosen_items"),
                   test_items=d.get("test_items"))

    def as_dict(self) -> dict[str, Any]:
        """The stored shape: a split that was not scored has no keys at all."""
        out: dict[str, Any] = {}
        if self.search_full is not None:
            out.update(search_full=self.search_full, search_full_metrics=self.search_full_metrics)
        if self.select is not None:
            out.update(select=self.select, select_metrics=self.select_metrics)
        if self.chosen_items is not None:
            out.update(chosen_items=self.chosen_items)
        if self.test_items is not None:
            out.update(test_items=self.test_items)
        out.update(test=self.test, test_metrics=self.test_metrics, test_values=self.test_values)
        return out


def final_scores(study: optuna.Study) -> dict[int, FinalScores]:
    """Every re-scored trial's final scores, by trial number."""
    out: dict[int, FinalScores] = {}
    for key, value in study.user_attrs.items():
        number = key[len(FINAL_PREFIX):] if key.startswith(FINAL_PREFIX) else ""
        if number.isdigit():
            out[int(number)] = FinalScores.from_dict(value or {})
    return out


def set_final_scores(study: optuna.Study, number: int, scores: FinalScores) -> None:
    study.set_user_attr(f"{FINAL_PREFIX}{number}", scores.as_dict())


def winner_of(study: optuna.Study) -> int | None:
    value = study.user_attrs.get(WINNER)
    return None if value is None else int(value)


def set_winner(study: optuna.Study, number: int) -> None:
    study.set_user_attr(WINNER, int(number))


@dataclass(frozen=True)
class ReferenceScores:
    """A reference recipe's per-item metrics on every item of the search split (study attribute ``reference``):
    what puts a look at a few items on the whole split's scale (search/fitness.py, ``Look``)."""

    label: str                                  # the baseline it is
    items: dict[str, dict[str, list[float]]]    # task -> metric -> value of each item, by item index


def reference_of(study: optuna.Study) -> ReferenceScores | None:
    raw = study.user_attrs.get(REFERENCE)
    if not raw:
        return None
    return ReferenceScores(label=str(raw["label"]),
                           items={t: {m: [float(v) for v in vs] for m, vs in ms.items()} for t, ms in raw["items"].items()})


def set_reference(study: optuna.Study, ref: ReferenceScores) -> None:
    study.set_user_attr(REFERENCE, {"label": ref.label, "items": ref.items})


@dataclass(frozen=True)
class ItemCalibration:
    """Each search item's difficulty under a Rasch model fitted to the baselines' per-item results (study
    attribute ``irt``; ``search.estimator: irt``, search/estimators.py)."""

    labels: tuple[str, ...]                          # the baselines it was fitted to
    difficulty: dict[str, dict[str, list[float]]]    # task -> metric -> difficulty of each item, by item index


def calibration_of(study: optuna.Study) -> ItemCalibration | None:
    raw = study.user_attrs.get(CALIBRATION)
    if not raw:
        return None
    return ItemCalibration(labels=tuple(raw["labels"]), difficulty={
        t: {m: [float(v) for v in vs] for m, vs in ms.items()} for t, ms in raw["difficulty"].items()})


def set_calibration(study: optuna.Study, cal: ItemCalibration) -> None:
    study.set_user_attr(CALIBRATION, {"labels": list(cal.labels), "difficulty": cal.difficulty})


@dataclass(frozen=True)
class ExportClaim:
    """Which worker does the final evaluation and export (study system attribute ``evomerge:final``)."""

    worker: str | None
    host: str | None = None
    pid: int | None = None
    dir: str | None = None             # where it exports
    since: str | None = None           # ISO time it claimed
    beat: float | None = None          # time.time() of its last beat (a frozen beat: it died)
    done: bool = False
    took_over_from: str | None = None  # the worker whose claim died
    finished: str | None = None        # ISO time it was done

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExportClaim":
        return cls(worker=d.get("worker"), host=d.get("host"), pid=d.get("pid"), dir=d.get("dir"),
                   since=d.get("since"), beat=d.get("beat"), done=bool(d.get("done", False)),
                   took_over_from=d.get("took_over_from"), finished=d.get("finished"))

    def as_dict(self) -> dict[str, Any]:
        """The stored shape: ``took_over_from`` and ``finished`` only when they happened."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("took_over_from", "finished")}


def claim_of(study: optuna.Study) -> ExportClaim | None:
    value = study_system_attr(study, EXPORT_CLAIM)
    return None if value is None else ExportClaim.from_dict(value)


def set_claim(study: optuna.Study, claim: ExportClaim) -> None:
    set_study_system_attr(study, EXPORT_CLAIM, claim.as_dict())


# ---- a trial --------------------------------------------------------------------------------------
# Readers take anything with ``user_attrs`` (a FrozenTrial, an optuna.Trial, the mirror's trial), and
# search_fitness a FrozenTrial.

def baseline_of(trial: Any) -> str | None:
    """A baseline's label; None for a searched trial."""
    return trial.user_attrs.get(BASELINE) or None


def seed_of(trial: Any, default: int | None = None) -> int | None:
    """The mask seed its recipe was (is to be) built with; ``default`` (the genome's) when it has none."""
    value = trial.user_attrs.get(SEED)
    return default if value is None else int(value)


def retry_of(trial: Any) -> int | None:
    """The number of the dead trial this one re-runs; None when it is no retry."""
    value = trial.user_attrs.get(RETRY_OF)
    return None if value is None else int(value)


def worker_of(trial: Any) -> str | None:
    return trial.user_attrs.get(WORKER)


def fail_reason_of(trial: Any) -> str | None:
    return trial.user_attrs.get(FAIL_REASON)


def metrics_of(trial: Any) -> dict[str, dict[str, float]]:
    return trial.user_attrs.get(METRICS) or {}


def search_fitness(trial: FrozenTrial) -> float | None:
    """A trial's fitness on the search split, the one reading of it.

    ``fitness``, which every trial evomerge completes or prunes has (a pruned trial's: its first look on
    the whole look's scale); else ``first_fitness``, a pruned trial's first look from before pruned
    trials recorded ``fitness`` (its Optuna value then was that first look); else the trial's value when it
    has exactly one (a single objective is the fitness); else None (not scored, or a multi-objective
    trial of another tool).
    """
    ua = trial.user_attrs
    for key in (FITNESS, FIRST_FITNESS):
        if ua.get(key) is not None:
            return float(ua[key])
    values = trial.values
    return float(values[0]) if values is not None and len(values) == 1 else None


def ranking_fitness(trial: FrozenTrial) -> float:
    """:func:`search_fitness` as a sort key: a trial without one ranks last."""
    f = search_fitness(trial)
    return float("-inf") if f is None else f


def first_look(trial: FrozenTrial) -> float | None:
    """The raw first look of a trial scored in two looks (pruning on): Optuna's step-0 report."""
    value = trial.intermediate_values.get(0)
    return None if value is None else float(value)


def enqueued_params(trial: FrozenTrial) -> dict[str, Any] | None:
    """The parameters an enqueued trial (baseline, warm start, retry) was given; None for a sampled one."""
    fixed = trial.system_attrs.get(FIXED_PARAMS)
    return None if fixed is None else dict(fixed)


def heartbeat_of(trial: FrozenTrial) -> float | None:
    return trial.system_attrs.get(HEARTBEAT)


@dataclass(frozen=True)
class TrialRecord:
    """Everything evomerge stored about one trial, typed (Optuna's own fields stay on the FrozenTrial)."""

    number: int
    state: TrialState
    baseline: str | None
    seed: int | None
    retry_of: int | None
    worker: str | None
    fitness: float | None              # search_fitness
    first_look: float | None
    metrics: dict[str, dict[str, float]]
    merge_s: float | None
    eval_s: float | None
    fail_reason: str | None
    items: int | None = None           # search items scored (None: not recorded, before this key existed)
    sample: int | None = None          # the fresh sample scored (None: the first items)

    @classmethod
    def of(cls, trial: FrozenTrial) -> "TrialRecord":
        ua = trial.user_attrs
        return cls(number=trial.number, state=trial.state, baseline=baseline_of(trial), seed=seed_of(trial),
                   retry_of=retry_of(trial), worker=worker_of(trial), fitness=search_fitness(trial),
                   first_look=first_look(trial), metrics=metrics_of(trial), merge_s=ua.get(MERGE_S),
                   eval_s=ua.get(EVAL_S), fail_reason=fail_reason_of(trial), items=ua.get(ITEMS),
                   sample=ua.get(SAMPLE))


def enqueue_attrs(baseline: str | None = None, seed: int | None = None, retry_of: int | None = None) -> dict[str, Any]:
    """The user attributes of a trial to enqueue: a baseline's label and mask seed, a retry's origin."""
    out: dict[str, Any] = {}
    if baseline is not None:
        out[BASELINE] = baseline
    if seed is not None:
        out[SEED] = int(seed)
    if retry_of is not None:
        out[RETRY_OF] = int(retry_of)
    return out


def retry_attrs(trial: Any) -> dict[str, Any]:
    """A retry's user attributes: the dead trial's label and seed as they were stored, and ``retry_of``."""
    carried = {k: v for k, v in trial.user_attrs.items() if k in (BASELINE, SEED)}
    return {**carried, RETRY_OF: trial.number}


def write_look(trial: Any, merge_s: float, eval_s: float, metrics: dict | None, *, fitness: float | None = None,
               first_fitness: float | None = None, items: int | None = None, sample: int | None = None) -> None:
    """What the search measured of a trial, on anything with ``set_user_attr`` (the mirror's trial)."""
    if items is not None:
        trial.set_user_attr(ITEMS, int(items))
    if sample is not None:
        trial.set_user_attr(SAMPLE, int(sample))
    if first_fitness is not None:
        trial.set_user_attr(FIRST_FITNESS, first_fitness)
    if fitness is not None:
        trial.set_user_attr(FITNESS, fitness)
    trial.set_user_attr(MERGE_S, round(merge_s, 4))
    trial.set_user_attr(EVAL_S, round(eval_s, 4))
    if metrics is not None:
        trial.set_user_attr(METRICS, metrics)
