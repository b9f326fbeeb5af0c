"""Where a checkpoint's tensor lives in a transformers model: its parameter and, for fused experts, its slice.

transformers 5 converts some checkpoints when it loads them: renames (GPT-NeoX's ``embed_out`` is the
model's ``lm_head``) and fused experts (Mixtral's per-expert ``w1`` / ``w3`` become one
``experts.gate_up_proj`` of shape ``[experts, 2 * intermediate, hidden]``). The merge works on the
checkpoint's tensors, which mergekit reads and ``evomerge-merge`` writes; the prepared engine writes
each merged tensor into the live model through this map, read from transformers' own conversion list
(``get_model_conversion_mapping``). Understood: renamings, and converters that stack experts
(``MergeModulelist(dim=0)``), optionally concatenating their sources (``Concatenate(dim=1)``). A tensor
with another conversion maps nowhere, and the engine names it (a clear error, not a wrong model).
Mixture-of-experts checkpoints are already read stacked (:mod:`evomerge.checkpoints.experts`); the
stacked-expert targets serve a checkpoint read per expert.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from evomerge.checkpoints.experts import expert_pattern, rename, stacking


@dataclass(frozen=True)
class Target:
    """A live parameter, or the block ``part`` of ``parts`` (along its rows) of one expert's slice of it."""

    param: str
    expert: int | None = None
    part: int = 0
    parts: int = 1


def live_targets(model: PreTrainedModel, names: list[str]) -> dict[str, Target]:
    """Checkpoint tensor name -> where it goes in ``model`` (names that map to nothing are left out)."""
    params = {n for n, _ in model.named_parameters()}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        convs = list(get_model_conversion_mapping(model))
    except ImportError:  # a transformers without load-time conversions: names are the parameters' names
        convs = []
    renames = [c for c in convs if type(c).__name__ == "WeightRenaming"]
    stacks = [c for c in convs if stacking(c)]
    out: dict[str, Target] = {}
    for name in names:
        if name in params:
            out[name] = Target(name)
            continue
        renamed = rename(name, renames)
        if renamed in params:
            out[name] = Target(renamed)
            continue
        for c in stacks:
            sources = list(c.source_patterns)
            for j, pattern in enumerate(sources):
                m = expert_pattern(pattern).search(renamed)
                if m and renamed[:m.start()] + c.target_patterns[0] in params:
                    out[name] = Target(renamed[:m.start()] + c.target_patterns[0], int(m.group(1)), j, len(sources))
    return out


def view(param: torch.Tensor, target: Target) -> torch.Tensor:
    """The part of ``param`` that holds ``target``'s tensor (the parameter itself when not fused)."""
    if target.expert is None:
        return param
    x = param[target.expert]
    rows = x.shape[0] // target.parts
    return x[target.part * rows:(target.part + 1) * rows]
