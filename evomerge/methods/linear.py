"""Linear merge (model soups): a weighted average of whole models.

``out = sum(w_i * m_i) / sum(w_i)`` with ``normalize`` (default true), else the
plain weighted sum. The base is not special: like mergekit, only the listed
models are averaged. Where mergekit divides by a zero weight sum (NaN/inf
weights out), this raises a MergeError instead.
"""
from __future__ import annotations

import torch

from evomerge.methods._util import check_count, gparam, lincomb, merge_error, mparam
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
    return lincomb(inputs.base, *linear_coefficients(inputs))


register(MergeMethod(
    name="linear", merge=linear_merge, needs_base=False,
    model_params=(WEIGHT,), global_params=(NORMALIZE,), coefficients=linear_coefficients,
    doc="Weighted average of the models (https://arxiv.org/abs/2203.05482).",
))
