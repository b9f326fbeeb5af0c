"""evomerge-merge against mergekit-yaml 0.1.5 itself, recipe for recipe.

The models are a tiny Llama family in which every tensor differs between the
models, embeddings, final norm and head included (as real fine-tunes do), so a
parameter evaluated at the wrong gradient position shows. The recipes are
mergekit's own example shapes: TIES with a density gradient, linear with
filters, SLERP with a ``t`` gradient per module, task arithmetic, passthrough
frankenmerges, multi-slice recipes with per-slice parameters.

Tolerances: float32 recipes must agree bit for bit where the two programs run the
same operations in the same order (passthrough copies); elsewhere the sums run in
another order (evomerge folds the weights into one coefficient per model and
accumulates model by model; mergekit multiplies, masks, then reduces), and the
allowance is 4 float32 epsilons times the tensor's largest magnitude
(:func:`mergekit_ref.scaled_error`; measured at most 0.7 here). float16 / bfloat16 compute
(``dtype:``): TIES, task arithmetic and linear round where mergekit rounds and
agree bit for bit; SLERP (mergekit computes its angle with another float32
formula) within one epsilon of the compute dtype times the tensor's scale in at
most 1 % of the entries (measured 0.3 %). Computing the same recipes in float32
(``evomerge: {compute_dtype: float32}``) changes about 20 % of the entries (the
issue's 18 % / 3e-3).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mergekit_ref as mk
from evomerge.engine.oneshot import merge_to_dir
from evomerge.engine.recipe import load_recipe
from model_factory import make_family

pytestmark = pytest.mark.slow  # runs mergekit-yaml from its own venv


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    base, fts = make_family(tmp_path_factory.mktemp("mkfam"), "llama", n_models=3, layers=4, scale=0.02)
    return {"A": base, "B": fts[0], "C": fts[1], "D": fts[2]}


def _fill(text: str, fam: dict[str, Path]) -> str:
    for k, v in fam.items():
        text = text.replace(f"@{k}", str(v))
    return text


RECIPES = {
    # mergekit's examples/ties.yml shape: a density gradient, a weight gradient, a filtered weight
    "ties_gradients": """
merge_method: ties
base_model: @A
models:
  - model: @A
  - model: @B
    parameters: {density: [1, 0.7, 0.1], weight: 1.0}
  - model: @C
    parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}
  - model: @D
    parameters:
      density: 0.33
      weight: [{filter: mlp, value: 0.5}, {value: 0.2}]
parameters: {normalize: true, int8_mask: true}
dtype: float32
""",
    "linear_filters": """
merge_method: linear
models:
  - model: @B
    parameters: {weight: [{filter: self_attn, value: [0.2, 0.8]}, {value: [1.0, 0.1, 0.5]}]}
  - model: @C
    parameters: {weight: 0.6}
  - model: @D
    parameters: {weight: [0.3, 1.0]}
dtype: float32
""",
    # mergekit's examples/gradient-slerp.yml shape
    "slerp_t_gradient": """
slices:
  - sources:
      - {model: @A, layer_range: [0, 4]}
      - {model: @B, layer_range: [0, 4]}
merge_method: slerp
base_model: @A
parameters:
  t:
    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
    - value: [0.2, 0.9]
dtype: float32
""",
    "task_arithmetic_lambda": """
merge_method: task_arithmetic
base_model: @A
models:
  - model: @B
    parameters: {weight: [0.9, 0.1]}
  - model: @C
    parameters: {weight: [{filter: embed, value: 0.7}, {filter: norm, value: [0.2, 0.4]}, {value: -0.3}]}
parameters: {lambda: 0.8, normalize: false}
dtype: float32
""",
    # a frankenmerge: layers of two models stacked, overlapping
    "passthrough_slices": """
slices:
  - sources: [{model: @B, layer_range: [0, 3]}]
  - sources: [{model: @C, layer_range: [1, 4]}]
merge_method: passthrough
dtype: float32
""",
    # per-slice parameters: embeddings resolve in the first slice, the final norm and head in the last
    "slerp_per_slice": """
slices:
  - sources:
      - {model: @A, layer_range: [0, 2]}
      - {model: @C, layer_range: [0, 2]}
    parameters: {t: [0.1, 0.6]}
  - sources:
      - {model: @A, layer_range: [2, 4]}
      - {model: @C, layer_range: [2, 4]}
    parameters: {t: [0.35, 0.8]}
merge_method: slerp
base_model: @A
dtype: float32
""",
    # per-source parameters in slices, one single-layer slice (t = 1 there), filters on the source's
    # tensor names (mergekit matches a per-model filter against that model's input tensor name)
    "linear_slices_sources": """
slices:
  - sources:
      - {model: @B, layer_range: [0, 2], parameters: {weight: [0.3, 0.9]}}
      - {model: @D, layer_range: [2, 4], parameters: {weight: [{filter: layers.3., value: 2.0}, {value: [1.0, 0.5]}]}}
  - sources:
      - {model: @C, layer_range: [3, 4], parameters: {weight: [0.25, 0.75]}}
      - {model: @B, layer_range: [1, 2], parameters: {weight: 0.5}}
merge_method: linear
dtype: float32
""",
    "ties_slices_base": """
slices:
  - sources:
      - {model: @A, layer_range: [0, 4]}
      - {model: @B, layer_range: [0, 4], parameters: {weight: [1.0, 0.2], density: [0.9, 0.3]}}
      - {model: @D, layer_range: [0, 4], parameters: {weight: 0.5, density: [0.2, 0.8]}}
    parameters: {normalize: false}
merge_method: ties
base_model: @A
dtype: float32
""",
    # values mergekit's pydantic accepts: numbers and booleans written as strings, a single condition
    "pydantic_values": """
merge_method: linear
models:
  - model: @B
    parameters: {weight: ["0.3", "1e0"]}
  - model: @C
    parameters: {weight: {filter: mlp, value: "5e-1"}}
parameters: {weight: 0.4, normalize: "true"}
dtype: float32
tokenizer_source: union
""",
    "karcher_string_tol": """
merge_method: karcher
models:
  - model: @B
  - model: @C
  - model: @D
parameters: {tol: 1e-5, max_iter: 20}
dtype: float32
tokenizer: {source: base}
""",
}

# float32 rounding allowed, in eps x the tensor's scale (mergekit_ref.scaled_error; module docstring):
# measured at most 0.7 on this fixture, where a parameter read at the wrong position gives about 1e5
TOLERANCE = {"passthrough_slices": 0, "ties_gradients": 0, "linear_filters": 0, "task_arithmetic_lambda": 0,
             "linear_slices_sources": 0, "ties_slices_base": 0, "pydantic_values": 0}


@pytest.fixture(scope="module")
def merged(fam, tmp_path_factory):
    """Every recipe through mergekit-yaml (one process) and through evomerge's one-shot merge."""
    mk.require()
    root = tmp_path_factory.mktemp("mk_vs_evomerge")
    jobs = []
    for name, text in RECIPES.items():
        path = root / f"{name}.yaml"
        path.write_text(_fill(text, fam))
        jobs.append((path, root / f"mk_{name}"))
    mk.mergekit_yaml(jobs)
    out = {}
    for path, mk_dir in jobs:
        ours = merge_to_dir(load_recipe(path), root / f"ev_{path.stem}", progress=False)
        out[path.stem] = (mk.state(ours), mk.state(mk_dir))
    return out


@pytest.mark.parametrize("name", list(RECIPES))
def test_float32_recipe_matches_mergekit(merged, name):
    ours, theirs = merged[name]
    mk.assert_same_tensors(ours, theirs, eps_units=TOLERANCE.get(name, 4), label=name)


def test_edge_tensors_differ_between_models(fam):
    """The fixture would hide a wrong gradient position if edge tensors were equal across models."""
    a, b = mk.state(fam["A"]), mk.state(fam["B"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert not torch.equal(a[name], b[name]), name


# ---- dtype: the compute dtype, as in mergekit ------------------------------------------------
LOW = {  # mergekit's examples/bio-merge.yml shape (ties, dtype: float16), and the other compute paths
    "ties": """
merge_method: ties
base_model: @A
models:
  - model: @B
    parameters: {density: 0.6, weight: 0.5}
  - model: @C
    parameters: {density: [0.3, 0.8], weight: [0.3, 0.6]}
  - model: @D
    parameters: {density: 0.5, weight: 0.3}
parameters: {normalize: true, int8_mask: true}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: @A
models:
  - model: @B
    parameters: {weight: 0.7}
  - model: @C
    parameters: {weight: [0.1, 0.45]}
""",
    "linear": """
merge_method: linear
models:
  - model: @B
    parameters: {weight: 0.3}
  - model: @C
    parameters: {weight: [0.5, 0.9]}
""",
    "slerp": """
merge_method: slerp
base_model: @A
models:
  - model: @A
  - model: @D
parameters: {t: [0.2, 0.7]}
""",
}


@pytest.fixture(scope="module")
def low_precision(fam, tmp_path_factory):
    mk.require()
    root = tmp_path_factory.mktemp("mk_low")
    jobs, cases = [], []
    for dtype in ("float16", "bfloat16"):
        for name, text in LOW.items():
            path = root / f"{name}_{dtype}.yaml"
            path.write_text(_fill(text, fam) + f"dtype: {dtype}\n")
            jobs.append((path, root / f"mk_{path.stem}"))
            cases.append((name, dtype, path))
    mk.mergekit_yaml(jobs)
    out = {}
    for (name, dtype, path), (_, mk_dir) in zip(cases, jobs):
        recipe = load_recipe(path)
        ours = mk.state(merge_to_dir(recipe, root / f"ev_{path.stem}", progress=False))
        recipe.compute_dtype = "float32"
        f32 = mk.state(merge_to_dir(recipe, root / f"f32_{path.stem}", progress=False))
        out[(name, dtype)] = (ours, f32, mk.state(mk_dir))
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(LOW))
def test_dtype_is_the_compute_dtype(low_precision, name, dtype):
    """``dtype: float16`` computes in float16 as mergekit does; ``evomerge.compute_dtype: float32``
    computes in float32 and lands further from mergekit (the explicit, more exact option)."""
    ours, f32, theirs = low_precision[(name, dtype)]
    if name == "slerp":  # mergekit's own float32 formula for the angle: 1 eps x scale in at most 1 % of entries
        fractions = mk.assert_same_tensors(ours, theirs, eps_units=1, label=f"{name} {dtype}")
        assert max(fractions.values(), default=0) <= 0.01, fractions
    else:  # the same roundings in the same order: bit for bit
        mk.assert_same_tensors(ours, theirs, label=f"{name} {dtype}")
    f32_fractions = mk.assert_same_tensors(f32, theirs, eps_units=float("inf"), label=f"{name} {dtype} f32")
    assert sum(f32_fractions.values()) / len(theirs) > 0.05  # float32 compute is another result (measured ~20 %)


# ---- a search's exported recipes replay to the scored model -----------------------------------
@pytest.fixture(scope="module")
def edge_trained(tiny_zoo, tmp_path_factory):
    """The tiny zoo's base and math specialists with embeddings, final norm and head perturbed per model
    (the zoo freezes them; real fine-tunes train them), so that a recipe that leaves their values to
    a gradient's endpoints replays to other weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from evomerge.engine.plan import layer_index

    root = tmp_path_factory.mktemp("edge_trained")
    out = {}
    for i, (name, src) in enumerate([("base", tiny_zoo.base), ("add", tiny_zoo.specialists["add"]),
                                     ("sub", tiny_zoo.specialists["sub"])]):
        dst = root / name
        shutil.copytree(src, dst)
        gen = torch.Generator().manual_seed(100 + i)
        for f in dst.glob("*.safetensors"):
            state = load_file(str(f))
            for k, v in state.items():
                if layer_index(k) is None:
                    state[k] = v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            save_file(state, str(f), metadata={"format": "pt"})
        out[name] = dst
    return out


def test_searched_recipes_replay_in_mergekit_to_the_scored_weights(edge_trained, tmp_path):
    """A short per-layer TIES search; the winner's best/recipe.yaml and a searched trial's exported recipe,
    run through mergekit-yaml, give exactly the weights the engine scored and evomerge exported (float32)."""
    import csv
    import subprocess
    import sys

    from evomerge.engine.prepared import PreparedMerge

    mk.require()
    run = tmp_path / "run"
    m = edge_trained
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge.run.app", "+search=ties_math", "search.n_trials=6", "search.limit=20",
         "search.pruning.enabled=false", "progress=false", "final.top_k=1", "final.score_cache=null",
         f"models.base={m['base']}", f"models.specialists={{add: {m['add']}, sub: {m['sub']}}}", f"hydra.run.dir={run}"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    searched = [r for r in csv.DictReader((run / "trials.csv").open()) if not r["baseline"] and r["state"] == "COMPLETE"]
    trial = searched[-1]["number"]
    proc = subprocess.run([sys.executable, "-m", "evomerge.export.cli", str(run), "--trial", trial, "--out",
                           str(tmp_path / "trial"), "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exports = {"best": run / "best", "trial": tmp_path / "trial"}
    assert "filter: model.norm.weight" in (exports["trial"] / "recipe.yaml").read_text()  # edges stated by name
    replayed = mk.mergekit_yaml([(d / "recipe.yaml", tmp_path / f"mk_{k}") for k, d in exports.items()])
    for (label, d), mk_dir in zip(exports.items(), replayed):
        exported = mk.state(d / "model")
        mk.assert_same_tensors(mk.state(mk_dir), exported, label=f"{label}: mergekit vs exported")
        scored = PreparedMerge(load_recipe(d / "recipe.yaml"), device="cpu", progress=False).state_dict()
        mk.assert_same_tensors(scored, {k: exported[k] for k in scored}, label=f"{label}: engine vs exported")


@pytest.mark.parametrize("extra,needle", [
    ({"modules": {"text_decoder": {"models": [{"model": "@B"}]}}}, "'modules:' (a multi-module recipe: text_decoder)"),
    ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "not both"),
    ({"evomerge": {"compute_dtyp": "float32"}}, "'evomerge' must be a mapping of seed, random_mode and compute_dtype"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
])
def test_unsupported_mergekit_keys_are_one_clear_error(fam, extra, needle):
    from evomerge.engine.recipe import Recipe
    from evomerge.errors import RecipeError

    data = {"merge_method": "linear", "models": [{"model": str(fam["B"])}, {"model": str(fam["C"])}], **extra}
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict(data, source_file="r.yaml")
    assert needle in str(err.value) and str(err.value).startswith("r.yaml"), str(err.value)


def test_per_slice_base_model_is_a_clear_error(fam):
    from evomerge.engine.recipe import Recipe
    from evomerge.errors import RecipeError

    sl = {"sources": [{"model": str(fam["B"]), "layer_range": [0, 4]}], "base_model": str(fam["A"])}
    with pytest.raises(RecipeError, match=r"slices\[0\]\.base_model"):
        Recipe.from_dict({"merge_method": "passthrough", "slices": [sl]}, source_file="r.yaml")


def test_compute_dtype_round_trips_and_torch_prefix(fam):
    from evomerge.engine.recipe import Recipe

    data = {"merge_method": "linear", "models": [{"model": str(fam["B"])}], "dtype": "torch.bfloat16",
            "evomerge": {"compute_dtype": "float32"}}
    r = Recipe.from_dict(data)
    assert r.dtype == "bfloat16" and r.compute_dtype == "float32"
    assert Recipe.from_dict(r.to_dict()).compute_dtype == "float32" and "evomerge" not in r.to_mergekit()


def test_cli_compute_dtype_flag_is_the_float32_option(low_precision, fam, tmp_path):
    """``evomerge-merge --compute-dtype float32`` gives the recipe's ``evomerge: {compute_dtype: float32}`` result."""
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(_fill(LOW["ties"], fam) + "dtype: float16\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "evomerge.engine.cli", str(recipe), str(out), "--no-progress",
                           "--compute-dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ours, f32, _ = low_precision[("ties", "float16")]
    got = mk.state(out)
    mk.assert_same_tensors(got, f32, label="--compute-dtype float32")
    assert any(not torch.equal(got[k], ours[k]) for k in ours)


@pytest.mark.parametrize("name", ["ties", "linear"])
def test_prepared_engine_computes_in_the_recipes_dtype(low_precision, fam, tmp_path, name):
    """The search's engine under ``dtype: bfloat16`` gives the one-shot (and so mergekit's) bfloat16 values."""
    from evomerge.engine.prepared import PreparedMerge

    recipe = tmp_path / "r.yaml"
    recipe.write_text(_fill(LOW[name], fam) + "dtype: bfloat16\n")
    got = PreparedMerge(load_recipe(recipe), device="cpu", progress=False).state_dict()
    ours, _, theirs = low_precision[(name, "bfloat16")]
    for k, v in got.items():
        assert torch.equal(v, ours[k].float()) and torch.equal(v, theirs[k].float()), k
