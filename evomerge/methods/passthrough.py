"""Passthrough: copy one model's tensor, optionally times ``scale``.

Used for frankenmerges (layer stacking), where each output slice comes from one
source. ``scale`` defaults to 1 (mergekit's "no scale").
"""
from __future__ import annotations

import torch

from evomerge.methods._util import check_count, mparam
from evomerge.methods.base import MergeInputs, MergeMethod, ParamDef, register

SCALE = ParamDef("scale", 1.0)


def passthrough_merge(inputs: MergeInputs) -> torch.Tensor:
    check_count(inputs, "passthrough", 1, 1)
    scale = float(mparam(inputs, 0, SCALE))
    # always a fresh tensor: the caller may write into what a method returns
    return inputs.models[0] * scale


register(MergeMethod(
    name="passthrough", merge=passthrough_merge, needs_base=False,
    model_params=(SCALE,), min_models=1, max_models=1,
    doc="Copies the one source tensor, optionally scaled.",
))
