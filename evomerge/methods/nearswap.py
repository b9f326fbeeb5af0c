"""NearSwap: take the model's value where it is within ``t`` of the base.

Per entry ``w = clamp(t / max(|model - base|, 1e-6), 0, 1)`` and
``out = base + w * (model - base)``: entries closer than ``t`` become the
model's, farther ones move ``t`` toward it. ``t`` is a distance, so any value
>= 0 is valid (not just [0, 1]); t = 0 returns the base.
"""
from __future__ import annotations

import torch

from evomerge.methods._util import check_count, gparam, need_base
from evomerge.methods.base import MergeInputs, MergeMethod, ParamDef, register

T = ParamDef("t", None, 0.0, None)


def nearswap_merge(inputs: MergeInputs) -> torch.Tensor:
    base = need_base(inputs, "nearswap")
    check_count(inputs, "nearswap", 1, 1)
    t = float(gparam(inputs, T))
    delta = inputs.deltas[0]
    w = torch.abs(delta).clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    return w.mul_(delta).add_(base)


register(MergeMethod(
    name="nearswap", merge=nearswap_merge, needs_base=True,
    global_params=(T,), min_models=1, max_models=1,
    doc="Interpolates toward the model where it is near the base "
        "(https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).",
))
