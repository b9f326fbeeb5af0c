"""The method is a gene: one search over several merge methods, each with its own genes (``space: auto``).

A search config with ``space: auto`` (``conf/search/auto_math.yaml``) lists the method gene's choices under
``methods`` and, under ``per_method.<method>``, each method's own genes, fixed parameters, textbook recipe and
``base_model`` rule: the keys of a one-method search config, which is what an entry is (auto_math takes
ties_math's, task_arithmetic_math's, ... through its defaults list, so their textbook recipes are stated
once). The keys every search shares (sources, layer groups, modules, edges, n_trials, limit, random_mode,
pruning) are the auto search's own, at its top level; an entry's copies of them are not read.

Each method's space and decoder is the one-method :class:`~evomerge.search.genome.Genome` of its entry, so
a point of the space decodes to that method's ordinary recipe, byte for byte what the one-method search of
the same genes would write: ``evomerge-export``, ``evomerge-merge`` and ``mergekit-yaml`` replay it as is.
A method that cannot merge this search's sources (slerp and nuslerp merge exactly two models, model_stock at
least two) is left out of the choices (:attr:`AutoGenome.left_out` says why).

Two encodings (``search.encoding``), both pure functions of the trial's parameters:

* ``conditional`` (define-by-run): the categorical ``method``, then only that method's genes,
  ``<method>/<gene>`` (the gene names of its one-method genome). TPE (run with ``group: true``, Optuna's
  decomposition of a conditional space into the groups of parameters that occur together), GP and random
  search model it; CMA-ES cannot (Optuna's CMA-ES leaves categorical and conditional parameters to its
  independent sampler, i.e. random), so ``sampler=cmaes`` with ``encoding: conditional`` is refused.
* ``flat``: one logit per method, ``method.<method>`` in [0, 1], the largest picking the method (ties: the
  first listed), and every method's genes always present (a categorical gene as a float in [0, 1]: choice
  ``floor(x * n)``). Every parameter is a float, so CMA-ES adapts to all of them; the genes of the methods
  not chosen are carried along unused.
* ``auto`` (the default): flat under CMA-ES, conditional under every other sampler.

Baselines: every source alone (in the first listed method that expresses it, task_arithmetic by default:
weight 1 for the source, 0 for the others), then ``textbook:<method>`` for every method, each entry's
``textbook``. In the flat encoding a baseline's logits are 0.6 for its method and 0.4 for the others, and the
other methods' genes sit at their textbook values: CMA-ES starts at the best baseline with a step of a sixth of
each (normalised) range, so from logits 1 / 0 its first samples would all keep that baseline's method (9,998 in
10,000 with 12 methods, simulated), from 0.6 / 0.4 about 37 % keep it and the rest try another.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from evomerge.engine.recipe import Recipe, Source
from evomerge.errors import ConfigError, EvomergeError
from evomerge.search.genome import Genome, Layout
from evomerge.search.spec import SearchSpec, parse_search

SPACE = "auto"
ENCODINGS = ("auto", "conditional", "flat")
KEYS = {"space", "methods", "per_method", "encoding"}
SHARED = {"name", "sources", "layers_per_group", "interpolate", "modules", "edges", "n_trials", "limit",
          "random_mode", "pruning", "fresh_items", "estimator"}
OWN = ("method", "genes", "parameters", "textbook", "base_model")  # what a per_method entry contributes
ENTRY_KEYS = SHARED | set(OWN)  # an entry is a one-method search config; its shared keys are not read
METHOD = "method"         # the conditional encoding's categorical gene
LOGIT = "method."         # the flat encoding's logits: method.<name>
SEP = "/"                 # a method's genes: <method>/<its genome's gene name>
ON, OFF = 0.6, 0.4        # a flat baseline's logits (module docstring)


@dataclass
class AutoSpec:
    """A method-gene search config: the shared settings, the method choices and each method's one-method spec."""

    common: SearchSpec                       # name, sources, n_trials, limit, pruning, ... (the first method's spec)
    methods: tuple[str, ...]
    per_method: dict[str, SearchSpec]
    encoding: str                            # auto | conditional | flat (auto is settled by resolve_encoding)
    method: str = SPACE                      # what the summary and the report name as the method: auto (...)

    def __getattr__(self, name: str) -> Any:  # the session reads n_trials, limit, pruning, ... from either spec
        if name == "common":
            raise AttributeError(name)
        return getattr(self.common, name)


def is_auto(cfg: dict[str, Any] | None) -> bool:
    return bool(cfg) and cfg.get("space") == SPACE  # type: ignore[union-attr]


def parse_auto(cfg: dict[str, Any]) -> AutoSpec:
    """Check a ``space: auto`` search config; each method's entry goes through :func:`parse_search`."""
    from evomerge.methods import get_method, method_names

    unknown = sorted(set(cfg) - KEYS - SHARED)
    if unknown:
        raise ConfigError(f"search.{unknown[0]} is not a method-gene search setting (space: auto); valid keys are "
                          f"{', '.join(sorted(KEYS | SHARED))}. A method's genes go under search.per_method.METHOD.")
    methods = cfg.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods) \
            or len(set(methods)) != len(methods):
        raise ConfigError(f"search.methods = {methods!r}: the method gene's choices, a list of distinct merge method "
                          f"names, e.g. [task_arithmetic, ties, linear].")
    for m in methods:
        try:
            get_method(m)
        except EvomergeError:
            raise ConfigError(f"search.methods: {m!r} is not a merge method; known: {', '.join(method_names())}.") from None
    encoding = cfg.get("encoding", "auto")
    if encoding not in ENCODINGS:
        raise ConfigError(f"search.encoding = {encoding!r}: use conditional (the method, then only its genes: TPE, GP, "
                          f"random), flat (a logit per method and every method's genes: CMA-ES) or auto (flat under "
                          f"CMA-ES, else conditional).")
    entries = cfg.get("per_method") or {}
    if not isinstance(entries, dict):
        raise ConfigError("search.per_method must map each method of search.methods to its genes, parameters and "
                          "textbook, e.g. {linear: {genes: {weight: {low: 0.0, high: 1.0}}, textbook: {weight: 1.0}}}.")
    shared = {k: cfg[k] for k in SHARED if k in cfg}
    per_method: dict[str, SearchSpec] = {}
    for m in methods:
        entry = entries.get(m)
        where = f"search.per_method.{m}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is missing: give {m!r} its genes, fixed parameters and textbook recipe there "
                              f"(as a one-method search config does), or drop it from search.methods.")
        bad = sorted(set(entry) - ENTRY_KEYS)
        if bad:
            raise ConfigError(f"{where}.{bad[0]} is not a search setting; an entry takes {', '.join(OWN)} (the "
                              f"shared settings are the auto search's own, at search.*).")
        if entry.get("method", m) != m:
            raise ConfigError(f"{where}.method = {entry['method']!r}: the entry of {m!r} must be {m!r}'s "
                              f"(drop the key, or move the entry to search.per_method.{entry['method']}).")
        sub = {**shared, **{k: entry[k] for k in OWN if k in entry}, "method": m,
               "name": f"{cfg.get('name') or SPACE}{SEP}{m}"}
        try:
            per_method[m] = parse_search(sub)
        except ConfigError as exc:
            text = str(exc)
            for k in OWN:
                text = text.replace(f"search.{k}", f"{where}.{k}")
            raise ConfigError(text) from None
    common = dataclasses.replace(per_method[methods[0]], name=str(cfg.get("name") or SPACE))
    return AutoSpec(common, tuple(methods), per_method, str(encoding), method=f"{SPACE} ({', '.join(methods)})")


def resolve_encoding(raw: dict[str, Any], sampler: str) -> None:
    """Settle ``search.encoding: auto`` for ``sampler`` in the composed config (before the study stores it, so a
    later export rebuilds the same genome), refuse CMA-ES over the conditional encoding, and run TPE over a
    conditional space with ``group: true`` unless its options say otherwise."""
    search = raw["search"]
    encoding = search.get("encoding", "auto")
    if encoding == "auto":
        encoding = "flat" if sampler == "cmaes" else "conditional"
    if sampler == "cmaes" and encoding == "conditional":
        raise ConfigError("search.encoding = conditional under sampler=cmaes: Optuna's CMA-ES leaves categorical and "
                          "conditional parameters to its independent (random) sampler, so it would not search the "
                          "method or its genes. Use search.encoding=flat (a logit per method) or another sampler "
                          "(sampler=tpe).")
    search["encoding"] = encoding
    if sampler == "tpe" and encoding == "conditional":
        sampler_cfg = raw.setdefault("sampler", {})
        opts = sampler_cfg.get("options") or {}
        if opts.get("multivariate"):
            sampler_cfg["options"] = {"group": True, **opts}


class AutoGenome:
    """Search space and decoder of a method-gene search (the interface of :class:`~evomerge.search.genome.Genome`)."""

    def __init__(self, spec: AutoSpec, sources: dict[str, str], base: str | None, layout: Layout, *,
                 seed: int = 0) -> None:
        from evomerge.methods import get_method

        if base is None:
            raise ConfigError("a method-gene search (space: auto) keeps the base model and every source's task vector "
                              "resident for all its methods: set models.base to the base the sources were fine-tuned "
                              "from (the tiny and smol zoos have one).")
        if spec.encoding == "auto":
            raise ValueError("resolve_encoding settles search.encoding before the genome is built")
        self.spec, self.sources, self.base, self.layout, self.seed = spec, dict(sources), base, layout, seed
        self.conditional = spec.encoding == "conditional"
        self.genomes: dict[str, Genome] = {}
        self.left_out: dict[str, str] = {}
        for m in spec.methods:
            sub = spec.per_method[m]
            method = get_method(m)
            merged = len(sources) - (sub.base_model is not None)
            if merged < method.min_models or (method.max_models is not None and merged > method.max_models):
                want = (f"exactly {method.min_models}" if method.max_models == method.min_models
                        else f"at least {method.min_models}")
                given = (f"{merged} ({len(sources)} sources, one of them its base_model)" if sub.base_model is not None
                         else str(merged))
                self.left_out[m] = f"it merges {want} model(s) besides its base, and this search gives it {given}"
                continue
            self.genomes[m] = Genome(sub, sources, base, layout, seed=seed)
        self.methods = tuple(self.genomes)
        if not self.methods:
            raise ConfigError(f"search.methods: none of {list(spec.methods)} can merge these {len(sources)} sources ("
                              + "; ".join(f"{m}: {why}" for m, why in self.left_out.items()) + ").")
        self._sub: dict[str, dict[str, BaseDistribution]] = {m: g.distributions() for m, g in self.genomes.items()}
        self._dists = self._distributions()

    # ---- the space -------------------------------------------------------------------
    def _distributions(self) -> dict[str, BaseDistribution]:
        dists: dict[str, BaseDistribution] = {}
        if self.conditional:
            dists[METHOD] = CategoricalDistribution(list(self.methods))
        else:
            dists.update({f"{LOGIT}{m}": FloatDistribution(0.0, 1.0) for m in self.methods})
        for m, sub in self._sub.items():
            for name, d in sub.items():
                flat = not self.conditional and isinstance(d, CategoricalDistribution)
                dists[f"{m}{SEP}{name}"] = FloatDistribution(0.0, 1.0) if flat else d
        return dists

    def distributions(self) -> dict[str, BaseDistribution]:
        """Every parameter of the space (conditional: the union over the methods; a trial holds one method's)."""
        return dict(self._dists)

    @property
    def dimension(self) -> int:
        return len(self._dists)

    def suggest(self, trial: Any) -> None:
        """Define-by-run (the conditional encoding): the method, then only its genes."""
        m = trial.suggest_categorical(METHOD, list(self.methods))
        for name, d in self._sub[m].items():
            key = f"{m}{SEP}{name}"
            if isinstance(d, CategoricalDistribution):
                trial.suggest_categorical(key, list(d.choices))
            else:
                assert isinstance(d, FloatDistribution)
                trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)

    # ---- decoding --------------------------------------------------------------------
    def chosen(self, params: dict[str, Any]) -> str:
        """The method a point picks: its ``method`` (conditional), else the largest logit (ties: the first listed)."""
        if self.conditional:
            return str(params[METHOD])
        logits = [float(params[f"{LOGIT}{m}"]) for m in self.methods]
        return self.methods[logits.index(max(logits))]

    def sub_params(self, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(the chosen method, its genome's parameters) of one point."""
        m = self.chosen(params)
        out = {}
        for name, d in self._sub[m].items():
            v = params[f"{m}{SEP}{name}"]
            if not self.conditional and isinstance(d, CategoricalDistribution):
                v = d.choices[min(int(float(v) * len(d.choices)), len(d.choices) - 1)]
            out[name] = v
        return m, out

    def recipe(self, params: dict[str, Any], *, seed: int | None = None) -> Recipe:
        """The chosen method's ordinary recipe (its one-method genome's decoding of its genes)."""
        m, sub = self.sub_params(params)
        r = self.genomes[m].recipe(sub, seed=seed)
        r.source_file = f"search {self.spec.name} ({m})"
        return r

    def per_layer_table(self, params: dict[str, Any]) -> dict[str, list[float]]:
        m, sub = self.sub_params(params)
        return {f"{m}{SEP}{k}": v for k, v in self.genomes[m].per_layer_table(sub).items()}

    # ---- baselines and the engine ----------------------------------------------------
    def encode(self, m: str, sub: dict[str, Any]) -> dict[str, Any]:
        """The parameters of the point that decodes to method ``m`` with its genome's parameters ``sub``."""
        if self.conditional:
            return {METHOD: m, **{f"{m}{SEP}{k}": v for k, v in sub.items()}}
        params: dict[str, Any] = {f"{LOGIT}{o}": ON if o == m else OFF for o in self.methods}
        for o, g in self.genomes.items():
            values = sub if o == m else g.baselines()["textbook"]
            for name, d in self._sub[o].items():
                v = values[name]
                if isinstance(d, CategoricalDistribution):
                    v = (list(d.choices).index(v) + 0.5) / len(d.choices)
                params[f"{o}{SEP}{name}"] = v
        return params

    def baselines(self) -> dict[str, dict[str, Any]]:
        """``alone:<source>`` (in the first listed method that expresses it), then ``textbook:<method>``."""
        out: dict[str, dict[str, Any]] = {}
        for m, g in self.genomes.items():
            alone = {k: v for k, v in g.baselines().items() if k.startswith("alone:")}
            if alone:
                out.update({k: self.encode(m, v) for k, v in alone.items()})
                break
        for m, g in self.genomes.items():
            out[f"textbook:{m}"] = self.encode(m, g.baselines()["textbook"])
        return out

    def structure_recipe(self) -> Recipe:
        """The recipe the engine is prepared with (the base and every source, as task vectors): the first
        method's textbook recipe over all of them, else task arithmetic's."""
        paths = [self.sources[s] for s in self.sources]
        for g in self.genomes.values():
            r = g.recipe(g.baselines()["textbook"])
            if r.base_model == self.base and [s.model for s in r.models] == paths:
                return r
        return Recipe(merge_method="task_arithmetic", models=[Source(p, {"weight": 1.0}) for p in paths],
                      base_model=self.base, dtype="float32", seed=self.seed, random_mode=self.spec.random_mode,
                      source_file=f"search {self.spec.name}")

    def fingerprint(self) -> str:
        blob = json.dumps({"space": SPACE, "methods": self.methods, "encoding": self.spec.encoding,
                           "genomes": {m: g.fingerprint() for m, g in self.genomes.items()},
                           "dists": {k: repr(v) for k, v in self._dists.items()}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

