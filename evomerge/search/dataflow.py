"""The data-flow space (Sakana's evolutionary merge, second half): which source layer sits at which depth.

The output model is a sequence of up to ``r x L`` slots (``r = search.repeats``
passes over the source layer count ``L``). Slot ``(p, l)`` -- pass ``p``, layer
``l`` -- holds layer ``l`` of one of the sources or is skipped, so within a pass the
layers keep their order (Sakana's fixed ordering) and repeating a layer means
taking it again in a later pass. Each slot has a scale.

**Where the scale applies.** On the slot layer's output projections
(``self_attn.o_proj`` and ``mlp.down_proj``), i.e. on what the layer adds to the
residual stream. Why not on the residual stream's input, as Sakana did: that is a
module transformers' decoders do not have, so a merged model that needs it could
not be saved as a plain checkpoint, while a scaled output projection is a tensor
scaled by mergekit's passthrough ``scale`` -- the recipe replays in mergekit and
``evomerge-merge`` and the model loads anywhere. The two are close: the next
RMSNorm removes the stream's overall scale, so scaling the stream entering a
layer by ``s`` acts (up to the norm's epsilon) like scaling the outputs of that
layer and every later one by ``1 / s``; per-slot output scales reach the same
family of models.

**Encoding for Optuna's samplers** (a flat float vector, so CMA-ES, TPE, GP and
random search all work on it): per slot one logit per source,
``p<p>.l<l>.<source>`` in ``[-logit, logit]``, and ``p<p>.l<l>.scale`` in
``[scale.low, scale.high]`` (no scale genes with ``scale: null``). **Decoding:**
a slot holds the source with the largest logit (ties: the first listed) when that
logit is above 0, else it is skipped; when every slot is skipped the one slot
with the largest logit is kept, so every point of the space is a model. This is
Sakana's indicator-logit encoding (CMA-ES over ``I > 0``) with a source choice
per slot.

A decoded stack becomes a passthrough recipe with ``slices:``: runs of
consecutive layers of one source with one scale form one slice, a scaled slice's
source carries ``scale`` as filter conditions on the two projections. The scored
model is built from that recipe (:class:`evomerge.engine.stack.StackEngine`), so
the exported recipe is exactly what was scored.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, FloatDistribution

from evomerge.engine.recipe import Recipe, Slice, Source
from evomerge.errors import ConfigError
from evomerge.search.genome import ROUND, Layout
from evomerge.search.spec import SearchSpec, parse_search

SPACE = "dataflow"
SCALED = ("self_attn.o_proj", "mlp.down_proj")  # the layer's writes into the residual stream
KEYS = {"space", "repeats", "scale", "logit", "frankenmerge", "parameter_space"}
SHARED = {"name", "method", "sources", "n_trials", "limit", "pruning", "fresh_items", "estimator"}  # the keys every search has
PS_SOURCE = "ps"  # the source name of the parameter-space winner in a combined search


@dataclass(frozen=True)
class Slot:
    source: str   # source name
    layer: int    # its layer index
    scale: float


@dataclass
class DataflowSpec:
    """A data-flow search config: the shared search settings plus the space's own."""

    common: SearchSpec                       # name, sources, n_trials, limit, pruning (checked by parse_search)
    repeats: int
    scale: tuple[float, float] | None        # bounds of the per-slot scale; None: every scale is 1
    logit: float
    frankenmerge: tuple[str, str] | None     # the hand-set baseline's two sources (None: the first two)
    parameter_space: dict[str, Any] | None = None  # PS-then-DFS: {search: NAME, **overrides} run first

    def __getattr__(self, name: str) -> Any:  # the session reads n_trials, limit, pruning, ... from either spec
        if name == "common":
            raise AttributeError(name)
        return getattr(self.common, name)


def is_dataflow(cfg: dict[str, Any] | None) -> bool:
    return bool(cfg) and cfg.get("space") == SPACE  # type: ignore[union-attr]


def parse_dataflow(cfg: dict[str, Any]) -> DataflowSpec:
    """Check a ``space: dataflow`` search config; the shared keys go through :func:`parse_search`."""
    unknown = sorted(set(cfg) - KEYS - SHARED)
    if unknown:
        raise ConfigError(f"search.{unknown[0]} is not a data-flow search setting; valid keys are "
                          f"{', '.join(sorted(KEYS | SHARED))}.")
    own = {k: cfg[k] for k in KEYS if k in cfg}
    repeats = own.get("repeats", 2)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats <= 8:
        raise ConfigError(f"search.repeats = {repeats!r}: passes over the source layers (the output has up to "
                          f"repeats x layers slots), a whole number from 1 to 8.")
    scale = own.get("scale", {"low": 0.5, "high": 1.5})
    bounds: tuple[float, float] | None = None
    if scale is not None:
        if not isinstance(scale, dict) or set(scale) != {"low", "high"}:
            raise ConfigError("search.scale must be {low: L, high: H} (the per-slot scale of the output projections, "
                              "a range holding 1) or null (no scale genes).")
        lo, hi = scale["low"], scale["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not 0 <= lo <= 1 <= hi:
            raise ConfigError(f"search.scale = {scale}: needs numbers with 0 <= low <= 1 <= high, so that the "
                              f"unscaled source (scale 1) lies inside the space.")
        bounds = (float(lo), float(hi))
    logit = own.get("logit", 1.0)
    if not isinstance(logit, (int, float)) or isinstance(logit, bool) or logit <= 0:
        raise ConfigError(f"search.logit = {logit!r}: the logits' bound (each lies in [-logit, logit]), a number > 0.")
    fm = own.get("frankenmerge")
    if fm is not None and (not isinstance(fm, list) or len(fm) != 2 or not all(isinstance(x, str) for x in fm)):
        raise ConfigError(f"search.frankenmerge = {fm!r}: two source names (the hand-set interleaved baseline), or null.")
    ps = own.get("parameter_space")
    if isinstance(ps, str):
        ps = {"search": ps}
    if ps is not None and (not isinstance(ps, dict) or not isinstance(ps.get("search"), str)):
        raise ConfigError(f"search.parameter_space = {ps!r}: null, or the parameter-space search to run first (a "
                          f"conf/search name such as ties_math, or {{search: ties_math, n_trials: 40}} with overrides).")
    rest = {k: v for k, v in cfg.items() if k not in KEYS}
    if rest.get("method", "passthrough") != "passthrough" or rest.get("genes"):
        raise ConfigError("a data-flow search (space: dataflow) builds passthrough stacks: drop search.method and "
                          "search.genes (its genes are the slots' logits and scales).")
    # parse_search checks the shared keys (name, sources, n_trials, limit, pruning) with its messages; it wants a
    # gene, so it gets passthrough's scale as a placeholder: the data-flow genes are DataflowGenome's own
    rest.update(method="passthrough", genes={"scale": {"low": 0.0, "high": 2.0}}, name=rest.get("name") or SPACE)
    common = parse_search(rest)
    return DataflowSpec(common, repeats, bounds, float(logit), None if fm is None else (fm[0], fm[1]), ps)


class DataflowGenome:
    """Search space and decoder of one data-flow search (the interface of :class:`~evomerge.search.genome.Genome`)."""

    def __init__(self, spec: DataflowSpec, sources: dict[str, str], layout: Layout, *, seed: int = 0) -> None:
        if not sources:
            raise ConfigError("search.sources: a data-flow search needs at least one source model.")
        self.spec, self.sources, self.layout, self.seed = spec, dict(sources), layout, seed
        self.base = None
        self.n_layers = layout.n_layers
        if self.n_layers < 1:
            raise ConfigError("the models have no transformer layers that evomerge recognises; check config.json.")
        fm = spec.frankenmerge
        if fm is not None and any(s not in self.sources for s in fm):
            raise ConfigError(f"search.frankenmerge = {list(fm)} names a model that is not a source ({list(self.sources)}).")
        self.slots = [(p, l) for p in range(spec.repeats) for l in range(self.n_layers)]
        b = spec.logit
        self._dists: dict[str, BaseDistribution] = {}
        for p, l in self.slots:
            for s in self.sources:
                self._dists[f"p{p}.l{l}.{s}"] = FloatDistribution(-b, b)
            if spec.scale is not None:
                self._dists[f"p{p}.l{l}.scale"] = FloatDistribution(*spec.scale)

    def distributions(self) -> dict[str, BaseDistribution]:
        return dict(self._dists)

    @property
    def dimension(self) -> int:
        return len(self._dists)

    # ---- decoding ------------------------------------------------------------------
    def decode(self, params: dict[str, Any]) -> list[Slot]:
        """The layer sequence of one point (the module docstring states the rule)."""
        chosen: list[Slot] = []
        best: tuple[float, Slot] | None = None
        for p, l in self.slots:
            logits = [(float(params[f"p{p}.l{l}.{s}"]), s) for s in self.sources]
            top = max(v for v, _ in logits)
            src = next(s for v, s in logits if v == top)
            scale = _r(params.get(f"p{p}.l{l}.scale", 1.0))
            slot = Slot(src, l, scale)
            if top > 0:
                chosen.append(slot)
            if best is None or top > best[0]:
                best = (top, slot)
        return chosen or [best[1]]  # type: ignore[index]

    def recipe(self, params: dict[str, Any], *, seed: int | None = None) -> Recipe:
        return stack_recipe(self.decode(params), self.sources, seed=self.seed if seed is None else seed,
                            source_file=f"search {self.spec.name}")

    def per_layer_table(self, params: dict[str, Any]) -> dict[str, list[float]]:
        """No per-layer gene heatmap: the report draws the layer sequence (:meth:`sequence`) instead."""
        return {}

    def sequence(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The decoded stack as rows (output layer, source, source layer, scale), for the report."""
        return [{"out": i, "source": x.source, "layer": x.layer, "scale": x.scale}
                for i, x in enumerate(self.decode(params))]

    # ---- baselines -----------------------------------------------------------------
    def point(self, stack: list[Slot]) -> dict[str, Any]:
        """Parameters that decode to ``stack`` (each (pass, layer) slot used at most once, in order)."""
        params: dict[str, Any] = {}
        want: dict[tuple[int, int], Slot] = {}
        p = 0
        prev = -1
        for x in stack:
            if x.layer <= prev:
                p += 1
            if p >= self.spec.repeats:
                raise ConfigError(f"the stack {[(s.source, s.layer) for s in stack]} needs more than "
                                  f"search.repeats = {self.spec.repeats} passes.")
            want[(p, x.layer)] = x
            prev = x.layer
        b = self.spec.logit
        for p, l in self.slots:
            x = want.get((p, l))
            for s in self.sources:
                params[f"p{p}.l{l}.{s}"] = b if x is not None and x.source == s else -b
            if self.spec.scale is not None:
                params[f"p{p}.l{l}.scale"] = 1.0 if x is None else x.scale
        return params

    def baselines(self) -> dict[str, dict[str, Any]]:
        """``alone:<source>``: each source itself. ``frankenmerge:<a>+<b>``: the community's hand-set
        stack of two sources, depth up-scaling style (SOLAR, goliath): the first three quarters of ``a``'s
        layers, then ``b``'s layers from the first quarter on (needs ``repeats >= 2`` and two sources)."""
        L = self.n_layers
        out = {f"alone:{s}": self.point([Slot(s, l, 1.0) for l in range(L)]) for s in self.sources}
        pair = self.spec.frankenmerge or tuple(list(self.sources)[:2])
        if self.spec.repeats >= 2 and len(pair) == 2 and L >= 2:
            a, b = pair
            cut = max(1, (3 * L + 3) // 4)
            start = L - cut
            stack = [Slot(a, l, 1.0) for l in range(cut)] + [Slot(b, l, 1.0) for l in range(start, L)]
            out[f"frankenmerge:{a}+{b}"] = self.point(stack)
        return out

    def fingerprint(self) -> str:
        blob = json.dumps({"space": SPACE, "sources": self.sources, "n_layers": self.n_layers,
                           "dists": {k: repr(v) for k, v in self._dists.items()}, "scaled": SCALED},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stack_recipe(stack: list[Slot], sources: dict[str, str], *, seed: int = 0, source_file: str = "<stack>") -> Recipe:
    """A passthrough recipe with ``slices:``: one slice per run of consecutive layers of one source and scale."""
    runs: list[list[Slot]] = []
    for x in stack:
        last = runs[-1][-1] if runs else None
        if last is not None and (last.source, last.scale, last.layer + 1) == (x.source, x.scale, x.layer):
            runs[-1].append(x)
        else:
            runs.append([x])
    slices = []
    for run in runs:
        x = run[0]
        params = {} if x.scale == 1.0 else {
            "scale": [*({"filter": f, "value": x.scale} for f in SCALED), {"value": 1.0}]}
        slices.append(Slice([Source(sources[x.source], params, (x.layer, run[-1].layer + 1))]))
    return Recipe(merge_method="passthrough", slices=slices, dtype="float32", seed=seed, source_file=source_file)


def _r(v: Any) -> float:
    return round(float(v), ROUND) + 0.0
