"""The task-arithmetic family: one formula, eight names (mergekit's generalized task arithmetic).

For each model, its task vector ``delta = model - base`` is sparsified to its
``density`` (see :mod:`evomerge.methods.sparsify`), optionally rescaled, and
weighted. Then either all weighted deltas are summed (``divisor = sum(weight)``,
~0 -> 1), or, for the consensus methods, only the entries agreeing with the
elected sign (see :mod:`evomerge.methods.consensus`; ``divisor`` = per-entry sum
of the agreeing models' weights, 0 -> 1). ``normalize`` divides by the divisor,
``lambda`` scales the result, and it is added back onto the base.

=================  ==================  =========  =========  =======
method             sparsification      consensus  normalize  rescale
=================  ==================  =========  =========  =======
task_arithmetic    none                no         false      false
ties               magnitude           yes        true       false
dare_linear        random              no         false      true
dare_ties          random              yes        false      true
breadcrumbs        magnitude_outliers  no         false      false
breadcrumbs_ties   magnitude_outliers  yes        false      false
della              della_magprune      yes        true       true
della_linear       della_magprune      no         false      true
=================  ==================  =========  =========  =======

Defaults are mergekit 0.1.5's registry. Extensions beyond mergekit, all
defaulting to its behaviour: ``rescale_norm`` (``l1`` = mergekit; ``probability``
= the DARE/DELLA papers' 1/p) and ``consensus_method`` (``sum``; ``count`` is
mergekit's other, unexposed election). ``int8_mask`` is accepted and ignored:
it only saves memory in mergekit, masks here are never materialised per model.
``density`` and ``rescale`` are accepted but unused by ``task_arithmetic``,
as in mergekit.

Randomness: without ``aux.uniforms`` each model draws
``torch.rand(delta.shape, generator=inputs.generator)`` in recipe order, even
at density 1, so the stream lines up with :func:`sparsify.prepare_aux`.
"""
from __future__ import annotations

import torch

from evomerge.methods import sparsify as sp
from evomerge.methods._util import gparam, merge_error, mparam, need_base
from evomerge.methods.base import MergeInputs, MergeMethod, ParamDef, register
from evomerge.methods.consensus import CONSENSUS_METHODS, Term, accumulate, agreeing_sum, elect_sign

WEIGHT = ParamDef("weight")
DENSITY = ParamDef("density", 1.0, 0.0, 1.0)
GAMMA = ParamDef("gamma", 0.01, 0.0, 1.0)
EPSILON = ParamDef("epsilon", 0.15, 0.0, None)
INT8_MASK = ParamDef("int8_mask", False, kind=bool)
LAMBDA = ParamDef("lambda", 1.0)
RESCALE_NORM = ParamDef("rescale_norm", "l1", kind=str, choices=sp.RESCALE_NORMS)
CONSENSUS = ParamDef("consensus_method", "sum", kind=str, choices=CONSENSUS_METHODS)

_DIVISOR_EPS = 1e-8  # a plain weight sum below this is replaced by 1 (mergekit)


def _sparsify(kind: str | None, inputs: MergeInputs, i: int, delta: torch.Tensor,
              rescale: str | None) -> sp.Kept:
    aux = inputs.aux_for(i)
    density = float(mparam(inputs, i, DENSITY))
    if kind is None:
        return sp.Kept(delta)
    if kind == "magnitude":
        return sp.magnitude(delta, density, aux=aux, rescale=rescale)
    if kind == "magnitude_outliers":
        return sp.magnitude_outliers(delta, density, float(mparam(inputs, i, GAMMA)), aux=aux, rescale=rescale)
    uniforms = sp.uniforms_for(delta, aux, inputs.generator)
    if kind == "random":
        return sp.dare(delta, density, uniforms, aux=aux, rescale=rescale)
    if kind == "della_magprune":
        where = f"tensor {inputs.tensor_name or '<unnamed>'!r}, model {i}"
        return sp.della_magprune(delta, density, float(mparam(inputs, i, EPSILON)), uniforms,
                                 aux=aux, rescale=rescale, where=where)
    raise ValueError(f"unknown sparsification {kind!r}")


def generalized_task_arithmetic(inputs: MergeInputs, *, sparsification: str | None, consensus: bool,
                                default_normalize: bool, default_rescale: bool) -> torch.Tensor:
    base = need_base(inputs, "task arithmetic")
    if inputs.n_models == 0:
        return base.clone()
    normalize = bool(inputs.params.get("normalize", default_normalize))
    rescale = bool(inputs.params.get("rescale", default_rescale))
    rescale_norm = str(gparam(inputs, RESCALE_NORM)) if rescale else None
    if rescale_norm is not None and rescale_norm not in sp.RESCALE_NORMS:
        raise merge_error(inputs, f"rescale_norm {rescale_norm!r} is not one of {', '.join(sp.RESCALE_NORMS)}.")
    lam = float(gparam(inputs, LAMBDA))

    terms: list[Term] = []
    for i, delta in enumerate(inputs.deltas):
        if delta.shape != base.shape:
            raise merge_error(inputs, f"model {i} has shape {tuple(delta.shape)}, the base {tuple(base.shape)}.")
        weight = float(mparam(inputs, i, WEIGHT))
        terms.append(_weighted(_sparsify(sparsification, inputs, i, delta, rescale_norm), weight, base.dtype))

    if consensus:
        method = str(gparam(inputs, CONSENSUS))
        if method not in CONSENSUS_METHODS:
            raise merge_error(inputs, f"consensus_method {method!r} is not one of {', '.join(CONSENSUS_METHODS)}.")
        mixed, divisor = agreeing_sum(terms, elect_sign(terms, method), with_divisor=normalize)
        mixed = mixed.to(base.dtype)  # float32 sums of a float16 / bfloat16 compute, rounded once
        divisor = None if divisor is None else divisor.to(base.dtype)
        if divisor is not None:
            divisor.add_(torch.eq(divisor, 0, out=torch.empty_like(divisor)))  # 0 -> 1
            mixed.div_(divisor)
    else:
        acc: torch.Tensor | None = None
        for t in terms:
            if t.coef != 0:
                acc = accumulate(acc, t.tensor, t.coef, owned=t.owned)
        mixed = torch.zeros_like(base) if acc is None else acc.to(base.dtype)
        if normalize:
            weights = [t.weight for t in terms]
            total = float(torch.tensor(weights, dtype=base.dtype).sum())  # summed as mergekit sums them
            if abs(total) >= _DIVISOR_EPS:
                mixed.div_(total)
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)


def _weighted(kept: sp.Kept, weight: float, dtype: torch.dtype) -> Term:
    """A model's weighted task vector, formed as mergekit 0.1.5 forms it: rescale factor, weight and their
    product rounded to the compute dtype, so that the sums that follow add the same numbers in the same
    order (bit for bit in float32, float16 and bfloat16). Under float16 / bfloat16 it is handed on in
    float32: torch sums reduced-precision tensors in float32 and rounds once, which the caller then does."""
    w = float(torch.tensor(weight, dtype=dtype))
    x, owned = kept.tensor, kept.owned
    if kept.scale != 1:
        x, owned = x * float(torch.tensor(kept.scale, dtype=dtype)), True
    x = x.mul_(w) if owned else x.mul(w)
    return Term(x.float(), 1.0, w, True)


def _make(name: str, sparsification: str | None, consensus: bool, normalize: bool, rescale: bool,
          reference: str) -> MergeMethod:
    def merge(inputs: MergeInputs) -> torch.Tensor:
        return generalized_task_arithmetic(inputs, sparsification=sparsification, consensus=consensus,
                                           default_normalize=normalize, default_rescale=rescale)

    merge.__name__ = f"{name}_merge"
    model_params = [WEIGHT, DENSITY]
    if sparsification == "magnitude_outliers":
        model_params.append(GAMMA)
    if sparsification == "della_magprune":
        model_params.append(EPSILON)
    global_params = [INT8_MASK, ParamDef("normalize", normalize, kind=bool),
                     ParamDef("rescale", rescale, kind=bool), LAMBDA]
    if sparsification is not None:
        global_params.append(RESCALE_NORM)
    if consensus:
        global_params.append(CONSENSUS)
    extras: tuple[str, ...] = ("abs_sum",) if sparsification else ()
    if sparsification == "random":
        extras += ("l1_below_u",)
    if sparsification == "della_magprune":
        extras += ("della_rank",)
    return MergeMethod(
        name=name, merge=merge, needs_base=True,
        model_params=tuple(model_params), global_params=tuple(global_params),
        uses_sorted_abs=sparsification in ("magnitude", "magnitude_outliers"),
        uses_uniforms=sparsification in ("random", "della_magprune"),
        aux_extras=extras,
        doc=f"{name}: task arithmetic with {sparsification or 'no'} sparsification"
            f"{' and TIES sign consensus' if consensus else ''} ({reference}).",
    )


for _args in (
    ("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    ("ties", "magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    ("dare_linear", "random", False, False, True, "https://arxiv.org/abs/2311.03099"),
    ("dare_ties", "random", True, False, True, "https://arxiv.org/abs/2311.03099"),
    ("breadcrumbs", "magnitude_outliers", False, False, False, "https://arxiv.org/abs/2312.06795"),
    ("breadcrumbs_ties", "magnitude_outliers", True, False, False, "https://arxiv.org/abs/2312.06795"),
    ("della", "della_magprune", True, True, True, "https://arxiv.org/abs/2406.11617"),
    ("della_linear", "della_magprune", False, False, True, "https://arxiv.org/abs/2406.11617"),
):
    register(_make(*_args))
del _args
