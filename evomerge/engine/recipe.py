"""Merge recipes in mergekit's YAML format.

A user's existing mergekit config runs unchanged, and every recipe evomerge
writes replays in mergekit. Two shapes exist, as in mergekit:

* ``models:`` — every model contributes every layer (one implicit slice);
* ``slices:`` — each output slice lists ``sources`` with a ``layer_range``.

Parameter values follow mergekit's rules (:func:`evaluate_setting`): a scalar;
a list of numbers interpolated across a slice's layers ("gradient": position
``t = i / (n - 1)``, 1 in a one-layer slice; embeddings, final norm and head at
``t = 0``, as mergekit 0.1.5 plans them);
or a list of ``{filter: substring, value: ...}`` conditions matched against the
tensor name, the first match winning and a condition without filter matching all.

``dtype`` is the compute dtype, as in mergekit: every input tensor is rounded to
it and the method computes in it (methods that mergekit 0.1.5 computes in float32
whatever the inputs, linear and SLERP, do so here too); without it, the inputs'
stored dtype. ``out_dtype`` is the storage dtype (default: the compute dtype).

``tokenizer_source`` (or a ``tokenizer:`` block: ``source``, default ``union``; ``tokens``;
``pad_to_multiple_of``) gives the output its vocabulary and re-lays the embedding and head rows on it
(:mod:`evomerge.engine.vocab`); ``chat_template`` sets the output tokenizer's template
(:mod:`evomerge.engine.chat_templates`).

evomerge-only settings live under a top-level ``evomerge:`` key that
:meth:`Recipe.to_mergekit` leaves out: the random seed of DARE/DELLA masks and how
they are drawn (``seed``, ``random_mode``), and ``compute_dtype: float32``, which
computes in float32 whatever ``dtype`` says (more exact than mergekit, and then no
longer what mergekit computes: an explicit choice).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from evomerge.checkpoints.writer import parse_dtype
from evomerge.engine.chat_templates import check_chat_template
from evomerge.engine.vocab import TokenSource, parse_tokens
from evomerge.errors import CheckpointError, RecipeError

Setting = Any  # float | bool | str | list[float] | list[dict]


@dataclass
class Source:
    """One model contributing to a slice (or, in ``models:`` form, to everything)."""

    model: str
    parameters: dict[str, Setting] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass
class Slice:
    sources: list[Source]
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    models: list[Source] = field(default_factory=list)
    slices: list[Slice] | None = None
    base_model: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # the effective source: tokenizer_source, or the tokenizer: block's
    tokenizer: dict[str, Any] | None = None  # the tokenizer: block as written (source, tokens, pad_to_multiple_of)
    chat_template: str | None = None
    seed: int = 0
    random_mode: str = "common"  # "common" random numbers, or "fresh" draws per merge
    compute_dtype: str | None = None  # evomerge.compute_dtype: overrides dtype as the compute dtype
    source_file: str = "<recipe>"

    # ---- reading -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source_file: str = "<recipe>") -> "Recipe":
        where = source_file
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: a recipe must be a YAML mapping with at least merge_method and models or slices.")
        known = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "evomerge", "name", "tokenizer", "chat_template", "modules"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"{where}: unknown top-level key {unknown[0]!r}; valid keys are {sorted(known)}.")
        if "merge_method" not in data:
            raise RecipeError(f"{where}: missing merge_method (e.g. 'merge_method: ties').")
        _check_unsupported(data, where)
        models = [_source(m, f"{where}: models[{i}]") for i, m in enumerate(data.get("models") or [])]
        slices = None
        if data.get("slices"):
            slices = []
            for i, s in enumerate(data["slices"]):
                if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
                    raise RecipeError(f"{where}: slices[{i}] needs a non-empty 'sources' list.")
                for key in ("base_model", "residual_weight"):
                    if s.get(key) is not None:
                        raise RecipeError(f"{where}: slices[{i}].{key} (a per-slice {key}) is not supported by evomerge; "
                                          f"set base_model at the top level, or merge the slices in separate recipes.")
                srcs = [_source(x, f"{where}: slices[{i}].sources[{j}]", need_range=True)
                        for j, x in enumerate(s["sources"])]
                lengths = {src.layer_range[1] - src.layer_range[0] for src in srcs}  # type: ignore[index]
                if len(lengths) != 1:
                    raise RecipeError(f"{where}: slices[{i}]: every source must span the same number of layers.")
                slices.append(Slice(srcs, _params(s.get("parameters"), f"{where}: slices[{i}].parameters")))
        if models and slices:
            raise RecipeError(f"{where}: give either 'models:' or 'slices:', not both (as in mergekit).")
        if not models and not slices:
            raise RecipeError(f"{where}: the recipe lists no models; add 'models:' or 'slices:'.")
        extra = data.get("evomerge") or {}
        if not isinstance(extra, dict) or set(extra) - {"seed", "random_mode", "compute_dtype"}:
            raise RecipeError(f"{where}: 'evomerge' must be a mapping of seed, random_mode and compute_dtype, "
                              f"got {extra!r}.")
        mode = extra.get("random_mode", "common")
        if mode not in ("common", "fresh"):
            raise RecipeError(f"{where}: evomerge.random_mode must be 'common' or 'fresh', got {mode!r}.")
        for key in ("dtype", "out_dtype"):
            if isinstance(data.get(key), str):  # mergekit also reads torch.float16
                data = {**data, key: data[key].removeprefix("torch.")}
            _check_dtype(data.get(key), f"{where}: {key}")
        compute = extra.get("compute_dtype")
        _check_dtype(compute, f"{where}: evomerge.compute_dtype")
        tok = data.get("tokenizer_source")
        block = data.get("tokenizer")
        if block is not None:
            tok = block.get("source", "union")  # mergekit's TokenizerConfig default
        return cls(
            merge_method=str(data["merge_method"]),
            models=models,
            slices=slices,
            base_model=None if data.get("base_model") is None else str(data["base_model"]),
            parameters=_params(data.get("parameters"), f"{where}: parameters"),
            dtype=data.get("dtype"),
            out_dtype=data.get("out_dtype"),
            tokenizer_source=None if tok is None else str(tok),
            tokenizer=None if block is None else copy.deepcopy(dict(block)),
            chat_template=check_chat_template(data.get("chat_template"), f"{where}: chat_template"),
            seed=int(extra.get("seed", 0)),
            random_mode=mode,
            compute_dtype=None if compute is None else str(compute),
            source_file=source_file,
        )

    # ---- writing -------------------------------------------------------------
    def to_mergekit(self) -> dict[str, Any]:
        """The recipe as mergekit reads it (no evomerge-only keys)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        if self.slices:
            out["slices"] = [
                {"sources": [_source_dict(s) for s in sl.sources], **({"parameters": sl.parameters} if sl.parameters else {})}
                for sl in self.slices
            ]
        else:
            out["models"] = [_source_dict(s) for s in self.models]
        if self.parameters:
            out["parameters"] = self.parameters
        for key in ("dtype", "out_dtype"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer
        elif self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return copy.deepcopy(out)

    def to_dict(self) -> dict[str, Any]:
        out = self.to_mergekit()
        out["evomerge"] = {"seed": self.seed, "random_mode": self.random_mode}
        if self.compute_dtype is not None:
            out["evomerge"]["compute_dtype"] = self.compute_dtype
        return out

    def to_yaml(self, mergekit_only: bool = False) -> str:
        data = self.to_mergekit() if mergekit_only else self.to_dict()
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    # ---- structure -----------------------------------------------------------
    def all_model_refs(self) -> list[str]:
        """Every distinct model named anywhere, base first."""
        refs: list[str] = [] if self.base_model is None else [self.base_model]
        srcs = [s for sl in self.slices for s in sl.sources] if self.slices else self.models
        for s in srcs:
            if s.model not in refs:
                refs.append(s.model)
        return refs

    def token_sources(self) -> dict[str, TokenSource]:
        """The tokenizer: block's ``tokens`` entries (empty without one)."""
        return parse_tokens((self.tokenizer or {}).get("tokens"), self.source_file)

    @property
    def pad_to_multiple_of(self) -> int | None:
        return (self.tokenizer or {}).get("pad_to_multiple_of")

    def structure_key(self) -> tuple:
        """What must be equal for two recipes to share one prepared engine."""
        if self.slices:
            layout = tuple(tuple((s.model, s.layer_range) for s in sl.sources) for sl in self.slices)
        else:
            layout = tuple(s.model for s in self.models)
        vocab = (self.tokenizer_source, yaml.safe_dump(self.tokenizer, sort_keys=True) if self.tokenizer else None)
        return (self.merge_method, self.base_model, layout, self.compute_dtype or self.dtype, vocab)


def _check_dtype(name: Any, where: str) -> None:
    try:
        parse_dtype(name, where)
    except CheckpointError as exc:
        raise RecipeError(str(exc)) from None


def _check_unsupported(data: dict[str, Any], where: str) -> None:
    """mergekit keys evomerge does not implement: one clear error each, before any work."""
    if data.get("modules"):
        raise RecipeError(
            f"{where}: 'modules:' (a multi-module recipe: {', '.join(map(str, data['modules']))}) is not supported by "
            f"evomerge, which merges single-module causal language models; write that module's models: or slices: "
            f"at the top level of the recipe.")
    tok = data.get("tokenizer")
    if tok is not None:
        if data.get("tokenizer_source") is not None:
            raise RecipeError(f"{where}: give tokenizer_source or a tokenizer: block, not both (as in mergekit).")
        if not isinstance(tok, dict) or set(tok) - {"source", "tokens", "pad_to_multiple_of"}:
            raise RecipeError(f"{where}: tokenizer: must be a mapping of source, tokens and pad_to_multiple_of, got {tok!r}.")
        parse_tokens(tok.get("tokens"), where)
        pad = tok.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise RecipeError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}.")
    source = tok.get("source", "union") if isinstance(tok, dict) else data.get("tokenizer_source")
    if source is not None and not isinstance(source, str):
        raise RecipeError(f"{where}: the tokenizer source must be union, base or a model path, got {source!r}.")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path} is not valid YAML{at}: {getattr(exc, 'problem', exc)}. Fix the syntax and retry.") from None
    return Recipe.from_dict(data, source_file=str(path))


def _params(value: Any, where: str) -> dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a mapping of parameter names to values, got {value!r}.")
    for name, setting in value.items():
        _check_setting(setting, f"{where}.{name}")
    return dict(value)


_SCALAR = (int, float, bool, str)


def _check_setting(setting: Any, where: str, in_condition: bool = False) -> None:
    """The value shapes mergekit's pydantic config accepts: a scalar, a list of scalars (a gradient), a
    ``{filter, value}`` condition or a list of them (whose values are scalars or gradients)."""
    if isinstance(setting, _SCALAR):
        return
    if isinstance(setting, list) and all(isinstance(x, _SCALAR) for x in setting):
        return
    if not in_condition:
        conds = [setting] if isinstance(setting, dict) else setting
        if isinstance(conds, list) and conds and all(isinstance(x, dict) for x in conds):
            for i, cond in enumerate(conds):
                if "value" not in cond or set(cond) - {"filter", "value"}:
                    raise RecipeError(f"{where}[{i}]: a condition needs 'value' and may have 'filter', nothing else.")
                if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                    raise RecipeError(f"{where}[{i}].filter must be a string (a part of tensor names), got {cond['filter']!r}.")
                _check_setting(cond["value"], f"{where}[{i}].value", in_condition=True)
            return
    raise RecipeError(
        f"{where}: {setting!r} is not a valid parameter value; use a number, a list of numbers (interpolated across "
        f"layers) or a list of {{filter: ..., value: ...}} conditions."
    )


def _source(item: Any, where: str, need_range: bool = False) -> Source:
    if isinstance(item, str):
        item = {"model": item}
    if not isinstance(item, dict) or "model" not in item:
        raise RecipeError(f"{where}: each entry needs a 'model' (a path to a model directory).")
    lr = item.get("layer_range")
    if need_range and lr is None:
        raise RecipeError(f"{where}: slice sources need a layer_range: [start, end].")
    if lr is not None:
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr) and 0 <= lr[0] < lr[1]):
            raise RecipeError(f"{where}: layer_range must be [start, end] with 0 <= start < end, got {lr!r}.")
        lr = (lr[0], lr[1])
    return Source(str(item["model"]), _params(item.get("parameters"), f"{where}.parameters"), lr)


def _source_dict(s: Source) -> dict[str, Any]:
    d: dict[str, Any] = {"model": s.model}
    if s.layer_range is not None:
        d["layer_range"] = list(s.layer_range)
    if s.parameters:
        d["parameters"] = s.parameters
    return d


def evaluate_setting(setting: Setting, tensor_name: str, t: float,
                     coerce: Callable[[Any], Any] | None = None) -> Any:
    """mergekit 0.1.5's value rules (None when no condition matches, or for an empty list).

    ``coerce`` converts a raw value to the parameter's type first (numbers written as YAML strings, such as
    ``1e-5``, become floats), as mergekit validates each element before it interpolates: numeric lists
    interpolate linearly at ``t``, other lists take element ``int(t * (n - 1))``.
    """
    conv = coerce or (lambda v: v)
    if setting is None:
        return None
    if isinstance(setting, _SCALAR):
        return conv(setting)
    if isinstance(setting, dict):
        setting = [setting]
    if not setting:
        return None
    if all(isinstance(x, dict) for x in setting):
        for cond in setting:
            if cond.get("filter") in (None, "*") or (tensor_name and cond["filter"] in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t, coerce)
        return None
    values = [conv(x) for x in setting]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return conv((1 - frac) * values[i0] + frac * values[i1])
