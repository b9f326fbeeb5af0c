"""Every merge method against a plain, hand-written reference of its paper/mergekit formula.

References are deliberately naive (element loops, argsort, float64) and run on
tiny tensors; the implementations under test are the vectorised float32 ones.
"""
from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import MergeError
from evomerge.methods import MergeInputs, ParamDef, SparsifyAux, get_method, method_names
from evomerge.methods import sparsify as sp
from evomerge.methods.sparsify import prepare_aux

ALL = {
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_linear",
    "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock",
    "passthrough", "nearswap", "sce",
}
TA_FAMILY = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
             "della", "della_linear"]


# ---- harness: resolve parameters the way the engine does ----------------------------
def resolve(name: str, model_params: list[dict], params: dict) -> tuple[list[dict], dict]:
    m = get_method(name)
    out_models = []
    for i, given in enumerate(model_params):
        vals = {}
        for p in m.model_params:
            v = given.get(p.name, p.default)
            assert v is not None, f"test forgot required {p.name}"
            vals[p.name] = p.check(v, f"model {i}")
        out_models.append(vals)
    glob = {}
    for p in m.global_params:
        v = params.get(p.name, p.default)
        assert v is not None, f"test forgot required {p.name}"
        glob[p.name] = p.check(v, "test")
    unknown = set(params) - {p.name for p in m.global_params}
    assert not unknown, unknown
    return out_models, glob


def run(name, base, models, model_params=None, *, aux=None, generator=None, as_deltas=False, **params):
    model_params = model_params if model_params is not None else [{} for _ in models]
    mps, glob = resolve(name, model_params, params)
    if as_deltas:
        inputs = MergeInputs(base=base, deltas=[m - base for m in models], model_params=mps, params=glob,
                             tensor_name="layers.0.w", aux=aux, generator=generator)
    else:
        inputs = MergeInputs(base=base, models=list(models), model_params=mps, params=glob,
                             tensor_name="layers.0.w", aux=aux, generator=generator)
    out = get_method(name).merge(inputs)
    assert out.dtype == torch.float32
    ref_shape = (base if base is not None else models[0]).shape
    assert out.shape == ref_shape
    return out


def rnd(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def family(n=3, shape=(6, 8), seed=0):
    base = rnd(*shape, seed=seed)
    return base, [base + rnd(*shape, seed=seed + 1 + i, scale=0.1) for i in range(n)]


def sgn(x: float) -> int:
    return (x > 0) - (x < 0)


# ---- plain references ------------------------------------------------------------
def ref_topk_mask(delta, density):
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    if density <= 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    order = torch.argsort(delta.abs().reshape(-1), descending=True)
    mask = torch.zeros(n)
    mask[order[:k]] = 1
    return mask.reshape(delta.shape)


def ref_breadcrumbs_mask(delta, density, gamma):
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.argsort(delta.abs().reshape(-1))
    mask = torch.zeros(n)
    mask[order[n_bot:n_bot + target]] = 1
    return mask.reshape(delta.shape)


def ref_della_probs(delta, density, eps):
    rows = delta.abs().reshape(1, -1) if delta.dim() < 2 else delta.abs()
    probs = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        order = sorted(range(rows.shape[1]), key=lambda j: float(rows[r, j]))
        for rank, j in enumerate(order):
            probs[r, j] = density - eps + 2 * eps * rank / (rows.shape[1] - 1)
    return probs.reshape(delta.shape)


def ref_l1_scale(delta, kept):
    before, after = float(delta.double().abs().sum()), float(kept.double().abs().sum())
    return 1.0 if before < 1e-7 or after < 1e-7 else before / after


def ref_gta(base, kept, weights, *, consensus, normalize, lam=1.0, vote="sum"):
    """Generalized task arithmetic, one entry at a time."""
    out = base.double().clone().reshape(-1)
    flat = [k.double().reshape(-1) for k in kept]
    for j in range(out.numel()):
        wd = [w * float(f[j]) for w, f in zip(weights, flat)]
        if consensus:
            votes = sum(wd) if vote == "sum" else sum(sgn(x) for x in wd)
            maj = 1 if votes >= 0 else -1
            agree = [i for i, x in enumerate(wd) if sgn(x) == maj]
            mixed = sum(wd[i] for i in agree)
            div = sum(weights[i] for i in agree)
            div = 1.0 if div == 0 else div
        else:
            mixed, div = sum(wd), sum(weights)
            div = 1.0 if abs(div) < 1e-8 else div
        if normalize:
            mixed /= div
        out[j] += lam * mixed
    return out.reshape(base.shape).float()


def ref_slerp(t, a, b):
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    nx, ny = x.norm().item(), y.norm().item()
    nx, ny = (nx if nx > 1e-8 else 1.0), (ny if ny > 1e-8 else 1.0)
    dot = max(-1.0, min(1.0, float((x / nx) @ (y / ny))))
    if abs(dot) > 0.9995:
        res = (1 - t) * x + t * y
    else:
        th = math.acos(dot)
        res = (math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)
    return res.reshape(a.shape).float()


# ---- registry ----------------------------------------------------------------------
def test_registry_names_flags_and_defaults():
    assert set(method_names()) == ALL
    defaults = {  # (normalize, rescale) per mergekit 0.1.5's registry
        "task_arithmetic": (False, False), "ties": (True, False), "dare_linear": (False, True),
        "dare_ties": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
        "della": (True, True), "della_linear": (False, True),
    }
    for name, (norm, resc) in defaults.items():
        m = get_method(name)
        assert (m.global_param("normalize").default, m.global_param("rescale").default) == (norm, resc), name
        assert m.global_param("lambda").default == 1.0 and m.global_param("int8_mask").default is False
        assert m.model_param("weight").required and m.model_param("density").default == 1.0
        assert m.needs_base
    assert {n for n in ALL if get_method(n).uses_sorted_abs} == {"ties", "breadcrumbs", "breadcrumbs_ties"}
    assert {n for n in ALL if get_method(n).uses_uniforms} == {"dare_linear", "dare_ties", "della", "della_linear"}
    assert get_method("breadcrumbs").model_param("gamma").default == 0.01
    assert get_method("della").model_param("epsilon").default == 0.15
    assert get_method("linear").global_param("normalize").default is True
    assert get_method("slerp").global_param("t").required
    with pytest.raises(MergeError, match="unknown merge_method"):
        get_method("nope")


# ---- parameter checking ---------------------------------------------------------------
@pytest.mark.parametrize("name,pname,value,is_model", [
    ("ties", "density", 1.7, True), ("ties", "density", -0.1, True), ("slerp", "t", -0.2, False),
    ("slerp", "t", 1.5, False), ("breadcrumbs", "gamma", 2.0, True), ("della", "epsilon", -0.01, True),
    ("nearswap", "t", -1.0, False), ("karcher", "max_iter", 2.5, False), ("ties", "density", float("nan"), True),
    ("dare_ties", "rescale_norm", "l3", False), ("ties", "consensus_method", "vote", False),
    ("ties", "normalize", "yes", False), ("sce", "select_topk", 1.2, False),
])
def test_bad_parameter_values_raise(name, pname, value, is_model):
    m = get_method(name)
    pdef = m.model_param(pname) if is_model else m.global_param(pname)
    assert isinstance(pdef, ParamDef)
    with pytest.raises(MergeError, match=pname):
        pdef.check(value, "recipe.yaml: tensor layers.0.w")


def test_good_parameter_values_pass():
    assert get_method("ties").model_param("density").check(1, "x") == 1.0
    assert get_method("task_arithmetic").model_param("weight").check(-0.5, "x") == -0.5
    assert get_method("karcher").global_param("max_iter").check(12.0, "x") == 12
    assert get_method("dare_ties").global_param("rescale_norm").check("probability", "x") == "probability"


# ---- task arithmetic family ----------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_negative_weights_and_lambda(normalize):
    base, models = family(3)
    weights = [1.0, -0.5, 0.25]
    out = run("task_arithmetic", base, models, [{"weight": w} for w in weights], normalize=normalize, **{"lambda": 0.7})
    ref = ref_gta(base, [m - base for m in models], weights, consensus=False, normalize=normalize, lam=0.7)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    # subtracting a skill: weight -1 on the only model gives base - delta
    neg = run("task_arithmetic", base, models[:1], [{"weight": -1.0}])
    torch.testing.assert_close(neg, 2 * base - models[0], atol=1e-6, rtol=1e-6)


def test_task_arithmetic_weights_summing_to_zero_do_not_divide():
    base, models = family(2)
    out = run("task_arithmetic", base, models, [{"weight": 1.0}, {"weight": -1.0}], normalize=True)
    torch.testing.assert_close(out, base + models[0] - models[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(density, normalize):
    base, models = family(3, shape=(5, 7))
    weights = [0.6, 1.0, -0.4]
    mps = [{"weight": w, "density": density} for w in weights]
    out = run("ties", base, models, mps, normalize=normalize)
    kept = [(m - base) * ref_topk_mask(m - base, density) for m in models]
    torch.testing.assert_close(out, ref_gta(base, kept, weights, consensus=True, normalize=normalize),
                               atol=1e-6, rtol=1e-5)


def test_ties_sign_ties_and_zeros_by_hand():
    base = torch.zeros(5)
    d1 = torch.tensor([1.0, 2.0, 0.0, -3.0, 0.0])
    d2 = torch.tensor([-1.0, -1.0, 0.0, 1.0, 4.0])
    out = run("ties", base, [base + d1, base + d2], [{"weight": 1.0}, {"weight": 1.0}])
    # entry 0: votes sum to 0 -> +1 wins, only d1 agrees -> 1/1
    # entry 1: +1 wins, only d1 -> 2/1; entry 2: nobody -> divisor 0 -> 1 -> 0
    # entry 3: -1 wins, only d1 -> -3/1; entry 4: zero in d1 never agrees -> 4/1
    assert out.tolist() == [1.0, 2.0, 0.0, -3.0, 4.0]
    not_norm = run("ties", base, [base + d1, base + d2], [{"weight": 0.5}, {"weight": 2.0}], normalize=False)
    # weighted: [0.5, 1, 0, -1.5, 0] and [-2, -2, 0, 2, 8]; votes -1.5, -1, 0, 0.5, 8
    # -> signs -, -, +, +, +: the weighted values of the agreeing model, not divided
    assert not_norm.tolist() == [-2.0, -2.0, 0.0, 2.0, 8.0]


def test_ties_count_consensus_option():
    base, models = family(3, shape=(4, 5), seed=4)
    weights = [1.0, 0.2, 0.3]
    out = run("ties", base, models, [{"weight": w} for w in weights], consensus_method="count")
    ref = ref_gta(base, [m - base for m in models], weights, consensus=True, normalize=True, vote="count")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", TA_FAMILY)
def test_one_model_weight_one_density_one_is_that_model(name):
    base, models = family(1, shape=(3, 4))
    out = run(name, base, models, [{"weight": 1.0, "density": 1.0}], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, models[0], atol=1e-6, rtol=1e-6)


def test_magnitude_keeps_top_k_and_edge_densities():
    d = rnd(40, seed=3)
    for density in (0.01, 0.2, 0.5, 0.99):
        kept = sp.magnitude(d, density)
        assert kept.owned and kept.scale == 1.0
        torch.testing.assert_close(kept.tensor, d * ref_topk_mask(d, density), atol=0, rtol=0)
    assert int((sp.magnitude(d, 0.001).tensor != 0).sum()) == 1  # positive density keeps >= 1
    assert int((sp.magnitude(d, 0.0).tensor != 0).sum()) == 0
    same = sp.magnitude(d, 1.0)
    assert same.tensor is d and not same.owned  # density 1: untouched, not copied
    for n in (1, 2, 3, 4):  # tiny tensors
        t = rnd(n, seed=n)
        torch.testing.assert_close(sp.magnitude(t, 0.5).tensor, t * ref_topk_mask(t, 0.5), atol=0, rtol=0)


def test_magnitude_exact_ties_at_threshold_keep_k_in_torch_sort_order():
    """k = 2 and three entries of magnitude 2: mergekit 0.1.5 keeps exactly k, those first in torch's
    sort of |delta| (descending); the eager sparsifier makes the same pick, with or without sorted_abs."""
    d = torch.tensor([3.0, -2.0, 2.0, 2.0, 1.0, 0.5])
    want = torch.zeros_like(d)
    top = torch.sort(d.abs(), descending=True).indices[:2]
    want[top] = d[top]
    for aux in (None, SparsifyAux(sorted_abs=torch.sort(d.abs()).values)):
        kept = sp.magnitude(d, 0.34, aux=aux).tensor
        assert torch.equal(kept, want) and int((kept != 0).sum()) == 2


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_sorted_abs_lookup_equals_computed_threshold(name):
    base, models = family(3, shape=(9, 11), seed=7)
    mps = [{"weight": w, "density": d} for w, d in zip([0.5, 1.0, 0.8], [0.2, 0.5, 0.9])]
    method = get_method(name)
    aux = [prepare_aux(method, m - base) for m in models]
    assert all(a.sorted_abs is not None and torch.all(a.sorted_abs[1:] >= a.sorted_abs[:-1]) for a in aux)
    with_aux = run(name, base, models, mps, aux=aux, as_deltas=True)
    without = run(name, base, models, mps, as_deltas=True)
    assert torch.equal(with_aux, without)
    assert not torch.equal(with_aux, run(name, base, models, [{**m, "density": 1.0} for m in mps]))


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.3, 0.0), (0.9, 0.2), (0.02, 0.01), (0.7, 0.05)])
def test_breadcrumbs_matches_reference(density, gamma):
    base, models = family(2, shape=(7, 9), seed=11)
    weights = [0.7, 0.6]
    mps = [{"weight": w, "density": density, "gamma": gamma} for w in weights]
    kept = [(m - base) * ref_breadcrumbs_mask(m - base, density, gamma) for m in models]
    for name, consensus in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
        out = run(name, base, models, mps)
        torch.testing.assert_close(out, ref_gta(base, kept, weights, consensus=consensus, normalize=False),
                                   atol=1e-6, rtol=1e-5)


def test_breadcrumbs_keeps_target_count_and_drops_outliers():
    d = torch.arange(1.0, 21.0)  # |d| = 1..20
    kept = sp.magnitude_outliers(d, 0.5, 0.1).tensor  # drop top 2 (19, 20), keep next 10 (9..18)
    assert kept.tolist() == [0.0] * 8 + list(range(9, 19)) + [0.0, 0.0]
    squeezed = sp.magnitude_outliers(d, 0.95, 0.1).tensor  # 19 kept: only one outlier can go
    assert squeezed.tolist() == list(range(1, 20)) + [0.0]


def _uniforms(models, base, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((m - base).shape, generator=g) for m in models]


@pytest.mark.parametrize("rescale_norm", ["l1", "probability", None])
def test_dare_matches_reference(rescale_norm):
    base, models = family(3, shape=(8, 8), seed=21)
    weights, densities = [0.5, 1.0, -0.3], [0.3, 0.6, 0.9]
    us = _uniforms(models, base, 5)
    aux = [SparsifyAux(uniforms=u) for u in us]
    kept = []
    for m, u, p in zip(models, us, densities):
        d = m - base
        k = d * (u < p).float()
        if rescale_norm == "l1":
            k = k * ref_l1_scale(d, k)
        elif rescale_norm == "probability":
            k = k / p
        kept.append(k)
    mps = [{"weight": w, "density": p} for w, p in zip(weights, densities)]
    opts = {"rescale": rescale_norm is not None}
    if rescale_norm:
        opts["rescale_norm"] = rescale_norm
    for name, consensus in (("dare_linear", False), ("dare_ties", True)):
        out = run(name, base, models, mps, aux=aux, **opts)
        torch.testing.assert_close(out, ref_gta(base, kept, weights, consensus=consensus, normalize=False),
                                   atol=1e-5, rtol=1e-5)


def test_rescale_norms_restore_the_delta_norm():
    d = rnd(50, seed=8)
    u = torch.rand(50, generator=torch.Generator().manual_seed(1))
    for norm, measure in (("l1", lambda x: x.abs().sum()), ("l2", lambda x: x.norm()),
                          ("linf", lambda x: x.abs().max())):
        k = sp.dare(d, 0.4, u, rescale=norm)
        torch.testing.assert_close(measure(k.tensor * k.scale), measure(d), rtol=1e-5, atol=1e-6)
    k = sp.dare(d, 0.4, u, rescale="probability")
    assert k.scale == pytest.approx(1 / 0.4)
    assert torch.equal(sp.dare(d, 0.0, u, rescale="probability").tensor, torch.zeros(50))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_given_uniforms_equal_regenerated_from_same_seed(name):
    base, models = family(3, shape=(6, 10), seed=31)
    mps = [{"weight": w, "density": 0.5} for w in (0.4, 0.9, 0.6)]
    method = get_method(name)
    g = torch.Generator().manual_seed(99)
    aux = [prepare_aux(method, m - base, generator=g) for m in models]
    with_aux = run(name, base, models, mps, aux=aux, as_deltas=True)
    fresh = run(name, base, models, mps, generator=torch.Generator().manual_seed(99), as_deltas=True)
    assert torch.equal(with_aux, fresh)
    other = run(name, base, models, mps, generator=torch.Generator().manual_seed(100), as_deltas=True)
    assert not torch.equal(with_aux, other)


def test_random_masks_nest_as_density_grows():
    d = rnd(16, 16, seed=2)
    u = torch.rand(16, 16, generator=torch.Generator().manual_seed(3))
    rank = sp.della_rank(d)
    prev_dare = prev_della = torch.zeros(16, 16, dtype=torch.bool)
    for p in (0.2, 0.4, 0.6, 0.8):
        dare = sp.dare(d, p, u).tensor != 0
        della = sp.della_magprune(d, p, 0.1, u, aux=SparsifyAux(extra={"della_rank": rank})).tensor != 0
        assert torch.all(dare >= prev_dare) and torch.all(della >= prev_della)
        assert dare.sum() > prev_dare.sum()
        prev_dare, prev_della = dare, della


def test_fresh_draws_keep_about_density():
    d = torch.ones(20000)
    kept = sp.dare(d, 0.3, sp.uniforms_for(d, None, torch.Generator().manual_seed(0))).tensor
    assert abs(float(kept.mean()) - 0.3) < 0.02


@pytest.mark.parametrize("shape", [(6, 9), (12,), (3, 2, 5)])
def test_della_rank_matches_explicit_ranks(shape):
    d = rnd(*shape, seed=41)
    ref = ref_della_probs(d, 0.5, 0.5) if len(shape) <= 2 else None  # p = rank in [0, 1] when density=eps=0.5
    rank = sp.della_rank(d)
    if ref is not None:
        torch.testing.assert_close(rank, ref, atol=1e-6, rtol=0)
    assert float(rank.min()) == 0.0 and float(rank.max()) == 1.0
    # one-entry rows have no ranking: keep probability = density
    assert torch.all(sp.della_rank(rnd(4, 1, seed=1)) == 0.5) and sp.della_rank(rnd(1, seed=1)).item() == 0.5


@pytest.mark.parametrize("rescale_norm", ["l1", "probability", None])
def test_della_matches_reference(rescale_norm):
    base, models = family(2, shape=(5, 8), seed=51)
    weights, densities, eps = [1.0, 0.5], [0.4, 0.6], 0.2
    us = _uniforms(models, base, 9)
    kept = []
    for m, u, p in zip(models, us, densities):
        d = m - base
        probs = ref_della_probs(d, p, eps)
        k = d * (u < probs).float()
        if rescale_norm == "l1":
            k = k * ref_l1_scale(d, k)
        elif rescale_norm == "probability":
            k = k / probs
        kept.append(k)
    mps = [{"weight": w, "density": p, "epsilon": eps} for w, p in zip(weights, densities)]
    opts = {"rescale": rescale_norm is not None}
    if rescale_norm:
        opts["rescale_norm"] = rescale_norm
    for name, consensus, normalize in (("della", True, True), ("della_linear", False, False)):
        out = run(name, base, models, mps, aux=[SparsifyAux(uniforms=u) for u in us], **opts)
        ref = ref_gta(base, kept, weights, consensus=consensus, normalize=normalize)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_della_rank_from_aux_is_used_and_bad_epsilon_is_a_merge_error():
    base, models = family(1, shape=(4, 6), seed=61)
    u = _uniforms(models, base, 1)[0]
    d = models[0] - base
    fake_rank = torch.zeros_like(d)  # every entry at the lowest probability
    a = run("della_linear", base, models, [{"weight": 1.0, "density": 0.5, "epsilon": 0.3}],
            aux=[SparsifyAux(uniforms=u, extra={"della_rank": fake_rank})], rescale=False)
    torch.testing.assert_close(a, base + d * (u < 0.2).float(), atol=1e-6, rtol=1e-6)
    with pytest.raises(MergeError, match=r"layers\.0\.w.*epsilon"):
        run("della", base, models, [{"weight": 1.0, "density": 0.9, "epsilon": 0.15}],
            aux=[SparsifyAux(uniforms=u)])


def test_prepare_aux_contents():
    d = rnd(5, 6, seed=71)
    aux = prepare_aux(get_method("della"), d, generator=torch.Generator().manual_seed(0))
    assert aux.sorted_abs is None and aux.uniforms is not None and aux.uniforms.shape == d.shape
    assert aux.extra["abs_sum"] == pytest.approx(float(d.abs().sum()), rel=1e-6)
    assert torch.equal(aux.extra["della_rank"], sp.della_rank(d))
    t = prepare_aux(get_method("ties"), d)
    assert torch.equal(t.sorted_abs, torch.sort(d.abs().reshape(-1)).values) and t.uniforms is None
    assert prepare_aux(get_method("task_arithmetic"), d).extra == {}


# ---- interpolations -----------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (4,), (6, 7)])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_matches_formula_and_endpoints(shape, t):
    a, b = rnd(*shape, seed=1), rnd(*shape, seed=2)
    out = run("slerp", a, [b], t=t)
    torch.testing.assert_close(out, ref_slerp(t, a, b), atol=1e-5, rtol=1e-5)
    if t == 0.0:
        assert torch.equal(out, a)
    if t == 1.0:
        assert torch.equal(out, b)


def test_slerp_parallel_and_antiparallel_fall_back_to_lerp():
    a = rnd(5, 4, seed=3)
    for b in (2.5 * a, -a, 3 * a + 1e-5 * rnd(5, 4, seed=4)):
        out = run("slerp", a, [b], t=0.3)
        torch.testing.assert_close(out, 0.7 * a + 0.3 * b, atol=1e-6, rtol=1e-6)
    # orthogonal unit vectors: the midpoint stays on the unit circle (not the lerp's 0.707)
    out = run("slerp", torch.tensor([1.0, 0.0]), [torch.tensor([0.0, 1.0])], t=0.5)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(0.5)] * 2))
    z = run("slerp", torch.zeros(3), [torch.tensor([1.0, 2.0, 3.0])], t=0.5)  # zero norm counts as 1
    torch.testing.assert_close(z, ref_slerp(0.5, torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])))


def ref_nuslerp_rows(t, v0, v1):
    out = torch.empty_like(v0, dtype=torch.float64)
    for r in range(v0.shape[0]):
        x, y = v0[r].double(), v1[r].double()
        ux, uy = x / max(x.norm().item(), 1e-7), y / max(y.norm().item(), 1e-7)
        c = max(-1.0, min(1.0, float(ux @ uy)))
        if 1 - c * c <= 1e-16:
            out[r] = (1 - t) * x + t * y
        else:
            th = math.acos(c)
            out[r] = (math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)
    return out.float()


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_reference(flatten, row_wise, with_base):
    base, (m0, m1) = family(2, shape=(4, 6), seed=81)
    w0, w1 = 0.3, 0.9
    t = w1 / (w0 + w1)
    v0, v1 = (m0 - base, m1 - base) if with_base else (m0, m1)
    if flatten:
        ref = ref_nuslerp_rows(t, v0.reshape(1, -1), v1.reshape(1, -1)).reshape(v0.shape)
    elif row_wise:
        ref = ref_nuslerp_rows(t, v0.T, v1.T).T
    else:
        ref = ref_nuslerp_rows(t, v0, v1)
    if with_base:
        ref = ref + base
    out = run("nuslerp", base if with_base else None, [m0, m1], [{"weight": w0}, {"weight": w1}],
              nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_nuslerp_weight_edge_cases():
    _, (m0, m1) = family(2, shape=(3, 3), seed=82)
    assert torch.equal(run("nuslerp", None, [m0, m1], [{"weight": 1.0}, {"weight": 0.0}]), m0)
    zero_sum = run("nuslerp", None, [m0, m1], [{"weight": 1.0}, {"weight": -1.0}])
    torch.testing.assert_close(zero_sum, ref_nuslerp_rows(0.5, m0.reshape(1, -1), m1.reshape(1, -1)).reshape(3, 3))
    par = run("nuslerp", None, [m0, 2 * m0], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(par, 1.5 * m0)


def ref_multislerp(vecs, weights, eps=1e-8):
    xs = [v.double().reshape(-1) for v in vecs]
    w = [x / sum(weights) for x in weights]
    norms = [x.norm() for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    tn = tangent.norm() + eps
    res = mean * torch.cos(tn) + tangent * torch.sin(tn) / tn
    return (res * sum(n * wi for n, wi in zip(norms, w))).reshape(vecs[0].shape).float()


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_matches_reference(with_base):
    base, models = family(3, shape=(5, 5), seed=91)
    weights = [0.2, 0.5, 0.3]
    vecs = [m - base for m in models] if with_base else models
    ref = ref_multislerp(vecs, weights) + (base if with_base else 0)
    out = run("multislerp", base if with_base else None, models, [{"weight": w} for w in weights])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_multislerp_edge_cases():
    a = rnd(4, seed=1)
    only = run("multislerp", None, [a], [{"weight": 2.0}])
    assert torch.equal(only, a) and only is not a
    anti = run("multislerp", None, [a, -a], [{"weight": 1.0}, {"weight": 1.0}])  # falls back to the lerp
    torch.testing.assert_close(anti, torch.zeros(4), atol=1e-6, rtol=0)
    with pytest.raises(MergeError, match="zero"):  # three inputs whose unit vectors cancel
        run("multislerp", None, [a, -a, a * 0 + 1], [{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.0}])
    with pytest.raises(MergeError, match="sum to ~0"):
        run("multislerp", None, [a, -a, a * 0 + 1], [{"weight": 1.0}, {"weight": 1.0}, {"weight": -2.0}])


def test_karcher_mean_properties():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    out = run("karcher", None, [a, b])
    # direction: the geodesic midpoint of the unit vectors; length: the mean norm (2)
    torch.testing.assert_close(out, 2 * torch.tensor([math.sqrt(0.5)] * 2), atol=1e-5, rtol=1e-5)
    xs = [rnd(6, seed=s) for s in (1, 2, 3)]
    out = run("karcher", None, xs, max_iter=100, tol=1e-7)
    mean = out.double() / out.double().norm()
    residual = torch.zeros(6, dtype=torch.float64)  # first-order optimality: log maps average to 0
    for x in xs:
        u = x.double() / x.double().norm()
        c = float(u @ mean)
        th = math.acos(max(-1.0, min(1.0, c)))
        residual += th / math.sin(th) * (u - c * mean) / 3
    assert residual.norm() < 1e-5
    assert out.norm().item() == pytest.approx(sum(x.norm().item() for x in xs) / 3, rel=1e-5)
    assert torch.equal(run("karcher", None, [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    single = run("karcher", None, [xs[0]])
    assert torch.equal(single, xs[0]) and single is not xs[0]


# ---- the rest -----------------------------------------------------------------------
def test_linear_matches_reference_and_rejects_zero_sum():
    base, models = family(3, shape=(3, 4), seed=101)
    weights = [0.2, 0.5, -0.1]
    ref = sum(w * m.double() for w, m in zip(weights, models))
    mps = [{"weight": w} for w in weights]
    torch.testing.assert_close(run("linear", None, models, mps), (ref / sum(weights)).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(run("linear", None, models, mps, normalize=False), ref.float(), atol=1e-6, rtol=1e-5)
    for normalize in (True, False):  # task vectors in, same answer
        torch.testing.assert_close(run("linear", base, models, mps, as_deltas=True, normalize=normalize),
                                   run("linear", None, models, mps, normalize=normalize), atol=1e-6, rtol=1e-5)
    with pytest.raises(MergeError, match="normalize"):
        run("linear", None, models[:2], [{"weight": 1.0}, {"weight": -1.0}])


def ref_model_stock(base, models, filter_wise):
    w0 = base.double()
    ws = [m.double() for m in models]
    rows = (w0.reshape(1, -1) if w0.dim() == 1 else w0) if filter_wise else w0.reshape(1, -1)
    out = torch.empty_like(rows)
    n = len(ws)
    for r in range(rows.shape[0]):
        offs = [(w.reshape(rows.shape)[r] - rows[r]) for w in ws]
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                c = float(offs[i] @ offs[j]) / max(offs[i].norm().item() * offs[j].norm().item(), 1e-6)
                cos.append(max(-1.0, min(1.0, c)))
        c = sum(cos) / len(cos)
        den = 1 + (n - 1) * c
        t = 0.0 if abs(den) < 1e-6 else n * c / den
        avg = sum(w.reshape(rows.shape)[r] for w in ws) / n
        out[r] = t * avg + (1 - t) * rows[r]
    return out.reshape(base.shape).float()


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(4, 6), (5,)])
def test_model_stock_matches_reference(filter_wise, shape):
    base = rnd(*shape, seed=111)
    shared = rnd(*shape, seed=112, scale=0.1)
    models = [base + shared + rnd(*shape, seed=113 + i, scale=0.05) for i in range(3)]
    out = run("model_stock", base, models, filter_wise=filter_wise)
    torch.testing.assert_close(out, ref_model_stock(base, models, filter_wise), atol=1e-5, rtol=1e-5)
    # offsets at exactly 180 degrees: 1 + (N-1) cos = 0, the base is kept
    d = rnd(*shape, seed=5)
    torch.testing.assert_close(run("model_stock", base, [base + d, base - d], filter_wise=filter_wise), base)


def test_passthrough_scales_and_copies():
    a = rnd(3, 2, seed=1)
    out = run("passthrough", None, [a])
    assert torch.equal(out, a) and out is not a
    torch.testing.assert_close(run("passthrough", None, [a], [{"scale": -0.5}]), -0.5 * a)
    with pytest.raises(MergeError, match="passthrough"):
        run("passthrough", None, [a, a], [{}, {}])


def test_nearswap_matches_reference():
    base = torch.tensor([0.0, 0.0, 1.0, 2.0, 5.0])
    model = torch.tensor([0.05, -0.5, 1.0, 2.2, 1.0])
    t = 0.1
    ref = []
    for a, b in zip(base.tolist(), model.tolist()):
        w = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        ref.append(w * b + (1 - w) * a)
    torch.testing.assert_close(run("nearswap", base, [model], t=t), torch.tensor(ref))
    assert torch.equal(run("nearswap", base, [model], t=0.0), base)
    torch.testing.assert_close(run("nearswap", base, [model], t=10.0), model)


def ref_sce(base, models, topk):
    tvs = torch.stack([m.double() - base.double() for m in models]).reshape(len(models), -1)
    n, numel = tvs.shape
    if topk < 1:
        var = tvs.var(dim=0, unbiased=False)
        k = int(int((var != 0).sum()) * topk)
        mask = torch.zeros(numel, dtype=torch.float64)
        mask[torch.argsort(var, descending=True)[:k]] = 1
        tvs = tvs * mask
    energy = [float((tv ** 2).mean()) for tv in tvs]
    w = [1 / n] * n if abs(sum(energy)) < 1e-6 else [e / sum(energy) for e in energy]
    out = torch.empty(numel, dtype=torch.float64)
    for j in range(numel):
        maj = 1 if float(tvs[:, j].sum()) >= 0 else -1
        agree = [i for i in range(n) if sgn(float(tvs[i, j])) == maj]
        out[j] = sum(w[i] * float(tvs[i, j]) for i in agree) / max(sum(w[i] for i in agree), 1e-6)
    return (base.double() + out.reshape(base.shape)).float()


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_reference(topk):
    base, models = family(3, shape=(6, 5), seed=121)
    models = [base + (m - base) * s for m, s in zip(models, (1.0, 3.0, 0.5))]  # unequal energies
    out = run("sce", base, models, select_topk=topk)
    torch.testing.assert_close(out, ref_sce(base, models, topk), atol=1e-6, rtol=1e-5)


# ---- properties every method shares ------------------------------------------------------
EXAMPLES = {  # name -> (n models, per-model params, global params, uses base)
    "linear": (3, {"weight": 0.4}, {}, False),
    "slerp": (1, {}, {"t": 0.3}, True),
    "nuslerp": (2, {"weight": 0.5}, {}, True),
    "multislerp": (3, {"weight": 0.4}, {}, True),
    "karcher": (3, {}, {}, False),
    "model_stock": (3, {}, {}, True),
    "passthrough": (1, {}, {}, False),
    "nearswap": (1, {}, {"t": 0.05}, True),
    "sce": (3, {}, {"select_topk": 0.5}, True),
    **{n: (3, {"weight": 0.5, "density": 0.5}, {}, True) for n in TA_FAMILY},
}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("numel", [1, 2, 3, 4, 30])
def test_inputs_untouched_and_models_or_deltas_agree(name, numel):
    n, mp, gp, uses_base = EXAMPLES[name]
    base, models = family(n, shape=(numel,), seed=numel)
    if name.startswith("della") and numel == 1:
        mp = {**mp, "epsilon": 0.1}
    mps = [dict(mp) for _ in range(n)]
    deltas = [m - base for m in models]
    keep = [t.clone() for t in (base, *models, *deltas)]
    kw = dict(gp)
    if get_method(name).uses_uniforms:
        us = _uniforms(models, base, 3)
        kw["aux"] = [SparsifyAux(uniforms=u) for u in us]
    from_models = run(name, base if uses_base else None, models, mps, **kw)
    inputs = MergeInputs(base=base, deltas=deltas, model_params=resolve(name, mps, gp)[0],
                         params=resolve(name, mps, gp)[1], tensor_name="t", aux=kw.get("aux"))
    from_deltas = get_method(name).merge(inputs) if uses_base else from_models
    assert all(torch.equal(a, b) for a, b in zip(keep, (base, *models, *deltas))), "inputs were modified"
    assert torch.isfinite(from_models).all()
    torch.testing.assert_close(from_deltas, from_models, atol=1e-5, rtol=1e-5)
    assert all(from_models.data_ptr() != t.data_ptr() for t in (base, *models, *deltas))


def test_missing_base_is_a_merge_error_naming_the_tensor():
    _, models = family(2)
    with pytest.raises(MergeError, match=r"'layers\.0\.w'.*base_model"):
        run("ties", None, models, [{"weight": 1.0}, {"weight": 1.0}])


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della", "sce", "task_arithmetic"])
def test_unsparsified_deltas_are_read_not_written(name):
    """At density 1 / select_topk 1 the engine's resident deltas go straight into the mix."""
    base, models = family(3, shape=(4, 5), seed=131)
    deltas = [m - base for m in models]
    keep = [d.clone() for d in deltas]
    if name == "sce":
        mps, gp = [{}, {}, {}], {"select_topk": 1.0}
    else:
        mps, gp = [{"weight": w, "density": 1.0} for w in (0.5, -0.7, 1.0)], {}
    m, g = resolve(name, mps, gp)
    out = get_method(name).merge(MergeInputs(base=base, deltas=deltas, model_params=m, params=g,
                                             generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(deltas, keep))
    if name != "sce":
        ref = ref_gta(base, keep, [0.5, -0.7, 1.0], consensus=name != "task_arithmetic",
                      normalize=get_method(name).global_param("normalize").default)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("given", ["models", "deltas"])
def test_fused_linear_combinations_match_eager(given):
    """linear and SLERP through the one-pass kernel give the eager result, whether the caller hands in
    the models or the task vectors (the engine gives SLERP task vectors, a one-shot merge the models)."""
    from evomerge.methods import fused

    g = torch.Generator().manual_seed(9)
    base = torch.randn(40, 30, generator=g)
    models = [base + 0.1 * torch.randn(40, 30, generator=g) for _ in range(3)]
    for name, mps, gp, ms in (("linear", [{"weight": 0.5}, {"weight": 0.3}, {"weight": -0.2}], {}, models),
                              ("slerp", [{}], {"t": 0.3}, models[:1])):
        m, p = resolve(name, mps, gp)
        kw = {"models": ms} if given == "models" else {"deltas": [x - base for x in ms]}
        inputs = MergeInputs(base=base, model_params=m, params=p, tensor_name="t", **kw)
        eager = get_method(name).merge(inputs)
        out = torch.empty_like(base)
        fused.merge_into(get_method(name), inputs, out)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6, msg=name)
        want = ref_slerp(0.3, base, ms[0]) if name == "slerp" else (0.5 * ms[0] + 0.3 * ms[1] - 0.2 * ms[2]) / 0.6
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=name)


def test_dare_kept_l1_table_matches_the_direct_sum():
    """DARE's density grid: the prepared kept-L1 table gives what summing the kept entries gives,
    in the eager method and in the fused kernel."""
    from evomerge.methods import fused

    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, 300, generator=g)
    deltas = [torch.randn(300, 300, generator=g) * 0.01 for _ in range(2)]
    us = [torch.rand(300, 300, generator=g) for _ in range(2)]
    table = sp.l1_below_u(deltas[0], us[0])
    for density in (1e-6, 0.05, 0.4, 0.5, 0.93):
        steps = sp.grid_steps(density)
        assert abs(steps / sp.U_GRID - density) <= 0.5 / sp.U_GRID or steps == 1
        direct = float(deltas[0].abs()[us[0] < steps / sp.U_GRID].double().sum())
        assert float(table[steps]) == pytest.approx(direct, rel=1e-12)
        with_table = sp.dare(deltas[0], density, us[0], aux=SparsifyAux(extra={"l1_below_u": table}), rescale="l1")
        without = sp.dare(deltas[0], density, us[0], rescale="l1")
        assert torch.equal(with_table.tensor, without.tensor)
        assert with_table.scale == pytest.approx(without.scale, rel=1e-5)
    mps, gp = [{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.7}], {}
    m, p = resolve("dare_ties", mps, gp)

    def inputs(aux):
        return MergeInputs(base=base, deltas=deltas, model_params=m, params=p, tensor_name="t", aux=aux)

    eager = get_method("dare_ties").merge(inputs([SparsifyAux(uniforms=u) for u in us]))
    out = torch.empty_like(base)
    tables = [SparsifyAux(uniforms=u, extra={"l1_below_u": sp.l1_below_u(d, u)}) for d, u in zip(deltas, us)]
    fused.merge_into(get_method("dare_ties"), inputs(tables), out)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
