"""How a look at a few search items stands for the whole search split (``search.estimator``).

A trial scores a sample of each task's items (a first look, a step of successive halving, a fresh sample per
generation); its fitness is an estimate of what it would score on every item. ``mean`` takes the sample's
mean as it is (no estimator). The two here use what the baselines' results on *every* search item say about
the items, scored once per study and stored in it (search/record.py):

* ``paired``: one reference recipe (a baseline near the candidates). The candidate's mean minus the
  reference's mean on the same items, plus the reference's mean on all of them: a control variate. An easy or
  hard sample shifts the candidate and the reference alike and drops out.
* ``irt``: every baseline. A Rasch model (item response theory, one difficulty per item) is fitted to the
  baselines' per-item results; a candidate's ability is fitted to the items it scored, and each item it did
  not score counts as the probability the model gives it (the p-IRT estimator of tinyBenchmarks, Polo et al.
  2024; MERGE³ estimates merge fitness the same way). Items every baseline gets right or wrong say little
  about a candidate; the model says so, where a sample mean gives them the weight of any other item.

The math is pure (numpy, no lm-eval); a :class:`LookEstimator` is what a look (search/fitness.py) asks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from evomerge.search.record import ItemCalibration, ReferenceScores

PRIOR_SD = 2.0    # the normal prior on abilities and difficulties (logits): keeps an item every model gets right finite
NEWTON_STEPS = 1000  # at most: a fit stops when no coordinate moves by 1e-9


class LookEstimator(Protocol):
    """What a look needs to put its scored items on the whole split's scale."""

    per_item: bool  # whether :meth:`estimate` reads each scored item's value (else only their mean)

    def estimate(self, task: str, metric: str, scored: Sequence[int], mean: float,
                 values: Sequence[float] | None) -> float:
        """The whole split's ``metric`` of ``task`` from the ``scored`` item indices: their ``mean``, and (for a
        ``per_item`` estimator) each one's value in the same order."""


@dataclass(frozen=True)
class Paired:
    """``search.estimator: paired`` over one reference's per-item results."""

    reference: ReferenceScores
    per_item: bool = False

    def estimate(self, task: str, metric: str, scored: Sequence[int], mean: float,
                 values: Sequence[float] | None) -> float:
        ref = self.reference.items.get(task, {}).get(metric)
        if not ref or not scored:
            return mean
        return mean - sum(ref[i] for i in scored) / len(scored) + sum(ref) / len(ref)


@dataclass(frozen=True)
class Irt:
    """``search.estimator: irt`` over the item difficulties fitted from the baselines (:func:`calibrate`)."""

    calibration: ItemCalibration
    per_item: bool = True

    def estimate(self, task: str, metric: str, scored: Sequence[int], mean: float,
                 values: Sequence[float] | None) -> float:
        b = self.calibration.difficulty.get(task, {}).get(metric)
        if not b or not scored or values is None:
            return mean
        return p_irt(np.asarray(values, dtype=float), np.asarray(scored, dtype=int), np.asarray(b, dtype=float))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def fit_rasch(responses: np.ndarray, prior_sd: float = PRIOR_SD) -> tuple[np.ndarray, np.ndarray]:
    """(abilities per model, difficulties per item) of a Rasch model, P(right) = sigmoid(ability - difficulty),
    fitted to ``responses`` (models x items, each in [0, 1]) at the posterior mode under a normal prior on both.

    Alternating Newton steps, each a closed form per model and per item (the model's log-likelihood is concave
    in each block); the prior makes the fit unique and keeps items that every model gets right finite.
    """
    y = np.asarray(responses, dtype=float)
    theta, b = np.zeros(y.shape[0]), np.zeros(y.shape[1])
    tau = 1.0 / prior_sd ** 2
    for _ in range(NEWTON_STEPS):
        p = _sigmoid(theta[:, None] - b[None, :])
        w = p * (1 - p)
        step_theta = ((y - p).sum(axis=1) - tau * theta) / (w.sum(axis=1) + tau)
        theta = theta + step_theta
        p = _sigmoid(theta[:, None] - b[None, :])
        w = p * (1 - p)
        step_b = (-(y - p).sum(axis=0) - tau * b) / (w.sum(axis=0) + tau)
        b = b + step_b
        if max(np.abs(step_theta).max(), np.abs(step_b).max()) < 1e-9:
            break
    return theta, b


def ability(values: np.ndarray, difficulty: np.ndarray, prior_sd: float = PRIOR_SD) -> float:
    """A model's ability at the posterior mode from its ``values`` on items of the given ``difficulty``."""
    theta, tau = 0.0, 1.0 / prior_sd ** 2
    for _ in range(NEWTON_STEPS):
        p = _sigmoid(theta - difficulty)
        step = ((values - p).sum() - tau * theta) / ((p * (1 - p)).sum() + tau)
        theta += step
        if abs(step) < 1e-9:
            break
    return theta


def p_irt(values: np.ndarray, scored: np.ndarray, difficulty: np.ndarray) -> float:
    """The whole split's mean: the scored items as they scored, every other item at the probability the Rasch
    model gives it at the ability the scored items say."""
    theta = ability(values, difficulty[scored])
    rest = np.ones(len(difficulty), dtype=bool)
    rest[scored] = False
    return float((values.sum() + _sigmoid(theta - difficulty[rest]).sum()) / len(difficulty))


def calibrate(results: Sequence[ReferenceScores]) -> ItemCalibration:
    """Item difficulties per task and metric from the baselines' per-item results on every search item."""
    if not results:
        raise ValueError("calibrate needs at least one model's per-item results")
    difficulty: dict[str, dict[str, list[float]]] = {}
    for task, metrics in results[0].items.items():
        difficulty[task] = {}
        for m in metrics:
            rows = np.array([r.items[task][m] for r in results], dtype=float)
            _, b = fit_rasch(rows)
            difficulty[task][m] = [float(x) for x in b]
    return ItemCalibration(labels=tuple(r.label for r in results), difficulty=difficulty)

