"""One-pass kernels for the task-arithmetic family (and linear combinations), for the prepared engine's hot loop.

The eager implementation (:mod:`evomerge.methods.task_arithmetic`) runs a dozen
elementwise passes per tensor; a candidate is memory-bound, so each pass costs a
full read of the task vectors. Here the whole formula (threshold or random mask,
rescale, weights, sign election, agreeing sum, normalisation, lambda, + base) is
one ``torch.compile``d elementwise kernel per tensor that writes straight into
the live model's parameter: one read of the inputs, one write of the output.

Per-model scalars (threshold, band, mask density, weight, rescale factor) are
computed on the host from the same rules and the same precomputed aux as the
eager path and passed as tensors, so changing a candidate's parameters never
recompiles. Sizes are dynamic: one compiled kernel serves every tensor shape.

Methods whose result is a linear combination of their inputs with per-candidate
scalars (``MergeMethod.coefficients``: linear, SLERP) get a second, simpler kernel:
``a * base + sum(c_i * x_i)`` in one pass.

Results equal the eager path up to float32 rounding (the compiler may contract
a multiply-add); tests hold the two within 1e-6 relative.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from evomerge.methods import sparsify as sp
from evomerge.methods.base import MergeInputs, MergeMethod

# (sparsification, consensus) pairs the kernel covers; della's per-entry probabilities are not fused.
FUSABLE = {
    "task_arithmetic": (None, False), "ties": ("magnitude", True), "dare_linear": ("random", False),
    "dare_ties": ("random", True), "breadcrumbs": ("magnitude_outliers", False),
    "breadcrumbs_ties": ("magnitude_outliers", True),
}


def _mask(d: torch.Tensor, u: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """1.0 where the entry is kept: |d| in [lo, hi] (magnitude rules) and u < p (random rules)."""
    a = d.abs()
    keep = (a >= lo) & (a <= hi)
    if u is not None:
        keep = keep & (u < p)
    return keep.to(d.dtype)


def _gta(base: torch.Tensor, deltas: list[torch.Tensor], uniforms: list[torch.Tensor] | None,
         scalars: torch.Tensor, out: torch.Tensor, consensus: bool, normalize: bool,
         reduce: bool) -> torch.Tensor | None:
    # scalars = [lo, hi, p, coef, weight] (one per model each), then total weight, lambda: one tensor
    # argument instead of seven keeps the per-tensor call (guards, host-to-device copies) cheap.
    n = len(deltas)
    lo, hi, p, coef, weight = (scalars[k * n:(k + 1) * n] for k in range(5))
    total_weight, lam = scalars[5 * n], scalars[5 * n + 1]
    contribs = []
    for i, d in enumerate(deltas):
        u = None if uniforms is None else uniforms[i]
        contribs.append(d * _mask(d, u, lo[i], hi[i], p[i]) * coef[i])
    if consensus:
        votes = contribs[0]
        for c in contribs[1:]:
            votes = votes + c
        sign = torch.where(votes >= 0, 1.0, -1.0)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for i, c in enumerate(contribs):
            agree = (c * sign > 0).to(base.dtype)
            mixed = mixed + c * agree
            divisor = divisor + weight[i] * agree
        if normalize:
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = contribs[0]
        for c in contribs[1:]:
            mixed = mixed + c
        if normalize:
            mixed = mixed / total_weight
    merged = base + mixed * lam
    out.copy_(merged)
    return merged.sum() if reduce else None  # the NaN/inf check, in the same loop on a CPU (see _launch)


def _lincomb(base: torch.Tensor | None, xs: list[torch.Tensor], scalars: torch.Tensor, out: torch.Tensor,
             reduce: bool) -> torch.Tensor | None:
    # scalars = [a, c_0, c_1, ...]; without a base the sum starts at the first term
    acc = None if base is None else base * scalars[0]
    for i, x in enumerate(xs):
        term = x * scalars[i + 1]
        acc = term if acc is None else acc + term
    out.copy_(acc)
    return acc.sum() if reduce else None


def _kept_l1(d: torch.Tensor, u: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return (d.abs() * _mask(d, u, lo, hi, p)).sum()


_compiled: dict[str, Callable] = {}

# Compiled variants a kernel may keep. A kernel specialises on its flags (sign election, normalisation, a
# random mask, the in-kernel sum) and its number of models, so a search over every method reaches more
# variants than dynamo's default of 8 per function, after which each new one would run eagerly, several times
# slower, for the rest of the process.
RECOMPILE_LIMIT = 64


def _kernel(name: str, fn: Callable) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


def fusable(method: MergeMethod) -> bool:
    return method.name in FUSABLE or method.coefficients is not None


def _merge_lincomb(method: MergeMethod, inputs: MergeInputs, out: torch.Tensor) -> torch.Tensor:
    assert method.coefficients is not None
    a, cs, xs = method.coefficients(inputs)
    base = None if a is None else inputs.base.reshape(-1)  # type: ignore[union-attr]
    flat = out.view(-1)
    scalars = _to_device([0.0 if a is None else a, *cs], flat.device)
    return _launch("lincomb", _lincomb, flat, base, [x.reshape(-1) for x in xs], scalars, flat)


def _launch(name: str, fn: Callable, out: torch.Tensor, *args) -> torch.Tensor:
    """Run compiled kernel ``fn(*args, reduce)`` writing ``out``; returns the sum of what it wrote.

    On a CPU the kernel sums in its own loop (no second read of ``out``). On a GPU the compiler
    schedules a reduction in a dynamic-shape kernel from the first call's sizes; torch's own sum
    kernel is tuned for every size, so there ``out`` is summed after the kernel."""
    reduce = out.device.type == "cpu"
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        checksum = _kernel(name, fn)(*args, reduce)
    return checksum if reduce else out.sum()


def merge_into(method: MergeMethod, inputs: MergeInputs, out: torch.Tensor) -> torch.Tensor:
    """Merge ``inputs`` with ``method`` into ``out`` (any float dtype); returns the sum of the merged values.

    The sum is finite exactly when every merged value is (barring float32 overflow of the total):
    the caller's NaN check, for free.
    """
    from evomerge.methods._util import gparam, mparam  # noqa: PLC0415 (avoid a cycle at import)
    from evomerge.methods import task_arithmetic as ta  # noqa: PLC0415

    if method.name not in FUSABLE:
        return _merge_lincomb(method, inputs, out)
    sparsification, consensus = FUSABLE[method.name]
    assert inputs.base is not None
    # Flat views: every tensor is 1-D for the compiled kernel, so one graph serves all shapes and ranks
    # (a 2-D and a 1-D tensor, or a Parameter, would otherwise each cost a recompile).
    base = inputs.base.reshape(-1)
    deltas = [d.reshape(-1) for d in inputs.deltas]
    out = out.view(-1)
    n = base.numel()
    normalize = bool(inputs.params.get("normalize", method.global_param("normalize").default))  # type: ignore[union-attr]
    rescale = bool(inputs.params.get("rescale", method.global_param("rescale").default))  # type: ignore[union-attr]
    rescale_norm = str(gparam(inputs, ta.RESCALE_NORM)) if (rescale and sparsification) else None
    if consensus and str(gparam(inputs, ta.CONSENSUS)) != "sum":
        raise NotImplementedError("fused kernel elects signs by sum only")

    lo, hi, p, coef, weight = [], [], [], [], []
    uniforms: list[torch.Tensor] | None = [] if sparsification == "random" else None
    for i, d in enumerate(deltas):
        aux = inputs.aux_for(i)
        w = float(mparam(inputs, i, ta.WEIGHT))
        density = float(mparam(inputs, i, ta.DENSITY)) if sparsification else 1.0
        l, h, q, sparse = 0.0, math.inf, 2.0, False  # defaults keep everything
        if sparsification and density < 1:
            sparse = True
            if density <= 0 or n == 0:
                l = math.inf  # keeps nothing
            elif sparsification == "magnitude":
                l = sp.ascending_abs_at(d, n - max(1, int(density * n)), aux)
            elif sparsification == "magnitude_outliers":
                target = int(density * n)
                if target <= 0:
                    l = math.inf
                else:
                    n_bot = max(0, n - target - int(float(mparam(inputs, i, ta.GAMMA)) * n))
                    l = sp.ascending_abs_at(d, n_bot, aux)
                    if n_bot + target < n:
                        h = sp.ascending_abs_at(d, n_bot + target - 1, aux)
            else:
                q = sp.grid_steps(density) / sp.U_GRID  # the eager rule's grid (sparsify.dare)
        if uniforms is not None:
            uniforms.append(sp.uniforms_for(inputs.deltas[i], aux, inputs.generator).reshape(-1))
        scale = 1.0
        if sparse and rescale_norm is not None and l != math.inf:
            scale = _rescale(rescale_norm, d, density, aux, l, h, q, None if uniforms is None else uniforms[-1])
        lo.append(l), hi.append(h), p.append(q), coef.append(w * scale), weight.append(w)
    total = sum(weight)
    scalars = _to_device([*lo, *hi, *p, *coef, *weight, total if abs(total) >= 1e-8 else 1.0,
                          float(gparam(inputs, ta.LAMBDA))], base.device)
    return _launch("gta", _gta, out, base, deltas, uniforms, scalars, out, consensus, normalize)


def _to_device(values: list[float], dev: torch.device) -> torch.Tensor:
    """A float32 tensor of ``values`` on ``dev`` without stalling a GPU: a copy from pageable host memory
    waits for every kernel queued before it, one from pinned memory does not (torch's pinned-memory
    cache keeps the buffer alive until the copy has run)."""
    host = torch.tensor(values, dtype=torch.float32)
    return host if dev.type == "cpu" else host.pin_memory().to(dev, non_blocking=True)


def _rescale(norm: str, d: torch.Tensor, density: float, aux, lo: float, hi: float, p: float,
             u: torch.Tensor | None) -> float:
    """The eager path's rescale factor: 1/p, or full-L1 / kept-L1 (kept-L1 in one reduction pass)."""
    if norm == "probability":
        return 1.0 / density
    if norm != "l1":
        raise NotImplementedError(f"fused kernel rescales by l1 or probability, not {norm!r}")
    before = aux.extra.get("abs_sum") if aux is not None else None
    if before is None:
        before = sp.norm_of(d, "l1")
    after = sp.kept_l1_lookup(aux, sp.grid_steps(p)) if u is not None else None  # DARE: the prepared table
    if after is None:
        dev = d.device
        after = float(_kernel("kept_l1", _kept_l1)(
            d, u, torch.tensor(lo, device=dev), torch.tensor(hi, device=dev), torch.tensor(p, device=dev)))
    if before < sp._NORM_EPS or after < sp._NORM_EPS:
        return 1.0
    return before / after
