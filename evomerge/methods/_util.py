"""Small helpers every method module shares: parameter lookup and error wording.

Why a lookup helper: the engines resolve every declared parameter, but tests and
other callers may build a :class:`MergeInputs` by hand. Reading through the
method's own :class:`ParamDef` keeps one source of truth for defaults.
"""
from __future__ import annotations

from typing import Any

import math

import torch

from evomerge.errors import MergeError
from evomerge.methods.base import MergeInputs, ParamDef


def gparam(inputs: MergeInputs, pdef: ParamDef) -> Any:
    """A global parameter's resolved value, falling back to its declared default."""
    value = inputs.params.get(pdef.name)
    return pdef.default if value is None else value


def mparam(inputs: MergeInputs, i: int, pdef: ParamDef) -> Any:
    """Model ``i``'s resolved value of a per-model parameter, or its declared default."""
    value = inputs.model_params[i].get(pdef.name)
    if value is None:
        if pdef.required:
            raise merge_error(inputs, f"model {i} has no {pdef.name!r}; set it in that model's parameters.")
        return pdef.default
    return value


def merge_error(inputs: MergeInputs, message: str) -> MergeError:
    """A MergeError whose message starts with the tensor it concerns."""
    name = inputs.tensor_name or "<unnamed>"
    return MergeError(f"tensor {name!r}: {message}")


def check_count(inputs: MergeInputs, method: str, low: int, high: int | None) -> int:
    """Guard for direct callers: the engine checks model counts before it gets here."""
    n = inputs.n_models
    if n < low or (high is not None and n > high):
        want = str(low) if high == low else (f"{low} to {high}" if high is not None else f"at least {low}")
        raise merge_error(inputs, f"merge_method {method!r} takes {want} model(s) besides the base, got {n}.")
    return n


def need_base(inputs: MergeInputs, method: str) -> torch.Tensor:
    if inputs.base is None:
        raise merge_error(inputs, f"merge_method {method!r} needs a base_model; add 'base_model: PATH' to the recipe.")
    return inputs.base


def lincomb(base: torch.Tensor | None, a: float | None, cs: list[float], xs: list[torch.Tensor]) -> torch.Tensor:
    """``a * base + sum(c_i * x_i)`` (``a`` None: no base term), in a new tensor."""
    if a is None:
        out = torch.mul(xs[0], cs[0])
        rest = zip(xs[1:], cs[1:])
    else:
        assert base is not None
        out = torch.mul(base, a)
        rest = zip(xs, cs)
    for x, c in rest:
        out.add_(x, alpha=c)
    return out


def flat_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> over the flattened tensors.

    Why not ``torch.linalg.vector_norm``: on this CPU its float32 result for a
    20M-entry tensor is off by ~1e-3 relative and varies with the thread count;
    BLAS ``dot`` is ~4e-5 off and, unlike ``(a*b).sum()``, allocates nothing.
    """
    if a.numel() == 0:
        return 0.0
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def flat_norm(x: torch.Tensor) -> float:
    """Euclidean norm of the flattened tensor (see :func:`flat_dot` for why not vector_norm)."""
    return math.sqrt(max(flat_dot(x, x), 0.0))


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> along the last dim, keepdim; one long vector goes through BLAS ``dot``."""
    if a.dim() == 1:
        return torch.dot(a, b).reshape(1)
    return torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1)
