"""One prepared engine, several merge methods (the method-gene search): every method's tensors as an engine
prepared for it alone gives them, and as the one-shot merge does.

Where the paths meet exactly and where they differ by rounding:

* a method over the prepared base's task vectors (the task-arithmetic family, model_stock, SLERP from the
  base, nuslerp over task vectors) gets the resident task vectors and exactly the aux an engine prepared for it
  alone holds: equal to that engine bit for bit, and to the one-shot merge as that engine is (bit for bit, a
  reduction's rounding for model_stock);
* a method that merges models (linear, nuslerp without a base, SLERP between two sources) gets each model as
  ``base + (model - base)``, two float32 roundings away from the stored model: at most ``u (2|m| + |b|)``,
  ``u = eps / 2``, i.e. 1.5 float32 steps of the tensor's largest magnitude. A weighted sum with coefficients
  ``c`` carries that times ``sum |c|`` (one for a normalised average, about one for SLERP and nuslerp at the
  small angles between fine-tunes), and the output's own rounding may land one step apart: the bound below is
  ``4 eps max(|inputs|)``, with room for coefficients a little above one.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.engine.oneshot import merge_to_dir
from evomerge.engine.prepared import PreparedMerge
from evomerge.engine.recipe import Recipe
from evomerge.errors import MergeError
from model_factory import make_family

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("multi"), "llama")


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _recipe(method: str, base: Path | None, models: list[Path], params: list[dict], glob: dict | None = None) -> Recipe:
    data = {"merge_method": method, "models": [{"model": str(m), "parameters": p} for m, p in zip(models, params)],
            "dtype": "float32", "parameters": glob or {}}
    if base is not None:
        data["base_model"] = str(base)
    return Recipe.from_dict(data, source_file=f"<{method}>")


W3 = [{"weight": 0.5, "density": 0.4}, {"weight": 0.3, "density": 0.8}, {"weight": 0.2, "density": 0.6}]

# (id, method, base: "base" | "none" | index of a model, models (indices), per-model params, global params, derived)
# derived: the engine rebuilds models from task vectors. SLERP from the base is not derived, but the one-shot merge
# interpolates the stored model where every prepared engine holds its task vector (test_engine's SLERP case):
# that one meets the one-shot merge within the same rounding bound.
ONESHOT_ROUNDS = {"slerp_from_base"}
CASES = [
    ("task_arithmetic", "task_arithmetic", "base", [0, 1, 2], [{"weight": 0.7}, {"weight": -0.3}, {"weight": 0.5}], {}, False),
    ("ties", "ties", "base", [0, 1, 2], W3, {"lambda": 1.3}, False),
    ("dare_ties", "dare_ties", "base", [0, 1, 2], W3, {}, False),
    ("dare_linear", "dare_linear", "base", [0, 1, 2], W3, {}, False),
    ("breadcrumbs", "breadcrumbs", "base", [0, 1, 2], [{**p, "density": 0.8, "gamma": 0.05} for p in W3], {}, False),
    ("breadcrumbs_ties", "breadcrumbs_ties", "base", [0, 1, 2], [{**p, "density": 0.9} for p in W3], {}, False),
    ("della", "della", "base", [0, 1, 2], [{**p, "density": 0.5} for p in W3], {}, False),
    ("della_linear", "della_linear", "base", [0, 1, 2], [{**p, "density": 0.5, "epsilon": 0.1} for p in W3], {}, False),
    ("model_stock", "model_stock", "base", [0, 1, 2], [{}, {}, {}], {"filter_wise": True}, False),
    ("nuslerp_task_vectors", "nuslerp", "base", [0, 1], [{"weight": 0.3}, {"weight": 0.7}], {}, False),
    ("slerp_from_base", "slerp", "base", ["base", 0], [{}, {}], {"t": [0.0, 0.3, 0.7, 1.0]}, False),
    ("linear", "linear", "none", [0, 1, 2], [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], {}, True),
    ("linear_base_listed", "linear", "base", [0, 1, 2], [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], {}, True),
    ("nuslerp", "nuslerp", "none", [0, 1], [{"weight": 0.3}, {"weight": 0.7}], {}, True),
    ("slerp_pair", "slerp", 0, [0, 1], [{}, {}], {"t": [0.0, 0.3, 0.7, 1.0]}, True),
]
METHODS = sorted({c[1] for c in CASES})


def _case_recipe(fam, case) -> Recipe:
    base, fts = fam
    _, method, b, idx, params, glob, _ = case
    paths = [base if i == "base" else fts[i] for i in idx]
    base_path = base if b == "base" else None if b == "none" else fts[b]
    return _recipe(method, base_path, paths, params, glob)


@pytest.fixture(scope="module")
def input_scale(fam) -> dict[str, float]:
    """Each tensor's largest magnitude over the base and the models: the scale of its float32 rounding bounds."""
    base, fts = fam
    inputs = [_state(base)] + [_state(f) for f in fts]
    return {name: max(float(s[name].abs().max()) for s in inputs) for name in inputs[0]}


@pytest.fixture(scope="module")
def multi(fam):
    base, fts = fam
    return PreparedMerge(_recipe("ties", base, fts, W3), methods=METHODS, progress=False)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_method_from_one_engine(fam, multi, input_scale, tmp_path, case):
    """The several-method engine gives each method the tensors of an engine prepared for it alone (bit for bit
    over task vectors) and of the one-shot merge (float32 rounding where it rebuilds models)."""
    r = _case_recipe(fam, case)
    derived = case[-1]
    multi.apply(r)
    got = {k: v.clone() for k, v in multi.state_dict().items()}
    alone = PreparedMerge(r, progress=False).state_dict()
    want = _state(merge_to_dir(r, tmp_path / "one", out_dtype="float32", progress=False))
    for name, t in got.items():
        scale = input_scale[name]
        if derived:
            torch.testing.assert_close(t, want[name], rtol=0, atol=4 * EPS * scale, msg=name)
            torch.testing.assert_close(t, alone[name], rtol=0, atol=4 * EPS * scale, msg=name)
        else:
            assert torch.equal(t, alone[name]), name
            atol = 16 * EPS * scale if case[1] == "model_stock" else 0.0  # a reduction's rounding (test_engine)
            atol = 4 * EPS * scale if case[0] in ONESHOT_ROUNDS else atol
            torch.testing.assert_close(t, want[name], rtol=0, atol=atol, msg=name)


def test_masks_and_seeds_follow_the_recipe(fam, multi):
    """DARE/DELLA draws per seed as the single engine draws them, across method switches."""
    base, fts = fam
    for seed in (0, 7, 0):
        for method in ("dare_ties", "ties", "della"):
            r = _recipe(method, base, fts, W3)
            r.seed = seed
            multi.apply(r)
            alone = PreparedMerge(r, progress=False).state_dict()
            for name, t in multi.state_dict().items():
                assert torch.equal(t, alone[name]), (seed, method, name)


def test_refuses_what_it_was_not_prepared_for(fam, multi, tmp_path):
    base, fts = fam
    with pytest.raises(MergeError, match="prepare a new engine"):
        multi.apply(_recipe("karcher", base, fts, [{}, {}, {}]))  # a method not prepared
    other, _ = make_family(tmp_path / "other", "llama", n_models=1)
    with pytest.raises(MergeError, match="prepare a new engine"):
        multi.apply(_recipe("ties", other, fts, W3))  # another base
    with pytest.raises(MergeError, match="in their order"):
        multi.apply(_recipe("dare_ties", base, [fts[1], fts[0], fts[2]], W3))  # masks are drawn per position
    r = _recipe("ties", base, fts, W3)
    r.tokenizer_source = str(fts[0])
    with pytest.raises(MergeError, match="vocabulary"):
        multi.apply(r)  # another tokenizer (test_tokenizer_merge: part of a recipe's structure)
    r = _recipe("ties", base, fts, W3)
    r.dtype = None
    with pytest.raises(MergeError, match="compute dtype"):
        PreparedMerge(r, methods=["ties", "linear"], progress=False)
    with pytest.raises(MergeError, match="base_model"):
        PreparedMerge(_recipe("linear", None, fts, [{"weight": 1.0}] * 3), methods=["linear", "ties"], progress=False)


def test_resident_memory_is_the_union(fam, multi):
    """Inputs once; the precomputations of every method family on top (docs/merging.md states the sizes)."""
    base, fts = fam
    ties = PreparedMerge(_recipe("ties", base, fts, W3), progress=False).resident_bytes()
    union = multi.resident_bytes()
    assert union["inputs"] == ties["inputs"]  # base + 3 task vectors, once
    assert union["sorted_abs"] == ties["sorted_abs"] > 0
    per_model = union["inputs"] / 4  # one model's float32 bytes (base + 3 task vectors of the same size)
    assert union["uniforms"] == pytest.approx(3 * per_model)  # DARE / DELLA draws, one per model
    assert union["extra"] >= 3 * per_model  # DELLA's ranks (plus L1 norms and DARE's tables)


@pytest.mark.parametrize("memory", ["host", "disk"])
def test_memory_modes_agree(fam, memory):
    base, fts = fam
    ref = PreparedMerge(_recipe("ties", base, fts, W3), methods=METHODS, progress=False)
    eng = PreparedMerge(_recipe("ties", base, fts, W3), methods=METHODS, memory=memory, progress=False)
    for case in CASES:
        r = _case_recipe(fam, case)
        ref.apply(r)
        eng.apply(r)
        a, b = ref.state_dict(), eng.state_dict()
        for name in a:
            assert torch.equal(a[name], b[name]), (case[0], memory, name)


def test_disk_mode_reads_the_inputs_afresh_for_every_candidate(fam):
    """memory=disk re-reads the checkpoints per candidate; the live model once shared storage with the base's
    mapped tensors, so a second candidate read the first one's merged values as its base (fixed: a copy)."""
    base, fts = fam
    r2 = _recipe("ties", base, fts, [{**p, "weight": 0.9 - 0.3 * i} for i, p in enumerate(W3)])
    eng = PreparedMerge(_recipe("ties", base, fts, W3), memory="disk", progress=False)
    eng.apply(r2)
    want = PreparedMerge(r2, progress=False).state_dict()
    for name, t in eng.state_dict().items():
        assert torch.equal(t, want[name]), name


@pytest.fixture(scope="module")
def multi_gpu(fam):
    base, fts = fam
    return PreparedMerge(_recipe("ties", base, fts, W3), methods=METHODS, device="cuda", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the engine's Triton kernels")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_method_on_a_gpu_as_on_the_cpu(fam, multi, multi_gpu, input_scale, case):
    """On a GPU the fused kernels are Triton's and reductions add in another order, while masks, thresholds and
    DARE/DELLA's draws come from the same host-side tables: every method's tensors meet the CPU engine's within
    float32 rounding (the bound of the derived cases above, four times over for the reductions' order)."""
    r = _case_recipe(fam, case)
    multi.apply(r)
    want = {k: v.clone() for k, v in multi.state_dict().items()}
    multi_gpu.apply(r)
    for name, t in multi_gpu.state_dict().items():
        assert t.device.type == "cuda", name
        diff = (t.cpu() - want[name]).abs()
        off = int((diff > 16 * EPS * input_scale[name]).sum())
        assert off == 0, f"{case[0]} {name}: {off} of {diff.numel()} entries off, max {float(diff.max()):.3g}"
