"""The contract every merge method follows, and the one registry they live in.

A merge method is a pure function of float32 tensors and resolved parameters. It
never reads files, never knows about layers or recipes: the engines (one-shot and
prepared) resolve a recipe's per-layer / per-filter parameter values for one
tensor, build a :class:`MergeInputs`, and call :attr:`MergeMethod.merge`.

Why deltas and models both live on :class:`MergeInputs`: the one-shot engine reads
whole models and the prepared engine keeps task vectors (model - base) resident.
Each side gives what it has; the other view is derived lazily, once.

Why :class:`SparsifyAux`: the search builds hundreds of candidates from the same
task vectors. Anything that does not depend on a candidate's parameters (the
sorted magnitudes that turn a top-k threshold into a lookup, the uniform draws
behind DARE/DELLA masks) is computed once by the prepared engine and handed in.
Methods given no aux compute the same quantities from scratch, so both engines
run one implementation of the math.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from evomerge.errors import MergeError


@dataclass
class SparsifyAux:
    """Candidate-independent precomputation for one model's task vector of one tensor.

    sorted_abs: |delta| flattened and sorted ascending (float32). The magnitude of
        the k-th largest entry is ``sorted_abs[numel - k]``: a lookup, not a sort.
    uniforms: one U[0, 1) draw per element, same shape as the delta. With common
        random numbers a DARE mask for density p is ``uniforms < p``: masks nest as
        density changes and no candidate pays for random numbers.
    """

    sorted_abs: torch.Tensor | None = None
    uniforms: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class MergeInputs:
    """Everything a method sees for one output tensor.

    models / deltas are the non-base models in recipe order. ``model_params[i]``
    holds the resolved per-model parameters (``weight``, ``density``, ...) of model
    i, ``params`` the resolved global parameters (``normalize``, ``lambda``, ``t``...).
    """

    def __init__(
        self,
        *,
        base: torch.Tensor | None,
        models: list[torch.Tensor] | None = None,
        deltas: list[torch.Tensor] | None = None,
        model_params: list[dict[str, Any]],
        params: dict[str, Any],
        tensor_name: str = "",
        aux: list[SparsifyAux] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if models is None and deltas is None:
            raise ValueError("MergeInputs needs models or deltas")
        if deltas is not None and base is None:
            raise ValueError("deltas need a base tensor")
        self.base = base
        self._models = models
        self._deltas = deltas
        self.model_params = model_params
        self.params = params
        self.tensor_name = tensor_name
        self.aux = aux
        self.generator = generator

    @property
    def models(self) -> list[torch.Tensor]:
        if self._models is None:
            assert self._deltas is not None and self.base is not None
            self._models = [self.base + d for d in self._deltas]
        return self._models

    @property
    def deltas(self) -> list[torch.Tensor]:
        if self._deltas is None:
            if self.base is None:
                raise MergeError(f"tensor {self.tensor_name!r}: this method needs a base_model")
            self._deltas = [m - self.base for m in self.models]
        return self._deltas

    @property
    def has_deltas(self) -> bool:
        """True when the engine handed in task vectors (methods may then avoid rebuilding models)."""
        return self._deltas is not None

    @property
    def n_models(self) -> int:
        return len(self._models if self._models is not None else self._deltas)  # type: ignore[arg-type]

    def aux_for(self, i: int) -> SparsifyAux | None:
        return self.aux[i] if self.aux is not None else None


_TRUE = ("true", "t", "yes", "y", "on", "1")
_FALSE = ("false", "f", "no", "n", "off", "0")


@dataclass(frozen=True)
class ParamDef:
    """A recipe parameter: its default (``None`` = required) and its valid range."""

    name: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    kind: type = float
    # for kind=str: the accepted values (None = any string)
    choices: tuple[str, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is None

    def coerce(self, value: Any) -> Any:
        """A recipe's raw value as this parameter's type, leniently, as mergekit's pydantic reads it: numbers
        written as strings (``tol: 1e-5``, which YAML reads as a string), booleans as words or 0 / 1.
        What cannot be converted is returned unchanged, for :meth:`check` to name."""
        if self.kind is bool:
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
                return bool(value)
            return value
        if self.kind in (int, float):
            if isinstance(value, bool):
                return self.kind(value)
            if isinstance(value, str):
                try:
                    return float(value.strip())
                except ValueError:
                    return value
        return value

    def check(self, value: Any, where: str) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeError(f"{where}: parameter {self.name!r} must be true or false, got {value!r}.")
            return value
        if self.kind is str:
            if self.choices is not None and str(value) not in self.choices:
                raise MergeError(
                    f"{where}: parameter {self.name!r} = {value!r} is not one of "
                    f"{', '.join(map(repr, self.choices))}; fix the value in the recipe."
                )
            return str(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise MergeError(f"{where}: parameter {self.name!r} must be a number, got {value!r}.")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            lo = "-inf" if self.low is None else self.low
            hi = "inf" if self.high is None else self.high
            raise MergeError(
                f"{where}: parameter {self.name!r} = {value} is outside its valid range [{lo}, {hi}]; "
                f"fix the value in the recipe."
            )
        if self.kind is int:
            if not float(value).is_integer():
                raise MergeError(f"{where}: parameter {self.name!r} must be a whole number, got {value!r}.")
            return int(value)
        return float(value)


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its name, what it needs, its parameters and its function."""

    name: str
    merge: Callable[[MergeInputs], torch.Tensor]
    needs_base: bool
    model_params: tuple[ParamDef, ...] = ()
    global_params: tuple[ParamDef, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    # which per-model params a prepared engine should precompute aux for
    uses_sorted_abs: bool = False
    uses_uniforms: bool = False
    # further candidate-independent SparsifyAux.extra keys the method reads when
    # present (see evomerge.methods.sparsify.prepare_aux, which computes them)
    aux_extras: tuple[str, ...] = ()
    # a base_model, when the recipe names one, is merged as one more input (mergekit's karcher)
    base_is_input: bool = False
    # mergekit 0.1.5 computes this method in float32 whatever its inputs' dtype (linear, SLERP): under a
    # float16 / bfloat16 compute dtype the engines hand it float32 copies of the rounded inputs
    float32_math: bool = False
    # for a method whose result is ``a * base + sum(c_i * x_i)`` with scalars that depend on the candidate
    # only: returns ``(a, [c_i], [x_i])``, the x_i being the models or the task vectors, as the method
    # chooses (``a`` None: the base is not a term). The method computes through it, and the fused kernel
    # writes that sum in one pass (evomerge.methods.fused)
    coefficients: Callable[["MergeInputs"], tuple[float | None, list[float], list[torch.Tensor]]] | None = None
    doc: str = ""

    def model_param(self, name: str) -> ParamDef | None:
        return next((p for p in self.model_params if p.name == name), None)

    def global_param(self, name: str) -> ParamDef | None:
        return next((p for p in self.global_params if p.name == name), None)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def registered() -> dict[str, MergeMethod]:
    """The methods registered so far (``evomerge.methods`` imports, and so registers, all of them)."""
    return _REGISTRY
