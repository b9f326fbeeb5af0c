"""Sparsifiers for task vectors: which entries of one model's delta survive.

Four rules, with mergekit's names: ``magnitude`` (TIES: the top ``density``
fraction by |delta|), ``random`` (:func:`dare`: keep each entry with probability
``density``), ``magnitude_outliers`` (Model Breadcrumbs: drop the ``gamma``
largest, then the smallest, keep ``density``) and ``della_magprune`` (DELLA:
keep probability rises linearly with the entry's magnitude rank in its row).
Density >= 1 returns the delta itself (no copy, no rescale); density 0 keeps
nothing; a positive density keeps at least one entry under ``magnitude`` only
(mergekit 0.1.5: the others may keep none when ``int(density * n) == 0``).

Why thresholds instead of top-k indices: a candidate then costs a few float
elementwise passes; with :attr:`SparsifyAux.sorted_abs` the threshold is a
lookup, without it ``torch.kthvalue`` finds the same value. Where entries of exactly
the threshold's magnitude are more than the top-k can take (exact ties: rare in
float32, common in float16 / bfloat16), the eager path picks them as mergekit
0.1.5 does, in torch's sort order of |delta|; the compiled kernels
(:mod:`evomerge.methods.fused`) keep them all.

Why a :class:`Kept` with a scalar ``scale``: norm-matching rescales multiply the
whole sparsified tensor by one number, which the caller folds into the model's
weight instead of paying another pass.

Rescaling (``rescale: true``) follows mergekit by default: multiply the kept
entries so their L1 norm equals the full delta's (``rescale_norm: l1``; ``l2``
and ``linf`` match those norms). ``rescale_norm: probability`` is the papers'
rule instead: divide each kept entry by its keep probability (DARE's
``1/density``, DELLA's per-entry ``1/p``; ``1/density`` for the magnitude rules).

Candidate-independent precomputation (:func:`prepare_aux`), read when present:
``sorted_abs`` (magnitude rules), ``uniforms`` (random rules), and in
``aux.extra``: ``"abs_sum"`` (L1 norm of the delta, for L1 rescale),
``"della_rank"`` (each entry's magnitude rank in its row, scaled to [0, 1]),
``"l1_below_u"`` (DARE: the L1 norm of the entries kept at each grid density) and ``"cosine"`` (SLERP:
the angle between base and model, which ``t`` does not change).

Why DARE's density sits on a grid of ``1/U_GRID`` (2^-16, i.e. it moves by at most
7.6e-6): the L1 rescale needs the kept entries' L1 norm, a second full pass over the
delta and its draws for every candidate. On the grid, "draw below density" is
"draw's bin below t", so the kept L1 for every density is one cumulative histogram
of |delta| over the draws' bins, built once with the draws: a lookup per candidate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evomerge.errors import MergeError
from evomerge.methods._util import flat_norm
from evomerge.methods.base import MergeMethod, SparsifyAux

RESCALE_NORMS = ("l1", "l2", "linf", "probability")
U_GRID = 1 << 16  # DARE densities are multiples of 1/U_GRID (see the module docstring)
_NORM_EPS = 1e-7  # below this a norm is treated as zero and nothing is rescaled (as mergekit)


@dataclass
class Kept:
    """A sparsified delta: ``tensor * scale`` is the result.

    ``owned`` says the caller may write into ``tensor``; when False it is the
    engine's resident delta and must stay untouched.
    """

    tensor: torch.Tensor
    scale: float = 1.0
    owned: bool = False


# ---- thresholds -------------------------------------------------------------------
def ascending_abs_at(delta: torch.Tensor, index: int, aux: SparsifyAux | None) -> float:
    """|delta|'s ``index``-th smallest value (0-based), by lookup when aux has it."""
    if aux is not None and aux.sorted_abs is not None:
        if aux.sorted_abs.numel() != delta.numel():
            raise ValueError("SparsifyAux.sorted_abs does not match the delta's size")
        return float(aux.sorted_abs[index])
    return float(torch.kthvalue(delta.abs().reshape(-1), index + 1).values)


def _keep_abs_ge(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """A copy of delta with the entries below ``threshold`` in magnitude zeroed.

    ``hardshrink`` keeps ``|x| > lambd`` in one float pass (faster than
    abs + compare + multiply); ``lambd`` is the float32 just below the
    threshold, so exactly-equal entries are kept.
    """
    if delta.dtype != torch.float32:  # hardshrink's lambd would round to the delta's dtype
        return delta * torch.ge(delta.abs(), threshold).to(delta.dtype)
    below = torch.nextafter(torch.tensor(threshold, dtype=torch.float32), torch.tensor(-math.inf))
    return torch.nn.functional.hardshrink(delta, max(float(below), 0.0))


def _count_abs_ge(delta: torch.Tensor, threshold: float, aux: SparsifyAux | None) -> int:
    """How many entries have |delta| >= threshold (a binary search in the sorted magnitudes when given)."""
    if aux is not None and aux.sorted_abs is not None:
        at = torch.tensor([threshold], dtype=aux.sorted_abs.dtype, device=aux.sorted_abs.device)
        return delta.numel() - int(torch.searchsorted(aux.sorted_abs, at))
    return int(torch.ge(delta.abs(), threshold).sum())


def _mergekit_top(delta: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """delta where its entry's position in torch's sort of |delta| (float32, as mergekit 0.1.5 sorts on
    the CPU) is in [start, stop), else 0: mergekit's pick among entries of exactly equal magnitude,
    which is torch's (unstable) sort order. Only run at such ties, where no threshold can decide."""
    order = torch.sort(delta.abs().reshape(-1).float(), descending=descending).indices[start:stop]
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device).index_fill_(0, order, 1)
    return delta * keep.reshape(delta.shape)


def _zeros(delta: torch.Tensor) -> Kept:
    return Kept(torch.zeros_like(delta), 1.0, True)


# ---- rescale ------------------------------------------------------------------------
def norm_of(t: torch.Tensor, norm: str) -> float:
    """L1 as ``abs().sum()`` (as mergekit; torch's vector_norm(ord=1) drifts ~1e-3 on
    large float32 tensors), L2 via BLAS dot, Linf as the largest magnitude."""
    if t.numel() == 0:
        return 0.0
    if norm == "l1":
        return float(t.abs().sum())
    if norm == "l2":
        return flat_norm(t)
    if norm == "linf":
        return float(t.abs().max())
    raise ValueError(f"unknown rescale norm {norm!r}")


def norm_scale(kept: torch.Tensor, delta: torch.Tensor, norm: str, aux: SparsifyAux | None,
               kept_l1: float | None = None) -> float:
    """The factor that gives the kept entries the full delta's norm (1 if either norm is ~0)."""
    before = aux.extra.get("abs_sum") if (aux is not None and norm == "l1") else None
    if before is None:
        before = norm_of(delta, norm)
    after = kept_l1 if (kept_l1 is not None and norm == "l1") else norm_of(kept, norm)
    if before < _NORM_EPS or after < _NORM_EPS:
        return 1.0
    return before / after


def _finish(kept: torch.Tensor, delta: torch.Tensor, density: float, rescale: str | None,
            aux: SparsifyAux | None, kept_l1: float | None = None) -> Kept:
    if rescale is None:
        return Kept(kept, 1.0, True)
    if rescale == "probability":
        return Kept(kept, 1.0 / density, True)
    return Kept(kept, norm_scale(kept, delta, rescale, aux, kept_l1), True)


# ---- DARE's density grid ------------------------------------------------------------
def grid_steps(density: float) -> int:
    """``density`` in (0, 1) as a whole number of grid steps (at least one): keep where ``u < steps / U_GRID``."""
    return max(1, round(density * U_GRID))


def l1_below_u(delta: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``out[t]`` = sum of |delta| where ``uniforms < t / U_GRID``, for t = 0..U_GRID (float64).

    Exact bins: a float32 draw in [0, 1) times 2^16 is exact, so its bin is ``floor(u * U_GRID)``
    and "bin < t" is "u < t / U_GRID".
    """
    bins = uniforms.reshape(-1).mul(U_GRID).long()
    hist = torch.bincount(bins, weights=delta.reshape(-1).abs().double(), minlength=U_GRID)
    return torch.cat([hist.new_zeros(1), hist.cumsum(0)])


def l1_table(delta: torch.Tensor, uniforms: torch.Tensor, *, gpu: bool = False) -> torch.Tensor | None:
    """:func:`l1_below_u` where it pays: where the table (U_GRID + 1 floats) is smaller than the pass it
    saves, and for every tensor merged on a GPU (``gpu``), where the pass's result would cost a host wait."""
    return l1_below_u(delta, uniforms) if (gpu or delta.numel() >= U_GRID) else None


def kept_l1_lookup(aux: SparsifyAux | None, steps: int) -> float | None:
    table = aux.extra.get("l1_below_u") if aux is not None else None
    return None if table is None else float(table[steps])


# ---- the four rules --------------------------------------------------------------
def magnitude(delta: torch.Tensor, density: float, *, aux: SparsifyAux | None = None,
              rescale: str | None = None) -> Kept:
    """TIES trimming: keep the ``k = max(1, int(density * numel))`` largest |delta|.

    A positive density keeps at least one entry (mergekit 0.1.5); density 0 keeps
    nothing; density >= 1 returns the delta itself.
    """
    if density >= 1:
        return Kept(delta)
    n = delta.numel()
    if density <= 0 or n == 0:
        return _zeros(delta)
    k = max(1, int(density * n))
    threshold = ascending_abs_at(delta, n - k, aux)
    if threshold > 0 and _count_abs_ge(delta, threshold, aux) > k:  # exact ties at the threshold
        kept = _mergekit_top(delta, 0, k, descending=True)
    else:
        kept = _keep_abs_ge(delta, threshold)
    return _finish(kept, delta, density, rescale, aux)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, *,
                       aux: SparsifyAux | None = None, rescale: str | None = None) -> Kept:
    """Model Breadcrumbs: in |delta| order, drop the top ``int(gamma*n)`` and keep the
    next ``int(density*n)``; when both do not fit, fewer outliers are dropped."""
    if density >= 1:
        return Kept(delta)
    n = delta.numel()
    target = int(density * n)
    if target <= 0:
        return _zeros(delta)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    kept = _keep_abs_ge(delta, ascending_abs_at(delta, n_bot, aux))
    if n_bot + target < n:  # drop the outliers: those above the kept band's largest magnitude
        hi = ascending_abs_at(delta, n_bot + target - 1, aux)
        kept.sub_(torch.nn.functional.hardshrink(delta, hi))
    return _finish(kept, delta, density, rescale, aux)


def uniforms_for(delta: torch.Tensor, aux: SparsifyAux | None,
                 generator: torch.Generator | None) -> torch.Tensor:
    """The U[0,1) draws behind a random mask: the common random numbers when given,
    else a fresh ``torch.rand(delta.shape, generator=generator)`` (the same call
    :func:`prepare_aux` makes, so both paths agree for the same generator state)."""
    if aux is not None and aux.uniforms is not None:
        if aux.uniforms.shape != delta.shape:
            raise ValueError("SparsifyAux.uniforms does not match the delta's shape")
        return aux.uniforms
    return torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device)


def dare(delta: torch.Tensor, density: float, uniforms: torch.Tensor, *,
           aux: SparsifyAux | None = None, rescale: str | None = None) -> Kept:
    """DARE: keep an entry where its uniform draw is below ``density`` (on the 2^-16 grid).

    With common random numbers the kept set only grows with density (masks nest).
    """
    if density >= 1:
        return Kept(delta)
    if density <= 0:
        return _zeros(delta)
    steps = grid_steps(density)
    p = steps / U_GRID
    kept = torch.lt(uniforms, p, out=torch.empty_like(delta)).mul_(delta)
    return _finish(kept, delta, density, rescale, aux, kept_l1_lookup(aux, steps))


def della_rank(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's ascending |delta| rank within its row, scaled to [0, 1].

    Rows are along dim 1 as in mergekit (a 1-D tensor is one row). A row of one
    entry has no ranking: it gets 0.5, i.e. keep probability ``density`` (mergekit
    fails there with a NaN probability). Ties are broken by position (stable sort).
    Candidate-independent: the prepared engine computes it once (``extra["della_rank"]``).
    """
    x = delta.abs()
    if x.dim() < 2:
        x = x.reshape(1, -1)
    n = x.shape[1]
    if n <= 1:
        return torch.full_like(delta, 0.5)
    order = torch.argsort(x, dim=1, stable=True)
    steps = torch.arange(n, dtype=torch.float32, device=x.device).div_(n - 1)
    shape = [1] * x.dim()
    shape[1] = n
    rank = torch.empty_like(x).scatter_(1, order, steps.reshape(shape).expand_as(x))
    return rank.reshape(delta.shape)


def check_della(density: float, epsilon: float, where: str) -> None:
    if density < 1 and density > 0 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise MergeError(
            f"{where}: DELLA keep probabilities density +/- epsilon must lie strictly inside (0, 1), got "
            f"density={density} and epsilon={epsilon}; lower 'epsilon' or move 'density' away from 0 and 1."
        )


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, uniforms: torch.Tensor, *,
                   aux: SparsifyAux | None = None, rescale: str | None = None, where: str = "") -> Kept:
    """DELLA MagPrune: keep probability ``density - eps + 2*eps*rank`` (rank in [0,1]),
    so large entries survive more often while the expected density stays ``density``."""
    if density >= 1:
        return Kept(delta)
    if density <= 0:
        return _zeros(delta)
    check_della(density, epsilon, where)
    rank = aux.extra.get("della_rank") if aux is not None else None
    if rank is None:
        rank = della_rank(delta)
    probs = torch.mul(rank, 2 * epsilon).add_(density - epsilon)
    kept = torch.lt(uniforms, probs, out=torch.empty_like(delta))
    if rescale == "probability":
        kept.div_(probs)
        rescale = None
    del probs
    kept.mul_(delta)
    return _finish(kept, delta, density, rescale, aux)


# ---- precomputation for the prepared engine --------------------------------------
def prepare_aux(method: MergeMethod, delta: torch.Tensor, *, base: torch.Tensor | None = None,
                uniforms: torch.Tensor | None = None, generator: torch.Generator | None = None,
                gpu: bool = False) -> SparsifyAux:
    """Everything ``method`` can reuse across candidates for one model's delta (over ``base``).

    Uniforms are taken as given, else drawn with ``torch.rand(delta.shape,
    generator=generator)``; call this model by model in recipe order to reproduce
    what a method draws itself from the same generator. ``gpu``: the delta will be merged on a GPU.
    """
    aux = SparsifyAux()
    if method.uses_sorted_abs:
        aux.sorted_abs = torch.sort(delta.abs().reshape(-1)).values
    if method.uses_uniforms:
        aux.uniforms = uniforms if uniforms is not None else uniforms_for(delta, None, generator)
    for key in method.aux_extras:
        if key == "abs_sum":
            aux.extra[key] = norm_of(delta, "l1")
        elif key == "della_rank":
            aux.extra[key] = della_rank(delta)
        elif key == "l1_below_u":
            table = None if aux.uniforms is None else l1_table(delta, aux.uniforms, gpu=gpu)
            if table is not None:
                aux.extra[key] = table
        elif key == "cosine":  # SLERP's angle between the base and the model
            from evomerge.methods.slerp import cosine  # noqa: PLC0415 (slerp is not a sparsifier)

            if base is None:
                raise ValueError("the 'cosine' aux needs the base tensor")
            aux.extra[key] = cosine(base, base + delta)
        else:
            raise ValueError(f"unknown aux extra {key!r}")
    return aux
