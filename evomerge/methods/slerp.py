"""SLERP between the base (``t = 0``) and one model (``t = 1``).

The angle is measured between the two tensors flattened to vectors; the result
interpolates the original (unnormalised) tensors with the spherical
coefficients ``sin((1-t)θ)/sin θ`` and ``sin(tθ)/sin θ``. Nearly parallel or
antiparallel pairs (``|cos θ| > 0.9995``) fall back to linear interpolation, as
in mergekit. Norms at or below 1e-8 count as 1 when measuring the angle.
"""
from __future__ import annotations

import math

import torch

from evomerge.methods._util import check_count, flat_dot, flat_norm, gparam, lincomb, need_base
from evomerge.methods.base import MergeInputs, MergeMethod, ParamDef, register

T = ParamDef("t", None, 0.0, 1.0)
DOT_THRESHOLD = 0.9995
_EPS = 1e-8


def cosine(v0: torch.Tensor, v1: torch.Tensor) -> float:
    """The cosine of the angle between the flattened tensors, clamped to [-1, 1] (norms <= 1e-8 count as 1).

    It does not depend on ``t``: the prepared engine computes it once per tensor (``aux.extra["cosine"]``),
    so a candidate pays one pass over its inputs, not four, and a GPU never waits for a dot product."""
    if v0.numel() == 0:
        return 1.0
    na, nb = flat_norm(v0), flat_norm(v1)
    na = na if na > _EPS else 1.0
    nb = nb if nb > _EPS else 1.0
    return min(1.0, max(-1.0, flat_dot(v0, v1) / na / nb))


def slerp_coefficients(t: float, dot: float) -> tuple[float, float]:
    """``(c0, c1)`` with ``slerp(t, v0, v1) = c0 * v0 + c1 * v1``, for ``dot = cosine(v0, v1)``; nearly
    (anti)parallel pairs get the lerp's ``(1 - t, t)``."""
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def _coefficients(inputs: MergeInputs) -> tuple[float | None, list[float], list[torch.Tensor]]:
    """``c0 b + c1 m`` over the model (mergekit's formula: t = 1 gives the model bit for bit); over the
    task vector d = m - b that the prepared engine holds, ``(c0 + c1) b + c1 d``."""
    base = need_base(inputs, "slerp")
    check_count(inputs, "slerp", 1, 1)
    aux = inputs.aux_for(0)
    dot = aux.extra.get("cosine") if aux is not None else None
    if dot is None:
        dot = cosine(base, inputs.models[0])
    c0, c1 = slerp_coefficients(float(gparam(inputs, T)), dot)
    if inputs.has_deltas:
        return c0 + c1, [c1], inputs.deltas
    return c0, [c1], inputs.models


def slerp_merge(inputs: MergeInputs) -> torch.Tensor:
    return lincomb(inputs.base, *_coefficients(inputs))


register(MergeMethod(
    name="slerp", merge=slerp_merge, needs_base=True,
    global_params=(T,), min_models=1, max_models=1, aux_extras=("cosine",), coefficients=_coefficients,
    float32_math=True,
    doc="Spherical interpolation from the base (t=0) to the model (t=1) "
        "(https://en.wikipedia.org/wiki/Slerp).",
))
