"""The genome: how a trial's parameters become a concrete mergekit recipe.

Everything here is a pure function of the search spec, the models and the
model's layer layout, so the same parameters always give the same recipe, and
the recipe the search scored is byte for byte the one that is exported.

Genes (Optuna parameter names):

* ``<source>.<param>[.<module>][.g<k>]`` — a per-model parameter (``weight``,
  ``density``) of one source model for layer group ``k`` (no ``.g`` suffix when
  there is a single group), optionally for one module filter (``self_attn``);
* ``<param>[.<module>][.g<k>]`` — a global numeric parameter (slerp's ``t``);
* ``...embed`` / ``...head`` — the embeddings' and the final norm + LM head's own
  genes, when ``edges: own``;
* ``<param>`` — a categorical gene (``normalize``): one value for the whole merge.

Every numeric parameter is written out as a list of exactly ``n_layers`` values
(a scalar when they are all equal). Under mergekit's gradient rule a list as long
as the layer count gives layer ``i`` exactly element ``i``. The tensors outside the
layers (embeddings, final norm, head) are never left to a gradient's endpoints:
mergekit 0.1.5 reads them all at ``t = 0``, so their values are stated as mergekit
``{filter, value}`` conditions whose filters are the full tensor names (which match
nothing else), and the exported recipe rebuilds the scored weights in mergekit and
``evomerge-merge`` alike. ``modules`` are conditions too.

Rules that are documented rather than searched:

* ``edges: follow`` — embeddings take the first layer's values, final norm and
  LM head the last layer's (mergekit's gradient endpoints);
* ``modules`` — tensors that match no module filter (layer norms, and under
  ``edges: follow`` the embeddings / head) take the mean of the module genes at
  their layer;
* ``interpolate: true`` — each group's gene sits at the group's centre layer and
  layers in between are interpolated linearly (constant beyond the end centres).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from evomerge.engine.recipe import Recipe, Source
from evomerge.errors import ConfigError
from evomerge.search.spec import GeneDef, SearchSpec

ROUND = 6  # decimals kept in recipes: the scored recipe and the exported one are the same text


@dataclass(frozen=True)
class Layout:
    """What the genome needs to know about the models' architecture."""

    n_layers: int
    pre: tuple[str, ...]          # non-layer tensors merged at t = 0 (embeddings)
    post: tuple[str, ...]         # non-layer tensors merged after the layers (final norm, LM head)
    layer_names: tuple[str, ...]  # every per-layer tensor name (to check module filters)


def layout_of(model_dir: str) -> Layout:
    """Read a model directory's layer count and tensor names (no tensor is loaded)."""
    from evomerge.checkpoints import open_checkpoint
    from evomerge.engine.plan import edge_tensors, layer_index, num_layers

    ckpt = open_checkpoint(model_dir)
    names = list(ckpt.tensor_names())
    pre, post = edge_tensors(names)
    return Layout(num_layers(ckpt), tuple(pre), tuple(post), tuple(n for n in names if layer_index(n) is not None))


class Genome:
    """Search space and decoder for one search over one set of models."""

    def __init__(self, spec: SearchSpec, sources: dict[str, str], base: str | None, layout: Layout, *,
                 seed: int = 0) -> None:
        from evomerge.methods import get_method

        self.spec = spec
        self.method = get_method(spec.method)
        self.layout = layout
        self.seed = seed
        n = layout.n_layers
        if n < 1:
            raise ConfigError("the models have no transformer layers that evomerge recognises; check config.json.")
        if spec.base_model is not None:  # a pair method: the base is one of the sources (slerp's t = 0 end)
            name = next(iter(sources)) if spec.base_model == "first" else spec.base_model
            if name not in sources:
                raise ConfigError(f"search.base_model = {name!r} is not among the sources {list(sources)}.")
            self.base = sources[name]
            self.base_name: str | None = name
            self.sources = dict(sources)
            self.merged = [s for s in sources if s != name]
        else:
            self.base = base if self.method.needs_base else None
            self.base_name = None
            self.sources = dict(sources)
            self.merged = list(sources)
        if self.method.needs_base and self.base is None:
            raise ConfigError(
                f"search.method {self.method.name!r} needs a base model (the model the others were fine-tuned from): "
                f"set models.base to its directory, or search.base_model to one of the sources."
            )
        m = self.method
        if len(self.merged) < m.min_models or (m.max_models is not None and len(self.merged) > m.max_models):
            raise ConfigError(
                f"search.sources: {m.name!r} merges {m.min_models}{'' if m.max_models == m.min_models else '+'} model(s) "
                f"besides the base, and this search lists {len(self.merged)} ({', '.join(self.merged)}); fix search.sources."
            )
        k = spec.layers_per_group or n
        self.groups = [list(range(s, min(s + k, n))) for s in range(0, n, k)]
        self.modules = spec.modules or []
        for mod in self.modules:
            if not any(mod in name for name in layout.layer_names):
                raise ConfigError(f"search.modules: {mod!r} matches no layer tensor of these models (names look like "
                                  f"{layout.layer_names[0]!r}); fix the filter or set modules: null.")
        if spec.edges == "own":
            every = (*layout.pre, *layout.post, *layout.layer_names)
            for edge in (*layout.pre, *layout.post):
                if sum(edge in other for other in every) != 1:
                    raise ConfigError(f"search.edges: own needs tensor {edge!r} to be a unique name filter; use edges: follow.")
        every = (*layout.pre, *layout.post, *layout.layer_names)
        self._edges_ok = all(sum(e in other for other in every) == 1 for e in (*layout.pre, *layout.post))
        self._dists = self._distributions()

    # ---- the space ---------------------------------------------------------------
    def _slots(self, owner: str | None, gene: GeneDef) -> list[str]:
        """Parameter names of one gene of one owner (a source, or None for a global gene)."""
        stem = gene.name if owner is None else f"{owner}.{gene.name}"
        if gene.categorical:
            return [stem]
        mods = [f".{m}" for m in self.modules] or [""]
        suffixes = [""] if len(self.groups) == 1 else [f".g{i}" for i in range(len(self.groups))]
        names = [f"{stem}{m}{g}" for m in mods for g in suffixes]
        if self.spec.edges == "own":
            names += [f"{stem}.embed", f"{stem}.head"]
        return names

    def _owners(self, gene: GeneDef) -> list[str | None]:
        return list(self.merged) if gene.per_model else [None]

    def _distributions(self) -> dict[str, BaseDistribution]:
        dists: dict[str, BaseDistribution] = {}
        for gene in self.spec.genes.values():
            for owner in self._owners(gene):
                for name in self._slots(owner, gene):
                    if gene.categorical:
                        dists[name] = CategoricalDistribution(list(gene.choices))  # type: ignore[arg-type]
                    else:
                        dists[name] = FloatDistribution(gene.low, gene.high, log=gene.log, step=gene.step)  # type: ignore[arg-type]
        return dists

    def distributions(self) -> dict[str, BaseDistribution]:
        return dict(self._dists)

    @property
    def dimension(self) -> int:
        return len(self._dists)

    # ---- decoding ------------------------------------------------------------------
    def _layer_values(self, params: dict[str, Any], stem: str) -> list[float]:
        """Per-layer values of one (owner, gene, module) from its group genes."""
        if len(self.groups) == 1:
            vals = [float(params[stem])]
        else:
            vals = [float(params[f"{stem}.g{i}"]) for i in range(len(self.groups))]
        out = [0.0] * self.layout.n_layers
        if self.spec.interpolate and len(vals) > 1:
            centres = [(g[0] + g[-1]) / 2 for g in self.groups]
            for i in range(len(out)):
                out[i] = _interp(i, centres, vals)
        else:
            for g, v in zip(self.groups, vals):
                for i in g:
                    out[i] = v
        return out

    def setting(self, params: dict[str, Any], owner: str | None, gene: GeneDef) -> Any:
        """The mergekit parameter value (scalar, per-layer list or conditions) of one gene."""
        stem = gene.name if owner is None else f"{owner}.{gene.name}"
        if gene.categorical:
            return params[stem]
        if self.modules:
            per_mod = {m: self._layer_values(params, f"{stem}.{m}") for m in self.modules}
            rest = [sum(vs) / len(vs) for vs in zip(*per_mod.values())]
        else:
            per_mod, rest = {}, self._layer_values(params, stem)
        conds: list[dict[str, Any]] = []
        if self.spec.edges == "own":
            conds += [{"filter": n, "value": _r(params[f"{stem}.embed"])} for n in self.layout.pre]
            conds += [{"filter": n, "value": _r(params[f"{stem}.head"])} for n in self.layout.post]
        elif self.modules or len(set(map(_r, rest))) > 1:  # follow: the first layer's / the last layer's values
            if not self._edges_ok:
                raise ConfigError(f"the tensors outside the layers ({', '.join((*self.layout.pre, *self.layout.post))}) "
                                  f"are not unique name filters, so per-layer values cannot state theirs; "
                                  f"use layers_per_group: global.")
            conds += [{"filter": n, "value": _r(rest[0])} for n in self.layout.pre]
            conds += [{"filter": n, "value": _r(rest[-1])} for n in self.layout.post]
        conds += [{"filter": m, "value": _compact(v)} for m, v in per_mod.items()]
        if not conds:
            return _compact(rest)
        return conds + [{"value": _compact(rest)}]

    def recipe(self, params: dict[str, Any], *, seed: int | None = None) -> Recipe:
        """The concrete recipe of one point of the space (any point: baselines need not lie inside the bounds)."""
        per_model: dict[str, dict[str, Any]] = {s: {} for s in self.merged}
        global_params: dict[str, Any] = dict(self.spec.parameters)
        for gene in self.spec.genes.values():
            if gene.per_model:
                for s in self.merged:
                    per_model[s][gene.name] = self.setting(params, s, gene)
            else:
                global_params[gene.name] = self.setting(params, None, gene)
        models = [Source(self.sources[s], per_model[s]) for s in self.merged]
        if self.base_name is not None:  # mergekit's slerp lists both ends under models
            models.insert(0, Source(self.sources[self.base_name], {}))
        return Recipe(
            merge_method=self.method.name,
            models=models,
            base_model=self.base,
            parameters=global_params,
            dtype="float32",
            seed=self.seed if seed is None else seed,
            random_mode=self.spec.random_mode,
            source_file=f"search {self.spec.name}",
        )

    def per_layer_table(self, params: dict[str, Any]) -> dict[str, list[float]]:
        """Row label -> per-layer values of every numeric gene (for the report's heatmap)."""
        rows: dict[str, list[float]] = {}
        for gene in self.spec.genes.values():
            if gene.categorical:
                continue
            for owner in self._owners(gene):
                stem = gene.name if owner is None else f"{owner}.{gene.name}"
                for mod in self.modules or [None]:
                    key = stem if mod is None else f"{stem}.{mod}"
                    rows[key] = self._layer_values(params, key)
        return rows

    # ---- baselines -----------------------------------------------------------------
    def _default(self, gene: GeneDef) -> Any:
        if gene.name in self.spec.textbook:
            return self.spec.textbook[gene.name]
        pdef = self.method.model_param(gene.name) or self.method.global_param(gene.name)
        if gene.categorical:
            return pdef.default if pdef is not None and pdef.default in gene.choices else gene.choices[0]  # type: ignore[index,operator]
        if pdef is not None and isinstance(pdef.default, (int, float)) and gene.low <= pdef.default <= gene.high:  # type: ignore[operator]
            return float(pdef.default)
        if gene.log:
            return math.sqrt(gene.low * gene.high)  # type: ignore[operator]
        return (gene.low + gene.high) / 2  # type: ignore[operator]

    def point(self, values: dict[str, dict[str | None, Any]]) -> dict[str, Any]:
        """Parameters giving every slot of gene g of owner o the value ``values[g][o]`` (owner None: all owners)."""
        params: dict[str, Any] = {}
        for gene in self.spec.genes.values():
            per_owner = values.get(gene.name, {})
            for owner in self._owners(gene):
                v = per_owner.get(owner, per_owner.get(None, self._default(gene)))
                for name in self._slots(owner, gene):
                    params[name] = v
        return params

    def baselines(self) -> dict[str, dict[str, Any]]:
        """Name -> parameters of the recipes a user would try by hand, in the order they are enqueued.

        ``alone:<source>`` reproduces one source model: weight 1 for it and 0 for the others with density 1
        (no trimming, no DARE rescaling: the merge is base + its task vector), or, for a pair method, the end
        of ``t`` that gives that model back. ``textbook`` is the method's published default (e.g. TIES with
        density 0.5 and equal weights), taken from ``search.textbook``.
        """
        out: dict[str, dict[str, Any]] = {}
        genes = self.spec.genes
        if "weight" in genes and genes["weight"].per_model:
            for s in self.merged:
                vals: dict[str, dict[str | None, Any]] = {"weight": {o: float(o == s) for o in self.merged}}
                if "density" in genes and not genes["density"].categorical:
                    vals["density"] = {None: 1.0}
                out[f"alone:{s}"] = self.point(vals)
        elif "t" in genes and not genes["t"].per_model and self.base_name is not None:
            out[f"alone:{self.base_name}"] = self.point({"t": {None: 0.0}})
            for s in self.merged:
                out[f"alone:{s}"] = self.point({"t": {None: 1.0}})
        out["textbook"] = self.point({})
        return out

    def fingerprint(self) -> str:
        """What must not change between a study and its resumption (the meaning of every parameter)."""
        blob = json.dumps({
            "method": self.method.name, "sources": self.sources, "base": self.base,
            "dists": {k: repr(v) for k, v in self._dists.items()}, "n_layers": self.layout.n_layers,
            "interpolate": self.spec.interpolate, "parameters": self.spec.parameters,
            "random_mode": self.spec.random_mode,
        }, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for j in range(len(xs) - 1):
        if xs[j] <= x <= xs[j + 1]:
            f = (x - xs[j]) / (xs[j + 1] - xs[j])
            return ys[j] + f * (ys[j + 1] - ys[j])
    return ys[-1]


def _r(v: Any) -> float:
    return round(float(v), ROUND) + 0.0  # + 0.0 turns -0.0 into 0.0


def _compact(values: list[float]) -> float | list[float]:
    vals = [_r(v) for v in values]
    return vals[0] if all(v == vals[0] for v in vals) else vals
