"""The search config (``conf/search/*.yaml``) read and checked before any work starts.

Why a separate, eager check: a search runs for minutes to hours, and every
mistake a user can make in the YAML (a density bound above 1, a gene the method
does not have, a source the models group does not list) must surface in the
first second as one paragraph naming the key and the fix, never as a traceback
from trial 37.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import ConfigError, EvomergeError

EDGE_RULES = ("follow", "own")
RANDOM_MODES = ("common", "fresh")
ESTIMATORS = ("mean", "paired", "irt")


@dataclass(frozen=True)
class GeneDef:
    """One searched method parameter: a float range (optionally log / stepped) or a set of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    per_model: bool = True  # a per-model parameter (weight, density) or a global one (t, lambda)

    @property
    def categorical(self) -> bool:
        return self.choices is not None


@dataclass
class PruningSpec:
    enabled: bool = True
    looks: tuple[float, ...] = (0.25,)  # the steps before the whole look (config key ``first_look``): items per
                                        # task, each a fraction of the look's items or a count, rising
    keep: float = 75.0            # after each step go on only from the top `keep` % of that step's looks of trials that went on
    startup_trials: int = 5       # completed trials before any pruning

    @property
    def first_look(self) -> float:
        return self.looks[0]


@dataclass
class SearchSpec:
    name: str
    method: str
    sources: list[str] | None
    base_model: str | None        # None: the models group's base; 'first' or a name: one of the sources
    layers_per_group: int | None  # None = one value per model for all layers ('global')
    interpolate: bool
    modules: list[str] | None
    edges: str
    genes: dict[str, GeneDef]
    parameters: dict[str, Any]
    textbook: dict[str, Any]
    n_trials: int
    limit: float | None
    random_mode: str
    pruning: PruningSpec = field(default_factory=PruningSpec)
    fresh_items: int | None = None  # None: every trial scores the same items; N: a fresh sample every N trials
    estimator: str = "mean"         # mean: a look's score is its items' mean; paired / irt: put on the whole
                                    # split's scale by the baselines' per-item results (search/estimators.py)


def _where(key: str) -> str:
    return f"search.{key}"


def _num(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{_where(key)} must be a number, got {value!r}; fix it in the search config or override it.")
    return float(value)


def parse_search(cfg: dict[str, Any] | None) -> SearchSpec:
    """Check a ``search`` config mapping against the merge method it names."""
    from evomerge.methods import get_method

    if not cfg:
        raise ConfigError(
            "no search selected: run e.g. `evomerge +search=auto_math` (groups: auto_math, ties_math, dare_ties_math, "
            "task_arithmetic_math, slerp_pair, or your own conf/search/NAME.yaml)."
        )
    known = {"name", "method", "sources", "base_model", "layers_per_group", "interpolate", "modules", "edges",
             "genes", "parameters", "textbook", "n_trials", "limit", "random_mode", "pruning", "fresh_items",
             "estimator"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"{_where(unknown[0])} is not a search setting; valid keys are {', '.join(sorted(known))}.")
    if not cfg.get("method"):
        raise ConfigError(f"{_where('method')} is missing: name a merge method, e.g. `method: ties`.")
    try:
        method = get_method(str(cfg["method"]))
    except EvomergeError as exc:
        raise ConfigError(f"{_where('method')}: {exc}") from None

    lpg = cfg.get("layers_per_group", 1)
    if lpg in ("global", None):
        layers_per_group = None
    elif isinstance(lpg, int) and not isinstance(lpg, bool) and lpg >= 1:
        layers_per_group = lpg
    else:
        raise ConfigError(f"{_where('layers_per_group')} = {lpg!r}: use a whole number >= 1 (layers per gene) or 'global'.")

    edges = cfg.get("edges", "follow")
    if edges not in EDGE_RULES:
        raise ConfigError(f"{_where('edges')} = {edges!r}: use 'follow' (embeddings follow the first layer group, final "
                          f"norm and head the last) or 'own' (their own genes).")
    modules = cfg.get("modules")
    if modules is not None and (not isinstance(modules, list) or not modules or
                                not all(isinstance(m, str) and m for m in modules)):
        raise ConfigError(f"{_where('modules')} must be null or a list of tensor-name substrings, e.g. [self_attn, mlp].")

    genes: dict[str, GeneDef] = {}
    raw_genes = cfg.get("genes") or {}
    if not isinstance(raw_genes, dict) or not raw_genes:
        raise ConfigError(f"{_where('genes')} must map at least one parameter of {method.name!r} to its bounds, "
                          f"e.g. `genes: {{weight: {{low: 0.0, high: 1.0}}}}`.")
    for name, g in raw_genes.items():
        genes[name] = _gene(name, g, method)

    parameters = dict(cfg.get("parameters") or {})
    for name, value in parameters.items():
        pdef = method.global_param(name) or method.model_param(name)
        if pdef is None:
            raise ConfigError(f"{_where('parameters.' + name)}: {method.name!r} has no parameter {name!r}; "
                              f"its parameters are {_param_names(method)}.")
        if name in genes:
            raise ConfigError(f"{_where('parameters.' + name)} is also a gene; give it either a fixed value or bounds.")
        _check_value(pdef, value, f"parameters.{name}")
    for p in (*method.model_params, *method.global_params):
        if p.required and p.name not in genes and p.name not in parameters:
            raise ConfigError(f"{_where('genes')}: {method.name!r} needs {p.name!r}; add it as a gene "
                              f"(`genes.{p.name}: {{low: ..., high: ...}}`) or fix it under search.parameters.")

    textbook = dict(cfg.get("textbook") or {})
    for name, value in textbook.items():
        if name not in genes:
            raise ConfigError(f"{_where('textbook.' + name)}: {name!r} is not a gene; textbook values are given for genes only.")
        g = genes[name]
        if g.categorical:
            if value not in g.choices:  # type: ignore[operator]
                raise ConfigError(f"{_where('textbook.' + name)} = {value!r} is not one of its choices {list(g.choices)}.")  # type: ignore[arg-type]
        else:
            pdef = method.global_param(name) or method.model_param(name)
            _check_value(pdef, value, f"textbook.{name}")

    sources = cfg.get("sources")
    if sources is not None and (not isinstance(sources, list) or not all(isinstance(s, str) for s in sources) or not sources):
        raise ConfigError(f"{_where('sources')} must be null (every model of the models group) or a list of their names.")
    base_model = cfg.get("base_model")
    if base_model is not None and base_model != "first" and (sources is None or base_model not in sources):
        raise ConfigError(f"{_where('base_model')} = {base_model!r} must be one of search.sources (the model that t = 0 "
                          f"gives back), 'first' (the first source), or null to use the models group's base.")
    n_trials = cfg.get("n_trials", 40)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ConfigError(f"{_where('n_trials')} = {n_trials!r}: the whole trial budget, baselines included, a whole number >= 1.")
    limit = cfg.get("limit")
    if limit is not None and (_num(limit, "limit") <= 0 or float(limit) == 1):
        # 1 would be one item per task (a count, as in lm-eval), which ranks nothing: most likely "all" was meant
        raise ConfigError(f"{_where('limit')} = {limit!r}: items per task at search time, a count (> 1) or a share "
                          f"(< 1); 1 would be a single item per task, not every item: for every item set null.")
    random_mode = cfg.get("random_mode", "common")
    if random_mode not in RANDOM_MODES:
        raise ConfigError(f"{_where('random_mode')} = {random_mode!r}: use 'common' (one mask seed for every trial) or 'fresh'.")
    pruning = _pruning(dict(cfg.get("pruning") or {}))
    fresh = cfg.get("fresh_items")
    if fresh is not None and (isinstance(fresh, bool) or not isinstance(fresh, int) or fresh < 1):
        raise ConfigError(f"{_where('fresh_items')} = {fresh!r}: null (every trial scores the same search items) or a "
                          f"whole number N >= 1 (a fresh sample of the search split every N trials: a generation).")
    if fresh is not None and limit is None:
        raise ConfigError(f"{_where('fresh_items')} = {fresh} draws fresh samples of search.limit items, but search.limit "
                          f"is null (every item, every time): set search.limit below the search split's size, or "
                          f"fresh_items to null.")
    estimator = cfg.get("estimator", "mean")
    if estimator not in ESTIMATORS:
        raise ConfigError(f"{_where('estimator')} = {estimator!r}: use 'mean' (a look scores its items' mean), "
                          f"'paired' (put on the whole search split's scale by a baseline's per-item results) or 'irt' "
                          f"(by an item response model fitted to every baseline's per-item results).")
    return SearchSpec(
        name=str(cfg.get("name") or method.name), method=method.name, sources=sources, base_model=base_model,
        layers_per_group=layers_per_group, interpolate=bool(cfg.get("interpolate", False)), modules=modules,
        edges=edges, genes=genes, parameters=parameters, textbook=textbook, n_trials=n_trials,
        limit=None if limit is None else float(limit), random_mode=random_mode, pruning=pruning, fresh_items=fresh,
        estimator=estimator,
    )


def _pruning(pr: dict[str, Any]) -> PruningSpec:
    bad = sorted(set(pr) - {"enabled", "first_look", "keep", "startup_trials"})
    if bad:
        raise ConfigError(f"{_where('pruning.' + bad[0])} is unknown; pruning takes enabled, first_look, keep, startup_trials.")
    looks = pr.get("first_look", PruningSpec.looks)
    looks = list(looks) if isinstance(looks, (list, tuple)) else [looks]
    where = _where("pruning.first_look")
    steps = [_num(x, "pruning.first_look") for x in looks]
    fractions = all(0 < x < 1 for x in steps)
    if not steps or not (fractions or all(x >= 1 and x == int(x) for x in steps)) or steps != sorted(set(steps)):
        raise ConfigError(f"{where} = {looks!r}: the items of the first look, a fraction of the look's items (0.25) or a "
                          f"count (40); or the steps of successive looks, rising and all of one kind, e.g. "
                          f"[0.125, 0.25, 0.5] (with keep: 50, successive halving).")
    keep = _num(pr.get("keep", PruningSpec.keep), "pruning.keep")
    if not 0 < keep < 100:
        raise ConfigError(f"{_where('pruning.keep')} (percent of trials that go on after each look) must lie strictly "
                          f"between 0 and 100.")
    startup = pr.get("startup_trials", PruningSpec.startup_trials)
    if isinstance(startup, bool) or not isinstance(startup, int) or startup < 0:
        raise ConfigError(f"{_where('pruning.startup_trials')} = {startup!r}: completed trials before any pruning, a "
                          f"whole number >= 0.")
    return PruningSpec(enabled=bool(pr.get("enabled", True)), looks=tuple(steps), keep=keep, startup_trials=startup)


def _param_names(method: Any) -> str:
    return ", ".join(p.name for p in (*method.model_params, *method.global_params)) or "(none)"


def _check_value(pdef: Any, value: Any, key: str) -> None:
    try:
        pdef.check(value, _where(key))
    except EvomergeError as exc:
        raise ConfigError(str(exc).replace("fix the value in the recipe", "fix it in the search config")) from None


def _gene(name: str, g: Any, method: Any) -> GeneDef:
    key = f"genes.{name}"
    pdef = method.model_param(name)
    per_model = pdef is not None
    pdef = pdef or method.global_param(name)
    if pdef is None:
        raise ConfigError(f"{_where(key)}: {method.name!r} has no parameter {name!r}; its parameters are {_param_names(method)}.")
    if not isinstance(g, dict):
        raise ConfigError(f"{_where(key)} must be a mapping: {{low: L, high: H}} (optionally log, step) or {{choices: [...]}}.")
    bad = sorted(set(g) - {"low", "high", "log", "step", "choices"})
    if bad:
        raise ConfigError(f"{_where(key + '.' + bad[0])} is unknown; a gene takes low, high, log, step or choices.")
    if "choices" in g:
        choices = g["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{_where(key + '.choices')} must be a non-empty list.")
        for c in choices:
            _check_value(pdef, c, f"{key}.choices")
        # A categorical value cannot vary across layers (mergekit gradients are numeric): one value per merge.
        return GeneDef(name, choices=tuple(choices), per_model=False)
    if pdef.kind is not float:
        raise ConfigError(f"{_where(key)}: {name!r} is a {pdef.kind.__name__} parameter; search it with `choices: [...]`.")
    if "low" not in g or "high" not in g:
        raise ConfigError(f"{_where(key)} needs both low and high.")
    low, high = _num(g["low"], key + ".low"), _num(g["high"], key + ".high")
    if not low < high:
        raise ConfigError(f"{_where(key)}: low ({low}) must be below high ({high}).")
    for bound, v in (("low", low), ("high", high)):
        if (pdef.low is not None and v < pdef.low) or (pdef.high is not None and v > pdef.high):
            lo = "-inf" if pdef.low is None else pdef.low
            hi = "inf" if pdef.high is None else pdef.high
            raise ConfigError(f"{_where(key + '.' + bound)} = {v} is outside the valid range of {name!r}, [{lo}, {hi}]; "
                              f"set search.{key}.{bound} inside it.")
    log = bool(g.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{_where(key)}: log: true needs low > 0.")
    step = g.get("step")
    if step is not None and (log or _num(step, key + ".step") <= 0):
        raise ConfigError(f"{_where(key + '.step')} must be > 0 and cannot be combined with log.")
    return GeneDef(name, low=low, high=high, log=log, step=None if step is None else float(step), per_model=per_model)
