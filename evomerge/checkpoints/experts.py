"""Mixture-of-experts checkpoints, read in the layout transformers 5 and mergekit 0.1.5 merge them in.

transformers 5 stores a Mixtral / Qwen-MoE layer's experts as one stacked parameter per projection
(``mlp.experts.gate_up_proj``: ``[experts, 2 * intermediate, hidden]``), converts checkpoints saved per
expert (``block_sparse_moe.experts.3.w1.weight``) when it loads them, and mergekit 0.1.5's architecture
files name the stacked tensors. A merge method whose statistics span a tensor (TIES' top-k, SLERP's
angle) gives another result over one expert than over the stack, so evomerge reads such checkpoints
stacked, as mergekit does: names and tensors follow transformers' own conversion list
(``get_checkpoint_conversion_mapping``), for the model types whose list stacks experts. Other models'
names are left as stored.
"""
from __future__ import annotations

import re
from typing import Any


def stacking(conv: Any) -> bool:
    """A converter that stacks experts (``MergeModulelist(dim=0)``), optionally concatenating its sources."""
    ops = [(type(o).__name__, getattr(o, "dim", None)) for o in getattr(conv, "operations", [])]
    return type(conv).__name__ == "WeightConverter" and ops in (
        [("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def expert_pattern(pattern: str) -> re.Pattern[str]:
    """A converter's source pattern (``.experts.*.w1.weight``) as a regex capturing the expert index."""
    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def rename(name: str, renames: list[Any]) -> str:
    for c in renames:
        targets = list(c.target_patterns)
        for i, pattern in enumerate(c.source_patterns):
            name = re.sub(pattern, targets[min(i, len(targets) - 1)], name)
    return name


class ExpertLayout:
    """Stored tensor names -> the names merged: stacked expert tensors, and the rest (renamed alike)."""

    def __init__(self, stored: list[str], model_type: str | None) -> None:
        convs: list[Any] = []
        if model_type:
            try:
                from transformers.conversion_mapping import get_checkpoint_conversion_mapping

                convs = list(get_checkpoint_conversion_mapping(model_type) or [])
            except ImportError:  # a transformers that stores experts as it loads them
                convs = []
        stacks = [c for c in convs if stacking(c)]
        renames = [c for c in convs if type(c).__name__ == "WeightRenaming"] if stacks else []
        self.plain: dict[str, str] = {}  # merged name -> stored name
        self.stacked: dict[str, list[dict[int, str]]] = {}  # merged name -> per source: expert -> stored name
        for name in stored:
            new = rename(name, renames)
            hit = None
            for c in stacks:
                for j, pattern in enumerate(c.source_patterns):
                    m = expert_pattern(pattern).search(new)
                    if m:
                        hit = (new[:m.start()] + c.target_patterns[0], j, int(m.group(1)), len(c.source_patterns))
            if hit is None:
                self.plain[new] = name
            else:
                target, j, expert, parts = hit
                self.stacked.setdefault(target, [{} for _ in range(parts)])[j][expert] = name
        self.names = [*self.plain, *self.stacked]
