"""The end of a search: re-score the best candidates and the baselines, pick the winner honestly.

Why re-score before choosing: trials were ranked on a ``limit``-item sample, and
the best of many noisy scores is biased upwards (the winner's curse). With a
``select`` split (see evaluation/splits.py) the winner is chosen there: items the
search never scored, so a candidate that fitted the search sample gains nothing.
Without one, the top few are re-scored on every search item and the winner is
picked there, which makes the choice less of a lottery but still on items the
search optimised. The test split is only ever *reported*, never used to choose.

Results are kept in the study (:class:`~evomerge.search.record.FinalScores`, one
per trial), so a rerun after the search ended re-exports without re-scoring, and
every worker of a shared study sees them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from evomerge.search import record
from evomerge.search.fitness import paired_se
from evomerge.search.record import FinalScores
from evomerge.search.score_cache import ScoreCache


@dataclass
class Candidate:
    number: int
    label: str                 # baseline name or "trial N"
    baseline: str | None
    params: dict[str, Any]
    seed: int
    search: float              # fitness recorded during the search (``limit`` items)
    values: list[float]
    search_full: float | None = None
    se: float | None = None    # standard error of ``selection`` (None: unknown)
    test: float | None = None
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    test_values: list[float] = field(default_factory=list)
    select: float | None = None  # fitness on the select split (None: no select split)
    items: dict[str, list[float]] | None = None  # per-item task scores where it is chosen (None: not kept)
    test_items: dict[str, list[float]] | None = None  # per-item task scores on the test split (None: not kept)

    @property
    def selection(self) -> float:
        """What the winner is chosen by: the select split, else the search split (never the test split)."""
        if self.select is not None:
            return self.select
        return self.search if self.search_full is None else self.search_full

    @property
    def chosen_on(self) -> str:
        """Which scores :attr:`selection` is (the summary and the model card say it)."""
        return "select" if self.select is not None else "search_full" if self.search_full is not None else "search"

    def as_dict(self) -> dict[str, Any]:
        return {"trial": self.number, "label": self.label, "baseline": self.baseline, "search_fitness": self.search,
                "search_full_fitness": self.search_full, "select_fitness": self.select, "test_fitness": self.test,
                "values": self.values, "test_values": self.test_values, "test_metrics": self.test_metrics,
                "seed": self.seed, "search_se": self.se, "chosen_on": self.chosen_on}

    def take(self, scores: FinalScores | None) -> "Candidate":
        """Its final scores, as the study records them (None: not re-scored)."""
        scores = scores or FinalScores()
        self.search_full, self.select, self.test = scores.search_full, scores.select, scores.test
        self.test_metrics, self.test_values = scores.test_metrics, scores.test_values
        self.items, self.test_items = scores.chosen_items, scores.test_items
        return self


@dataclass
class FinalResult:
    winner: Candidate | None
    candidates: list[Candidate]
    baselines: list[Candidate]
    front: list[int]           # Pareto front trial numbers (multi-objective)
    seconds: float
    comparison: dict[str, Any] | None = None  # the best searched against the best baseline (:func:`comparison`)
    held_out: dict[str, Any] | None = None    # the winner against the best baseline on test (:func:`held_out`)


def candidate(t: FrozenTrial, seed: int) -> Candidate:
    """Trial ``t`` as a candidate (``seed``: the genome's, for a trial that stored none); no final scores yet."""
    b = record.baseline_of(t)
    fitness = record.search_fitness(t)
    return Candidate(number=t.number, label=b or f"trial {t.number}", baseline=b, params=dict(t.params),
                     seed=record.seed_of(t, seed), search=float("nan") if fitness is None else fitness,
                     values=list(t.values or []))


def select(study: optuna.Study, top_k: int, seed: int = 0) -> tuple[list[Candidate], list[Candidate], list[int]]:
    """(top candidates, baselines, Pareto front numbers) among COMPLETE trials."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    baselines: dict[str, Candidate] = {}
    for t in done:
        b = record.baseline_of(t)
        if b and b not in baselines:
            baselines[b] = candidate(t, seed)
    searched = [t for t in done if not record.baseline_of(t)]
    front: list[int] = []
    if len(study.directions) > 1:
        front = sorted(t.number for t in study.best_trials)
        pool = [t for t in searched if t.number in front] or searched
        top = sorted(pool, key=record.ranking_fitness, reverse=True)[: max(top_k, 2 * top_k)]
    else:
        top = sorted(searched, key=record.ranking_fitness, reverse=True)[:top_k]
    return [candidate(t, seed) for t in top], list(baselines.values()), front


def difference_se(a: dict[str, list[float]] | None, b: dict[str, list[float]] | None,
                  a_se: float | None = None, b_se: float | None = None) -> tuple[float | None, bool]:
    """The standard error of one fitness minus another and whether it is paired: over the items both were scored
    on where both kept their per-item scores (:func:`paired_se`), else from each one's own standard error, else
    None."""
    if a is not None and b is not None:
        se = paired_se(a, b)
        if se is not None:
            return se, True
    if a_se is not None and b_se is not None:
        return (a_se ** 2 + b_se ** 2) ** 0.5, False
    return None, False


def margin_of(best: Candidate, base: Candidate) -> tuple[float | None, bool]:
    """The standard error of ``best.selection - base.selection`` and whether it is paired."""
    return difference_se(best.items, base.items, best.se, base.se)


def _contenders(top: list[Candidate], baselines: list[Candidate]) -> tuple[Candidate | None, Candidate | None]:
    """The best re-scored searched candidate and the best re-scored baseline, where they are chosen."""
    best = max((c for c in top if c.test is not None), key=lambda c: c.selection, default=None)
    base = max((c for c in baselines if c.test is not None), key=lambda c: c.selection, default=None)
    return best, base


def comparison(top: list[Candidate], baselines: list[Candidate]) -> dict[str, Any] | None:
    """What the winner rule weighed: the best searched candidate against the best baseline where they are
    chosen, the difference and its standard error (paired or not), for the summary and the report."""
    best, base = _contenders(top, baselines)
    if best is None or base is None:
        return None
    se, paired = margin_of(best, base)
    return {"searched": best.label, "baseline": base.label, "on": best.chosen_on,
            "difference": best.selection - base.selection, "se": se, "paired": paired}


def held_out(winner: Candidate | None, baselines: list[Candidate]) -> dict[str, Any] | None:
    """The report's question, answered on the test split after the choice: the winner against the best
    hand-set recipe *by test* (any method, any source alone; the hardest baseline, picked with hindsight), the
    difference and its standard error, paired over the same test items where both kept them. Never used to
    choose."""
    others = [c for c in baselines if c.test is not None and (winner is None or c.number != winner.number)]
    if winner is None or winner.test is None or not others:
        return None
    base = max(others, key=lambda c: c.test)
    se, paired = difference_se(winner.test_items, base.test_items)
    return {"winner": winner.label, "baseline": base.label, "difference": winner.test - base.test,
            "se": se, "paired": paired}


def choose(top: list[Candidate], baselines: list[Candidate], margin_se: float) -> Candidate | None:
    """The best searched candidate if it beats the best baseline by more than the noise, else that baseline."""
    best, base = _contenders(top, baselines)
    if best is None or base is None:
        return best or base
    se = margin_of(best, base)[0] if margin_se > 0 else None
    margin = 0.0 if se is None else margin_se * se
    return best if best.selection - base.selection > margin else base


def rescore(study: optuna.Study, genome: Any, get_engine: Any, scorer: Any, *, top_k: int, rescore_search: bool,
            search_limit: float | None, progress: bool = True, margin_se: float = 1.0,
            cache: ScoreCache | None = None, select_split: bool = False) -> FinalResult:
    """Re-score the top candidates and the baselines, then pick the winner on the select split (``select_split``),
    else on the search split.

    ``get_engine()`` builds the prepared merge only if some candidate still needs scoring. A searched
    candidate wins over the best baseline only when its advantage where it is chosen exceeds ``margin_se``
    standard errors of the difference: a hand-made recipe is kept unless the evidence says otherwise. The
    split that chooses is scored item by item (mean-aggregated metrics), so that standard error is the
    paired one, over the same items (:func:`margin_of`).
    ``rescore_search`` still re-scores every search item when there is a select split: the search/select
    gap is then measured, not guessed. ``cache`` (see score_cache.py) serves full-split scores that another
    run already computed.
    """
    start = time.perf_counter()
    top, baselines, front = select(study, top_k, genome.seed)
    everyone = top + baselines
    scored = record.final_scores(study)
    todo = [c for c in everyone if c.number not in scored]
    for c in tqdm(todo, desc="held-out test", unit="model", disable=not progress or not todo):
        recipe = genome.recipe(c.params, seed=c.seed)
        applied = False

        def full_split(split: str, per_item: bool = False) -> dict[str, Any]:
            nonlocal applied
            per_item = per_item and scorer.can_split(split)
            hit = cache.get(recipe, split) if cache is not None else None
            if hit is not None and (not per_item or hit.get("items") is not None):
                return hit
            if not applied:
                get_engine().apply(recipe)
                applied = True
            if per_item:  # the split that chooses: each item's score too, for the paired margin
                s, items = scorer.score_per_item(get_engine().model, split)
                rec = {"fitness": s.fitness, "metrics": s.metrics, "values": s.values, "items": items}
            else:
                s = scorer.score(get_engine().model, split, None)
                rec = {"fitness": s.fitness, "metrics": s.metrics, "values": s.values}
            if cache is not None:
                cache.put(recipe, split, rec)
            return rec

        full = (full_split("search", per_item=not select_split)
                if rescore_search and search_limit is not None else None)
        chosen = full_split("select", per_item=True) if select_split else None
        test = full_split("test", per_item=True)
        items = (chosen or full or {}).get("items")
        record.set_final_scores(study, c.number, FinalScores(
            test=test["fitness"], test_metrics=test["metrics"], test_values=test["values"],
            search_full=None if full is None else full["fitness"],
            search_full_metrics=None if full is None else full["metrics"],
            select=None if chosen is None else chosen["fitness"],
            select_metrics=None if chosen is None else chosen["metrics"], chosen_items=items,
            test_items=test.get("items")))
    scored = record.final_scores(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for c in everyone:
        rec = scored.get(c.number) or FinalScores()
        c.take(rec)
        full = c.search_full is not None
        if c.select is not None:  # the noise of what chooses: the select split's, all of its items
            metrics, split, limit = rec.select_metrics, "select", None
        else:
            metrics = rec.search_full_metrics if full else record.metrics_of(trials[c.number])
            split, limit = "search", None if full else search_limit
        try:
            c.se = scorer.fitness_se(metrics, split, limit) if metrics else None
        except Exception:  # noqa: BLE001 - no margin when the noise cannot be estimated
            c.se = None
    winner = choose(top, baselines, margin_se)
    if winner is not None:
        record.set_winner(study, winner.number)
    return FinalResult(winner=winner, candidates=top, baselines=baselines, front=front,
                       seconds=time.perf_counter() - start, comparison=comparison(top, baselines),
                       held_out=held_out(winner, baselines))
