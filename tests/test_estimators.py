"""The item-response estimator's math (search/estimators.py): pure numpy, checked against what a Rasch model
means, on responses drawn from one with known parameters."""
from __future__ import annotations

import numpy as np
import pytest

from evomerge.search.estimators import Irt, Paired, _sigmoid, ability, calibrate, fit_rasch, p_irt
from evomerge.search.record import ReferenceScores


def _draw(n_models=12, n_items=300, seed=0):
    rng = np.random.default_rng(seed)
    theta, b = rng.normal(0, 1, n_models), rng.normal(0, 1.5, n_items)
    y = (rng.random((n_models, n_items)) < _sigmoid(theta[:, None] - b[None, :])).astype(float)
    return theta, b, y


def test_the_rasch_fit_recovers_the_difficulties_it_was_drawn_from():
    theta, b, y = _draw()
    got_theta, got_b = fit_rasch(y)
    assert np.corrcoef(got_b, b)[0, 1] > 0.8  # twelve models see each item: a noisy but faithful ranking
    assert np.corrcoef(got_theta, theta)[0, 1] > 0.95  # 300 items each: the abilities are well determined
    # at the mode the gradient of the log-posterior is zero in every coordinate
    p = _sigmoid(got_theta[:, None] - got_b[None, :])
    assert np.abs((y - p).sum(axis=1) - got_theta / 4).max() < 1e-6
    assert np.abs(-(y - p).sum(axis=0) - got_b / 4).max() < 1e-6


def test_items_every_model_gets_right_or_wrong_stay_finite_and_rank_at_the_ends():
    y = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 1, 0], [1, 1, 1, 1, 0]], dtype=float)
    _, b = fit_rasch(y)
    assert np.isfinite(b).all()
    assert b[0] == pytest.approx(b[3]) and b[0] < b[1] < b[2] < b[4]  # the easiest, then by how many got it


def test_the_estimate_is_the_mean_when_every_item_is_scored_and_an_ability_rises_with_right_answers():
    _, b, y = _draw(n_models=1)
    every = np.arange(len(b))
    assert p_irt(y[0], every, b) == pytest.approx(y[0].mean(), abs=1e-12)
    some = every[:40]
    low, high = np.zeros(40), np.ones(40)
    assert ability(low, b[some]) < ability(y[0][some], b[some]) < ability(high, b[some])


def test_on_a_model_of_the_same_kind_the_estimate_from_a_sample_beats_the_sample_mean():
    """Twelve baselines calibrate the items; new models drawn from the same Rasch model are estimated from
    30-item samples: the p-IRT estimate is nearer each one's mean over all 300 items than the sample mean."""
    theta, b, y = _draw(n_models=12)
    cal = calibrate([ReferenceScores(label=f"m{k}", items={"t": {"acc": list(row)}}) for k, row in enumerate(y)])
    est = Irt(cal)
    rng = np.random.default_rng(1)
    raw_err, irt_err = [], []
    for k in range(40):
        t = rng.normal(0, 1)
        right = (rng.random(300) < _sigmoid(t - b)).astype(float)
        scored = rng.choice(300, 30, replace=False)
        vals = right[scored]
        raw_err.append((vals.mean() - right.mean()) ** 2)
        irt_err.append((est.estimate("t", "acc", list(scored), vals.mean(), list(vals)) - right.mean()) ** 2)
    assert np.mean(irt_err) < 0.8 * np.mean(raw_err)


def test_an_estimator_without_what_it_needs_gives_the_mean():
    cal = calibrate([ReferenceScores(label="a", items={"t": {"acc": [1.0, 0.0, 1.0]}})])
    assert Irt(cal).estimate("other", "acc", [0], 0.5, [0.5]) == 0.5
    assert Irt(cal).estimate("t", "acc", [0], 0.5, None) == 0.5
    ref = ReferenceScores(label="a", items={"t": {"acc": [1.0, 0.0, 1.0, 0.0]}})
    assert Paired(ref).estimate("t", "acc", [0, 1], 0.5, None) == pytest.approx(0.5)
    assert Paired(ref).estimate("t", "acc", [0, 2], 1.0, None) == pytest.approx(0.5)  # an easy sample, put back
    with pytest.raises(ValueError):
        calibrate([])
