"""SCE: Select (by variance across models), Calculate (weights), Erase (minority signs).

1. Select: with ``select_topk < 1`` keep, in every task vector, only the
   entries whose variance across the models is among the top
   ``int(select_topk * #nonzero-variance)`` (one mask shared by all models).
2. Calculate: model i's weight is the mean of its selected task vector squared,
   normalised to sum 1 (uniform when they sum to ~0).
3. Erase: TIES sign election (sum) on the selected task vectors; the result
   is the weighted mean of the agreeing entries (divisor floored at 1e-6).
Ties at the variance threshold keep every tied entry (see sparsify.py).
"""
from __future__ import annotations

import torch

from evomerge.methods._util import gparam, need_base
from evomerge.methods.base import MergeInputs, MergeMethod, ParamDef, register
from evomerge.methods.consensus import Term, agreeing_sum, elect_sign

SELECT_TOPK = ParamDef("select_topk", 1.0, 0.0, 1.0)
INT8_MASK = ParamDef("int8_mask", False, kind=bool)


def variance_mask(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Float 0/1 mask of the entries with the largest across-model variance."""
    var = torch.var(torch.stack(deltas), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction) if fraction > 0 else 0
    if k == 0:
        return torch.zeros_like(var)
    threshold = float(torch.kthvalue(var.reshape(-1), var.numel() - k + 1).values)
    return torch.ge(var, threshold, out=var)


def sce_merge(inputs: MergeInputs) -> torch.Tensor:
    base = need_base(inputs, "sce")
    if inputs.n_models == 0:
        return base.clone()
    fraction = float(gparam(inputs, SELECT_TOPK))
    tvs = list(inputs.deltas)
    owned = False
    if fraction < 1:
        mask = variance_mask(tvs, fraction)
        tvs = [d * mask for d in tvs]
        owned = True
    energy = [float(tv.square().mean()) if tv.numel() else 0.0 for tv in tvs]
    total = sum(energy)
    weights = [1.0 / len(tvs)] * len(tvs) if abs(total) < 1e-6 else [e / total for e in energy]

    sign = elect_sign([Term(tv, 1.0, 1.0) for tv in tvs], "sum")
    terms = [Term(tv, w, w, owned) for tv, w in zip(tvs, weights)]
    mixed, divisor = agreeing_sum(terms, sign, with_divisor=True)
    assert divisor is not None
    return mixed.div_(divisor.clamp_(min=1e-6)).add_(base)


register(MergeMethod(
    name="sce", merge=sce_merge, needs_base=True,
    global_params=(INT8_MASK, SELECT_TOPK),
    doc="SCE: variance-selected, energy-weighted, sign-consensus merge (https://arxiv.org/abs/2408.07990).",
))
