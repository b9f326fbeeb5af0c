"""Multi-SLERP: barycentric interpolation of several models on a hypersphere.

Following mergekit (and goddard.blog's description): the (task) vectors are
projected to the unit sphere, their weighted mean direction is the tangent
point, the weighted tangent vectors are averaged and mapped back with the
exponential map, and the result is scaled by the weighted mean of the norms. With
a base the vectors are task vectors and the base is added back.

Note: the tangent point is the direction of the weighted mean itself, so the
averaged tangent vector is zero up to rounding and the result is, in effect,
that direction times the weighted mean norm. Kept as specified for parity.
"""
from __future__ import annotations

import math

import torch

from evomerge.methods._util import check_count, flat_dot, flat_norm, gparam, merge_error, mparam
from evomerge.methods.base import MergeInputs, MergeMethod, ParamDef, register

WEIGHT = ParamDef("weight")
NORMALIZE_WEIGHTS = ParamDef("normalize_weights", True, kind=bool)
EPS = ParamDef("eps", 1e-8, 0.0, None)


def multislerp_merge(inputs: MergeInputs) -> torch.Tensor:
    n = check_count(inputs, "multislerp", 1, None)
    if n == 1:
        return inputs.models[0].clone()
    weights = [float(mparam(inputs, i, WEIGHT)) for i in range(n)]
    eps = float(gparam(inputs, EPS))
    if gparam(inputs, NORMALIZE_WEIGHTS):
        total = sum(weights)
        if abs(total) < 1e-8:
            raise merge_error(inputs, f"multislerp weights {weights} sum to ~0 and normalize_weights is true; "
                                      f"change the weights.")
        weights = [w / total for w in weights]
    base = inputs.base
    vecs = inputs.deltas if base is not None else inputs.models

    norms = [flat_norm(v) for v in vecs]
    mean = torch.zeros_like(vecs[0])
    for w, v, nv in zip(weights, vecs, norms):
        mean.add_(v, alpha=w / (nv + eps))
    mean_norm = flat_norm(mean)
    if mean_norm < eps:
        if n == 2:  # antipodal pair: fall back to the linear combination, as mergekit
            out = torch.mul(vecs[0], weights[0]).add_(vecs[1], alpha=weights[1])
            return out.add_(base) if base is not None else out
        raise merge_error(
            inputs, "the weighted mean of the unit vectors is zero (antipodal inputs whose weights cancel); "
                    "change the weights.")
    mean.div_(mean_norm)

    tangent = torch.zeros_like(mean)
    for w, v, nv in zip(weights, vecs, norms):
        unit = v / (nv + eps)
        dot = flat_dot(unit, mean)
        tangent.add_(unit.sub_(mean, alpha=dot), alpha=w)
    tn = flat_norm(tangent) + eps
    out = mean.mul_(math.cos(tn)).add_(tangent, alpha=math.sin(tn) / tn)
    out.mul_(sum(nv * w for nv, w in zip(norms, weights)))
    return out.add_(base) if base is not None else out


register(MergeMethod(
    name="multislerp", merge=multislerp_merge, needs_base=False,
    model_params=(WEIGHT,), global_params=(NORMALIZE_WEIGHTS, EPS), min_models=1,
    doc="Barycentric SLERP of any number of models (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).",
))
