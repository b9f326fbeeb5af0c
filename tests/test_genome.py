"""The genome: search config -> Optuna distributions -> mergekit recipe (pure), and config errors."""
from __future__ import annotations

import copy

import optuna
import pytest
import torch

from evomerge.engine.prepared import PreparedMerge
from evomerge.engine.recipe import Recipe, evaluate_setting
from evomerge.errors import ConfigError
from evomerge.search.genome import Genome, layout_of
from evomerge.search.spec import parse_search
from search_factory import TIES, _random_point, family, genome  # noqa: F401  (family is a fixture)

# ---- genome --------------------------------------------------------------------------------
def test_per_layer_genes_give_exact_per_layer_values(family):
    g = genome(family)
    assert g.dimension == 3 * 2 * 4  # 3 models x (weight, density) x 4 layers
    p = _random_point(g)
    r = g.recipe(p)
    w = r.models[1].parameters["weight"]
    layers = w[-1]["value"]  # the per-layer gradient; the edge tensors' values are stated by name before it
    assert isinstance(layers, list) and len(layers) == 4
    for i in range(4):  # mergekit gradient: layer i at t = i / 3 gets element i exactly
        assert evaluate_setting(w, f"model.layers.{i}.mlp.up_proj.weight", i / 3) == pytest.approx(round(p[f"m1.weight.g{i}"], 6))
    # edges: follow, stated explicitly (mergekit 0.1.5 reads every edge tensor at t = 0)
    assert evaluate_setting(w, "model.embed_tokens.weight", 0.0) == layers[0]
    assert evaluate_setting(w, "lm_head.weight", 0.0) == evaluate_setting(w, "model.norm.weight", 0.0) == layers[-1]
    assert r.base_model == family[0] and r.parameters == {"normalize": True}


def test_groups_global_interpolation(family):
    g2 = genome(family, layers_per_group=2)
    assert g2.dimension == 3 * 2 * 2
    p = {k: 0.5 for k in g2.distributions()}
    p["m0.weight.g0"], p["m0.weight.g1"] = 0.2, 0.8
    assert g2.recipe(p).models[0].parameters["weight"][-1]["value"] == [0.2, 0.2, 0.8, 0.8]
    gi = genome(family, layers_per_group=2, interpolate=True)  # centres at layers 0.5 and 2.5
    w = gi.recipe(p).models[0].parameters["weight"][-1]["value"]
    assert w == pytest.approx([0.2, 0.35, 0.65, 0.8])
    gg = genome(family, layers_per_group="global")
    assert gg.dimension == 6 and "m0.weight" in gg.distributions()
    assert gg.recipe({k: 0.3 for k in gg.distributions()}).models[0].parameters["weight"] == 0.3


def test_modules_and_own_edges_are_mergekit_conditions(family):
    g = genome(family, layers_per_group="global", modules=["self_attn", "mlp"], edges="own")
    names = set(g.distributions())
    assert {"m0.weight.self_attn", "m0.weight.mlp", "m0.weight.embed", "m0.weight.head"} <= names
    p = {k: 0.5 for k in names}
    p.update({"m0.weight.self_attn": 0.2, "m0.weight.mlp": 0.6, "m0.weight.embed": 0.9, "m0.weight.head": 0.1})
    setting = g.recipe(p).models[0].parameters["weight"]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.3) == 0.2
    assert evaluate_setting(setting, "model.layers.1.mlp.down_proj.weight", 0.3) == 0.6
    assert evaluate_setting(setting, "model.layers.1.input_layernorm.weight", 0.3) == pytest.approx(0.4)  # mean rule
    assert evaluate_setting(setting, "model.embed_tokens.weight", 0.0) == 0.9
    assert evaluate_setting(setting, "lm_head.weight", 1.0) == 0.1
    assert evaluate_setting(setting, "model.norm.weight", 1.0) == 0.1
    Recipe.from_dict(g.recipe(p).to_dict())  # a valid recipe


def test_categorical_gene_and_negative_weights(family):
    g = genome(family, layers_per_group="global", genes={"weight": {"low": -0.5, "high": 1.0},
                                                          "density": {"low": 0.1, "high": 1.0},
                                                          "normalize": {"choices": [True, False]}},
               parameters={})
    assert isinstance(g.distributions()["normalize"], optuna.distributions.CategoricalDistribution)
    p = {k: (False if k == "normalize" else -0.25) for k in g.distributions()}
    r = g.recipe(p)
    assert r.parameters["normalize"] is False and r.models[0].parameters["weight"] == -0.25


def test_recipe_replays_from_yaml(family, tmp_path):
    g = genome(family)
    r = g.recipe(_random_point(g, 3))
    path = r.save(tmp_path / "r.yaml")
    from evomerge.engine.recipe import load_recipe

    again = load_recipe(path)
    assert again.to_mergekit() == r.to_mergekit()


@pytest.mark.parametrize("method,extra", [
    ("ties", {}),
    ("dare_ties", {"parameters": {"normalize": True}}),
    ("task_arithmetic", {"genes": {"weight": {"low": 0.0, "high": 1.0}}, "parameters": {}, "textbook": {"weight": 0.5}}),
])
def test_alone_baselines_reproduce_each_model(family, method, extra):
    """Weight 1 / 0 and density 1 is the source model itself, for every method the math searches use."""
    base, sources = family
    g = genome(family, method=method, **extra)
    bl = g.baselines()
    assert list(bl) == ["alone:m0", "alone:m1", "alone:m2", "textbook"]
    engine = PreparedMerge(g.recipe(bl["textbook"]), device="cpu", progress=False)
    from safetensors.torch import load_file

    for name, path in sources.items():
        engine.apply(g.recipe(bl[f"alone:{name}"]))
        want = load_file(f"{path}/model.safetensors")
        for k, v in engine.state_dict().items():
            assert torch.allclose(v, want[k], atol=1e-6, rtol=0), (name, k)


def test_slerp_pair_baselines_are_the_two_ends(family):
    base, sources = family
    pair = {k: sources[k] for k in ("m0", "m1")}
    spec = parse_search({"name": "s", "method": "slerp", "base_model": "first", "genes": {"t": {"low": 0.0, "high": 1.0}},
                         "textbook": {"t": 0.5}})
    g = Genome(spec, pair, base, layout_of(base))
    assert g.dimension == 4 and "t.g0" in g.distributions()
    bl = g.baselines()
    assert set(bl) == {"alone:m0", "alone:m1", "textbook"}
    r = g.recipe(bl["alone:m1"])
    assert r.base_model == sources["m0"] and [m.model for m in r.models] == [sources["m0"], sources["m1"]]
    engine = PreparedMerge(g.recipe(bl["textbook"]), device="cpu", progress=False)
    from safetensors.torch import load_file

    for name in ("m0", "m1"):
        engine.apply(g.recipe(bl[f"alone:{name}"]))
        want = load_file(f"{sources[name]}/model.safetensors")
        for k, v in engine.state_dict().items():
            assert torch.allclose(v, want[k], atol=1e-5, rtol=1e-5), (name, k)


def test_fingerprint_tracks_the_space(family):
    assert genome(family).fingerprint() == genome(family).fingerprint()
    assert genome(family).fingerprint() != genome(family, layers_per_group=2).fingerprint()


# ---- config errors (pure) -------------------------------------------------------------------
@pytest.mark.parametrize("over,needle", [
    ({"genes": {"weight": {"low": 0, "high": 1}, "density": {"low": 0.1, "high": 1.5}}}, "search.genes.density.high"),
    ({"genes": {"weight": {"low": 0, "high": 1}, "densty": {"low": 0.1, "high": 1}}}, "has no parameter 'densty'"),
    ({"method": "tis"}, "unknown merge_method 'tis'"),
    ({"layers_per_group": 0}, "search.layers_per_group"),
    ({"genes": {"density": {"low": 0.1, "high": 1.0}}}, "needs 'weight'"),
    ({"n_trials": 0}, "search.n_trials"),
    ({"bogus": 1}, "search.bogus"),
])
def test_bad_search_configs(over, needle):
    cfg = copy.deepcopy(TIES)
    cfg.update(over)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        parse_search(cfg)


def test_method_needing_a_base_without_one(family):
    _, sources = family
    g = parse_search(TIES)
    base_dir = family[0]
    with pytest.raises(ConfigError, match="needs a base model"):
        Genome(g, sources, None, layout_of(base_dir))
