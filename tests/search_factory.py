"""The search tests' shared pieces: a small random model family and a TIES genome over it (no zoo, no lm-eval)."""
from __future__ import annotations

import copy

import optuna
import pytest
import torch

from evomerge.search.genome import Genome, layout_of
from evomerge.search.spec import parse_search
from model_factory import make_family

TIES = {
    "name": "t", "method": "ties", "layers_per_group": 1, "genes": {"weight": {"low": 0.0, "high": 1.0},
                                                                     "density": {"low": 0.1, "high": 1.0}},
    "parameters": {"normalize": True}, "textbook": {"weight": 1.0, "density": 0.5}, "n_trials": 8,
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = make_family(tmp_path_factory.mktemp("fam"), "llama", n_models=3, layers=4)
    return str(base), {f"m{i}": str(p) for i, p in enumerate(fts)}


def genome(family, **over):
    base, sources = family
    cfg = copy.deepcopy(TIES)
    cfg.update(over)
    return Genome(parse_search(cfg), sources, base, layout_of(base))


def _random_point(g: Genome, seed: int = 0) -> dict:
    rng = torch.Generator().manual_seed(seed)
    out = {}
    for name, d in g.distributions().items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            out[name] = d.choices[0]
        else:
            out[name] = d.low + float(torch.rand(1, generator=rng)) * (d.high - d.low)
    return out


class ConstantScorer:
    """Scores every candidate 0.5: for tests of the loop's bookkeeping, not of fitness."""

    def score(self, model, split, limit):
        from evomerge.search.fitness import Score

        return Score(values=[0.5], fitness=0.5, metrics={"t": {"acc": 0.5}}, seconds=0.001)

    def can_split(self, split):
        return False
