"""TIES sign election and the agreeing-entries sum, shared by the consensus methods.

A model's contribution at one entry is ``coef * tensor``. The elected sign is
+1 where the sum over models (``"sum"``, the TIES paper and mergekit's default) or
the sum of signs (``"count"``) is >= 0, else -1. Only entries whose contribution
has the elected sign (so never zeros) are summed, and the divisor sums the
weights of exactly those entries.

Why the arithmetic looks indirect: with ``y = coef * tensor * sign`` an entry agrees
iff ``y > 0``, so the agreeing sum is ``sign * sum(relu(y))``. That keeps every
step a float elementwise op (no bool masks, no ``where``), and the engine's
resident tensors are only ever read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CONSENSUS_METHODS = ("sum", "count")


@dataclass
class Term:
    """One model's contribution ``coef * tensor``; ``weight`` goes into the divisor.

    ``owned``: the tensor is a scratch copy the mixer may overwrite.
    """

    tensor: torch.Tensor
    coef: float
    weight: float
    owned: bool = False


def accumulate(acc: torch.Tensor | None, x: torch.Tensor, coef: float, *, owned: bool = False) -> torch.Tensor:
    """``acc + coef * x``, in place; the first term starts the sum (saves a zero-fill
    pass), reusing ``x`` itself when it is scratch (``owned``)."""
    if acc is None:
        return x.mul_(coef) if owned else torch.mul(x, coef)
    return acc.add_(x, alpha=coef)


def elect_sign(terms: list[Term], method: str = "sum") -> torch.Tensor:
    """Float +1/-1 per entry; ties (a zero sum) elect +1, as mergekit does."""
    if method not in CONSENSUS_METHODS:
        raise ValueError(f"unknown consensus method {method!r}")
    votes: torch.Tensor | None = None
    for t in terms:
        if t.coef == 0:
            continue
        if method == "sum":
            votes = accumulate(votes, t.tensor, t.coef)
        else:
            votes = accumulate(votes, torch.sign(t.tensor), 1.0 if t.coef > 0 else -1.0)
    if votes is None:
        return torch.ones_like(terms[0].tensor)
    return torch.ge(votes, 0, out=votes).mul_(2).sub_(1)


def agreeing_sum(terms: list[Term], sign: torch.Tensor, *, with_divisor: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of the contributions that agree with ``sign``, and the sum of their weights.

    ``sign`` is consumed (reused as scratch). A zero divisor is left zero: the
    caller decides what to replace it with.
    """
    total: torch.Tensor | None = None
    divisor: torch.Tensor | None = None
    scratch: torch.Tensor | None = None
    for t in terms:
        if t.coef == 0:
            continue  # contributes exact zeros, whose sign never agrees
        if t.owned:
            y = t.tensor.mul_(sign)
        else:
            if scratch is None:
                scratch = torch.empty_like(sign)
            y = torch.mul(t.tensor, sign, out=scratch)
        # keep entries where coef * y > 0; coef * y is then the agreeing magnitude
        if t.coef > 0:
            y.clamp_(min=0)
        else:
            y.clamp_(max=0)
        total = accumulate(total, y, t.coef)
        if with_divisor:
            divisor = accumulate(divisor, torch.ne(y, 0, out=y), t.weight)
    if total is None:  # every coefficient is zero
        total = torch.zeros_like(sign)
    if with_divisor and divisor is None:
        divisor = torch.zeros_like(sign)
    return total.mul_(sign), divisor
