"""The ``sampler`` config group turned into an Optuna sampler, and the pruner.

Why CMA-ES by default: a merge genome is a few dozen continuous, correlated
genes (a model's weight in layer 3 trades against its weight in layer 4 and
against the other models'), which is what CMA-ES adapts to. It is told about
pruned trials (their first look, put on the whole look's scale: see
``SearchLoop._first_look_offset``) so a generation is not held up waiting for
full evaluations it would never get.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Protocol

import optuna

from evomerge.errors import ConfigError


class SamplerConfig(Protocol):
    """What a sampler is made from: search/config.py's SamplerConfig (not imported: it imports SAMPLERS)."""

    name: str
    options: dict[str, Any]
    start: str


def _cmaes(seed: int, opts: dict[str, Any]) -> optuna.samplers.BaseSampler:
    opts = {"warn_independent_sampling": False, "consider_pruned_trials": True, **opts}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # x0 is deprecated in Optuna 4.9 (removal: 6.0)
        return optuna.samplers.CmaEsSampler(seed=seed, **opts)


def _tpe(seed: int, opts: dict[str, Any]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, **opts)


def _gp(seed: int, opts: dict[str, Any]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, **opts)


def _random(seed: int, opts: dict[str, Any]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed, **opts)


def _nsga2(seed: int, opts: dict[str, Any]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, **opts)


SAMPLERS: dict[str, Callable[[int, dict[str, Any]], optuna.samplers.BaseSampler]] = {
    "cmaes": _cmaes, "tpe": _tpe, "gp": _gp, "random": _random, "nsga2": _nsga2,
}
MULTI_OBJECTIVE = {"nsga2", "tpe", "random", "gp"}  # samplers that keep a Pareto front


def make_sampler(cfg: SamplerConfig, seed: int, start: dict[str, Any] | None = None) -> optuna.samplers.BaseSampler:
    """The configured sampler; CMA-ES (``start: best_baseline``) is centred on ``start`` when given.

    Why centre CMA-ES on the best baseline: it otherwise starts at the middle of the bounds, which for a
    merge genome is an arbitrary blend, and in a short budget never travels to the corner where a
    single strong specialist sits. Samplers that model every finished trial (TPE, GP) learn from the
    baselines anyway.
    """
    name, opts = cfg.name, dict(cfg.options)  # checked once, by search/config.py's parse_sampler
    if name == "cmaes" and cfg.start == "best_baseline" and start:
        opts.setdefault("x0", start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return SAMPLERS[name](seed, opts)
        except TypeError as exc:
            raise ConfigError(f"sampler.options for {name!r}: {exc}. Remove or rename the option.") from None


def make_pruner(enabled: bool, keep: float, startup_trials: int) -> optuna.pruners.BasePruner:
    """After the first look (step 0), keep a trial only if it is in the top ``keep`` percent of the first looks
    of the trials that went on (Optuna's PercentilePruner ranks against COMPLETE trials only). The bar rises
    as the survivors accumulate, so fewer than ``keep`` percent go on: 39 of 80 in a smol study at 75."""
    if not enabled:
        return optuna.pruners.NopPruner()
    return optuna.pruners.PercentilePruner(keep, n_startup_trials=startup_trials, n_warmup_steps=0)
