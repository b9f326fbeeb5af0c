"""NuSLERP: SLERP between two models by their relative weights, optionally on task vectors.

``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to ~0). With a base the
interpolation is between the task vectors and the base is added back. Vectors
are the whole tensor (``nuslerp_flatten``, default true), else the slices along
the last dim, or along dim 0 with ``nuslerp_row_wise`` (mergekit's wording).
Exactly (anti)parallel pairs ``1 - cos² <= 1e-16`` use linear interpolation.
"""
from __future__ import annotations

import torch

from evomerge.methods._util import check_count, gparam, mparam, row_dot
from evomerge.methods.base import MergeInputs, MergeMethod, ParamDef, register

WEIGHT = ParamDef("weight")
FLATTEN = ParamDef("nuslerp_flatten", True, kind=bool)
ROW_WISE = ParamDef("nuslerp_row_wise", False, kind=bool)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, flatten: bool = False,
            eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    n0 = row_dot(v0, v0).sqrt_().clamp_(min=1e-7)
    n1 = row_dot(v1, v1).sqrt_().clamp_(min=1e-7)
    cos = (row_dot(v0, v1) / (n0 * n1)).clamp_(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    out = c0 * v0 + c1 * v1
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp_merge(inputs: MergeInputs) -> torch.Tensor:
    check_count(inputs, "nuslerp", 2, 2)
    w0, w1 = (float(mparam(inputs, i, WEIGHT)) for i in range(2))
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    dim = 0 if gparam(inputs, ROW_WISE) else -1
    flatten = bool(gparam(inputs, FLATTEN))
    if inputs.base is not None:
        d0, d1 = inputs.deltas
        return nuslerp(t, d0, d1, dim=dim, flatten=flatten).add_(inputs.base)
    m0, m1 = inputs.models
    return nuslerp(t, m0, m1, dim=dim, flatten=flatten)


register(MergeMethod(
    name="nuslerp", merge=nuslerp_merge, needs_base=False,
    model_params=(WEIGHT,), global_params=(FLATTEN, ROW_WISE), min_models=2, max_models=2,
    doc="SLERP of two models (or their task vectors, given a base) by relative weight.",
))
