"""Karcher (Riemannian) mean of the models' directions on the unit sphere.

Each model is split into norm and direction; the equal-weight Karcher mean of
the directions is found by fixed-point iteration (log map, average, exp map)
for at most ``max_iter`` steps or until the tangent norm drops below ``tol``;
the result is scaled by the mean norm. Inputs with norm <= ``tol`` are left out
of the direction but still count in the mean norm, as in mergekit.
"""
from __future__ import annotations

import math

import torch

from evomerge.methods._util import check_count, flat_dot, flat_norm, gparam
from evomerge.methods.base import MergeInputs, MergeMethod, ParamDef, register

MAX_ITER = ParamDef("max_iter", 10, 0, None, kind=int)
TOL = ParamDef("tol", 1e-5, 0.0, None)


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], *, max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()
    norms = [flat_norm(x) for x in tensors]
    valid = [i for i, nv in enumerate(norms) if nv > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = [tensors[i] / norms[i] for i in valid]
    a_sum = sum(alphas[i] for i in valid)
    a = [alphas[i] / a_sum for i in valid]

    mean = torch.zeros_like(units[0])
    for ai, u in zip(a, units):
        mean.add_(u, alpha=ai)
    mn = flat_norm(mean)
    mean = units[0].clone() if mn < tol else mean.div_(mn)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, units):
            dot = min(1.0, max(-1.0, flat_dot(mean, u)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            # log map of u at mean: theta/sin(theta) * (u - dot*mean)
            coef = ai * theta / math.sin(theta)
            tangent.add_(u, alpha=coef).add_(mean, alpha=-coef * dot)
        tn = flat_norm(tangent)
        if tn < tol:
            break
        mean = mean.mul_(math.cos(tn)).add_(tangent, alpha=math.sin(tn) / tn)
        un = flat_norm(mean)
        if un > tol:
            mean.div_(un)
    scale = sum(al * nv for al, nv in zip(alphas, norms))
    return mean.mul_(scale)


def karcher_merge(inputs: MergeInputs) -> torch.Tensor:
    n = check_count(inputs, "karcher", 1, None)
    return karcher_mean(list(inputs.models), [1.0 / n] * n,
                        max_iter=int(gparam(inputs, MAX_ITER)), tol=float(gparam(inputs, TOL)))


register(MergeMethod(
    name="karcher", merge=karcher_merge, needs_base=False, base_is_input=True,
    global_params=(MAX_ITER, TOL),
    doc="Karcher mean of the models on the hypersphere (https://arxiv.org/abs/2603.04972).",
))
