"""Linear merge (model soups): a weighted average of whole models.

``out = sum(w_i * m_i) / sum(w_i)`` with ``normalize`` (default true), else the
plain weighted sum. The base is not special: like mergekit, only the listed
models are averaged. Where mergekit divides by a zero weight sum (NaN/inf
weights out), this raises a MergeError instead.
"""
from __future__ import annotations

import torch

from evomerge.methods._util import check_count, gparam, merge_error, mparam
from evomerge.methods.base import MergeInputs, MergeMethod, ParamDef, register

WEIGHT = ParamDef("weight")
NORMALIZE = ParamDef("normalize", True, kind=bool)


def linear_merge(inputs: MergeInputs) -> torch.Tensor:
    n = check_count(inputs, "linear", 1, None)
    weights = [float(mparam(inputs, i, WEIGHT)) for i in range(n)]
    normalize = bool(gparam(inputs, NORMALIZE))
    total = sum(weights)
    if normalize and abs(total) < 1e-8:
        raise merge_error(
            inputs,
            f"the linear weights {weights} sum to {total:g}, so normalize: true would divide by zero; "
            f"change the weights or set normalize: false.",
        )
    if inputs.has_deltas and inputs.base is not None:
        # sum(w_i (b + d_i)) = W*b + sum(w_i d_i): no model is rebuilt from its delta
        out = torch.mul(inputs.deltas[0], weights[0])
        for w, d in zip(weights[1:], inputs.deltas[1:]):
            out.add_(d, alpha=w)
        if normalize:
            return out.div_(total).add_(inputs.base)
        return out.add_(inputs.base, alpha=total)
    out = torch.mul(inputs.models[0], weights[0])
    for w, m in zip(weights[1:], inputs.models[1:]):
        out.add_(m, alpha=w)
    return out.div_(total) if normalize else out


register(MergeMethod(
    name="linear", merge=linear_merge, needs_base=False,
    model_params=(WEIGHT,), global_params=(NORMALIZE,),
    doc="Weighted average of the models (https://arxiv.org/abs/2203.05482).",
))
