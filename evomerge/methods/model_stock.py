"""Model Stock: move from the base toward the models' average by an angle-derived ratio.

With offsets ``d_i = m_i - base`` and ``cos θ`` the mean pairwise cosine of the
offsets, ``t = N cos θ / (1 + (N-1) cos θ)`` and ``out = base + t * mean(d_i)``
(the paper's ``t * avg + (1-t) * base``). ``filter_wise`` computes one ``t`` per
slice along the last dim instead of one per tensor. Where the denominator is
~0 (|.| < 1e-6) there is no finite estimate and the base is kept, as in mergekit.
"""
from __future__ import annotations

import torch

from evomerge.methods._util import check_count, gparam, need_base, row_dot
from evomerge.methods.base import MergeInputs, MergeMethod, ParamDef, register

FILTER_WISE = ParamDef("filter_wise", False, kind=bool)


def model_stock_merge(inputs: MergeInputs) -> torch.Tensor:
    base = need_base(inputs, "model_stock")
    n = check_count(inputs, "model_stock", 2, None)
    filter_wise = bool(gparam(inputs, FILTER_WISE))
    if filter_wise:
        offsets = [d.reshape(1, -1) if d.dim() <= 1 else d for d in inputs.deltas]
    else:
        offsets = [d.reshape(-1) for d in inputs.deltas]
    norms = [row_dot(d, d).sqrt_() for d in offsets]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            dot = row_dot(offsets[i], offsets[j])
            cos_sum += (dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            pairs += 1
    cos = cos_sum / pairs
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    mean = torch.zeros_like(offsets[0])
    for d in offsets:
        mean.add_(d)
    mean.div_(n)
    return mean.mul_(t).reshape(base.shape).add_(base)


register(MergeMethod(
    name="model_stock", merge=model_stock_merge, needs_base=True,
    global_params=(FILTER_WISE,), min_models=2,
    doc="Model Stock: angle-weighted step from the base to the average (https://arxiv.org/abs/2403.19522).",
))
