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


def linear_coefficients(inputs: MergeInputs) -> tuple[float | None, list[float], list[torch.Tensor]]:
    """``w_i / sum(w)`` (or ``w_i`` without normalize) per model; no base term."""
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
    return None, ([w / total for w in weights] if normalize else weights), inputs.models


def linear_merge(inputs: MergeInputs) -> torch.Tensor:
    """``sum(w_i * m_i)``, then divided by ``sum(w)``, weights in float32: the order mergekit 0.1.5 sums in,
    so that a result rounded to a float16 / bfloat16 compute dtype afterwards rounds as mergekit's does
    (weights such as 3/8 and 5/8 put many sums exactly between two float16 values). The compiled kernel
    computes ``sum((w_i / sum(w)) * m_i)`` from :func:`linear_coefficients`, equal to float32 rounding."""
    linear_coefficients(inputs)  # checks the count and the weight sum
    weights = torch.tensor([float(mparam(inputs, i, WEIGHT)) for i in range(inputs.n_models)], dtype=torch.float32)
    out = torch.zeros_like(inputs.models[0])
    for x, w in zip(inputs.models, weights):
        out.addcmul_(x, w.to(x.device))
    if bool(gparam(inputs, NORMALIZE)):
        out.div_(weights.sum().to(out.device))
    return out


register(MergeMethod(
    name="linear", merge=linear_merge, needs_base=False,
    model_params=(WEIGHT,), global_params=(NORMALIZE,), coefficients=linear_coefficients, float32_math=True,
    doc="Weighted average of the models (https://arxiv.org/abs/2203.05482).",
))
