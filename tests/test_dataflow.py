"""The data-flow space: genome, in-memory layer stacking, export and replay (tiny zoo and tiny families)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge.engine.oneshot import merge_to_dir
from evomerge.engine.recipe import Recipe, load_recipe
from evomerge.engine.stack import StackEngine
from evomerge.errors import ConfigError, MergeError
from evomerge.search.dataflow import SCALED, DataflowGenome, Slot, parse_dataflow, stack_recipe
from evomerge.search.genome import layout_of
from mergekit_ref import assert_same_tensors, mergekit_yaml, state  # tests/ helpers
from model_factory import make_family

IDS = torch.tensor([[5, 8, 9, 12, 7, 6, 10, 11, 4]])


def _genome(tiny_zoo, **over) -> DataflowGenome:
    cfg = {"space": "dataflow", "repeats": 2, "scale": {"low": 0.5, "high": 1.5}, "n_trials": 10, **over}
    sources = {k: str(tiny_zoo.specialists[k]) for k in ("add", "sub")}
    return DataflowGenome(parse_dataflow(cfg), sources, layout_of(sources["add"]))


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ---- the genome ----------------------------------------------------------------------------
def test_space_is_one_logit_per_slot_and_source_plus_a_scale(tiny_zoo):
    g = _genome(tiny_zoo)
    assert g.dimension == 2 * 4 * (2 + 1)
    assert {"p0.l0.add", "p0.l0.sub", "p0.l0.scale", "p1.l3.sub"} <= set(g.distributions())
    assert _genome(tiny_zoo, scale=None).dimension == 2 * 4 * 2


def test_decoding_rule_argmax_above_zero_else_skipped(tiny_zoo):
    g = _genome(tiny_zoo)
    params = {name: -0.5 for name in g.distributions()}
    params.update({f"p{p}.l{l}.scale": 1.0 for p in range(2) for l in range(4)})
    params.update({"p0.l0.add": 0.3, "p0.l0.sub": 0.2,     # both above 0: the larger logit's source
                   "p0.l2.sub": 0.9, "p0.l2.scale": 0.75,  # a scaled slot
                   "p1.l0.add": 0.1,                       # a second pass repeats layer 0
                   "p1.l3.sub": 0.0})                      # exactly 0 is not above 0: skipped
    assert g.decode(params) == [Slot("add", 0, 1.0), Slot("sub", 2, 0.75), Slot("add", 0, 1.0)]
    none = {name: (1.0 if name.endswith("scale") else -0.5) for name in g.distributions()}
    none["p1.l2.sub"] = -0.1
    assert g.decode(none) == [Slot("sub", 2, 1.0)]  # every slot skipped: the one with the largest logit is kept


def test_baselines_decode_to_each_source_and_the_frankenmerge(tiny_zoo):
    g = _genome(tiny_zoo)
    b = g.baselines()
    assert list(b) == ["alone:add", "alone:sub", "frankenmerge:add+sub"]
    assert g.decode(b["alone:sub"]) == [Slot("sub", l, 1.0) for l in range(4)]
    assert g.decode(b["frankenmerge:add+sub"]) == [Slot("add", l, 1.0) for l in (0, 1, 2)] + \
        [Slot("sub", l, 1.0) for l in (1, 2, 3)]
    rec = g.recipe(b["frankenmerge:add+sub"])
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in rec.slices] == \
        [(g.sources["add"], (0, 3)), (g.sources["sub"], (1, 4))]
    assert "frankenmerge:add+sub" not in _genome(tiny_zoo, repeats=1).baselines()


def test_stack_recipe_groups_runs_and_scales_the_output_projections(tiny_zoo):
    srcs = {"a": "/m/a", "b": "/m/b"}
    rec = stack_recipe([Slot("a", 0, 1.0), Slot("a", 1, 1.0), Slot("a", 2, 0.8), Slot("b", 2, 0.8), Slot("b", 3, 0.8)], srcs)
    got = [(s.sources[0].model, s.sources[0].layer_range, s.sources[0].parameters) for s in rec.slices]
    scale = {"scale": [{"filter": f, "value": 0.8} for f in SCALED] + [{"value": 1.0}]}
    assert got == [("/m/a", (0, 2), {}), ("/m/a", (2, 3), scale), ("/m/b", (2, 4), scale)]
    again = Recipe.from_dict(yaml.safe_load(rec.to_yaml()))  # the YAML form parses back to the same slices
    assert [(s.sources[0].layer_range, s.sources[0].parameters) for s in again.slices] == [g[1:] for g in got]


@pytest.mark.parametrize("over, needle", [
    ({"repeats": 0}, "search.repeats"),
    ({"scale": {"low": 1.1, "high": 2.0}}, "search.scale"),
    ({"logit": -1}, "search.logit"),
    ({"method": "ties"}, "passthrough"),
    ({"frankenmerge": ["add"]}, "search.frankenmerge"),
    ({"n_trials": 0}, "search.n_trials"),
    ({"pruning": {"keep": 120}}, "search.pruning.keep"),
    ({"parameter_space": {"n_trials": 4}}, "search.parameter_space"),
    ({"layers_per_group": 2}, "search.layers_per_group is not a data-flow search setting"),
])
def test_bad_dataflow_configs_are_one_clear_error(over, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_dataflow({"space": "dataflow", **over})


# ---- the in-memory stack ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack_case(tiny_zoo, tmp_path_factory):
    """Two sources, a layer used twice unscaled, a scaled slice; the live stack and its export."""
    srcs = {k: str(tiny_zoo.specialists[k]) for k in ("add", "sub")}
    seq = [Slot("add", 0, 1.0), Slot("add", 1, 1.0), Slot("sub", 1, 0.7), Slot("sub", 2, 0.7),
           Slot("add", 1, 1.0), Slot("sub", 3, 1.0)]
    recipe = stack_recipe(seq, srcs)
    engine = StackEngine(list(srcs.values()))
    engine.apply(recipe)
    out = tmp_path_factory.mktemp("stack") / "model"
    merge_to_dir(recipe, out, progress=False)
    return engine, recipe, out, srcs


def test_rewired_model_equals_the_exported_stack(stack_case):
    engine, _, out, _ = stack_case
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert engine.model.config.num_hidden_layers == 6
    # same weights, same modules, same kernels in the same order: equal bit for bit
    assert torch.equal(_logits(engine.model), _logits(_load(out)))


def test_bfloat16_stack_equals_the_export_loaded_in_bfloat16(stack_case):
    """eval_dtype=bfloat16: a scaled tensor is the float32 product rounded once, as loading the export rounds it."""
    _, recipe, out, srcs = stack_case
    engine = StackEngine(list(srcs.values()), model_dtype=torch.bfloat16)
    engine.apply(recipe)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert torch.equal(engine.model.model.layers[2].mlp.down_proj.weight, ref.model.layers[2].mlp.down_proj.weight)
    assert torch.equal(_logits(engine.model), _logits(ref))


def test_layers_share_resident_weights_and_own_their_cache_index(stack_case):
    engine, _, _, srcs = stack_case
    layers = engine.model.model.layers
    add = engine.residents[srcs["add"]].model.layers
    assert [l.self_attn.layer_idx for l in layers] == list(range(6))
    assert layers[1] is not layers[4] and layers[1].mlp is layers[4].mlp is add[1].mlp  # one layer at two depths
    assert layers[1].self_attn.q_proj.weight.data_ptr() == add[1].self_attn.q_proj.weight.data_ptr()
    sub = engine.residents[srcs["sub"]].model.layers
    scaled = layers[2]
    assert scaled.self_attn.q_proj is sub[1].self_attn.q_proj             # unscaled tensors stay shared
    assert scaled.self_attn.o_proj is not sub[1].self_attn.o_proj         # scaled ones are the slot's own
    assert torch.equal(scaled.mlp.down_proj.weight, sub[1].mlp.down_proj.weight * 0.7)
    assert sub[1].self_attn.layer_idx == 1                                 # the residents are untouched


def test_generation_with_kv_cache_equals_generation_without(stack_case):
    engine, _, _, _ = stack_case
    model = engine.model
    with_cache = model.generate(IDS, max_new_tokens=12, do_sample=False, use_cache=True)
    without = model.generate(IDS, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    with torch.no_grad():  # and step by step: the incremental logits match the full pass
        full = model(with_cache).logits
        out = model(with_cache[:, :-4], use_cache=True)
        assert len(out.cache.layers) == 6
        step = model(with_cache[:, -4:], cache=out.cache, use_cache=True).logits
    # another reduction order (attention over cached keys): float32 rounding, ~1e-5 on logits of size ~3 here;
    # a layer reading another depth's cache entry moves them by O(1)
    torch.testing.assert_close(step, full[:, -4:], rtol=1e-4, atol=1e-4)


def test_embeddings_from_the_first_slice_and_head_from_the_last(tmp_path):
    """Untied Llama family whose embeddings and heads all differ: the stack follows mergekit's edges rule."""
    _, (m0, m1) = make_family(tmp_path, "llama", n_models=2, layers=3)
    recipe = Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(m1), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(m0), "layer_range": [1, 3], "parameters": {"scale": 1.25}}]},
    ]})
    engine = StackEngine([str(m0), str(m1)])
    engine.apply(recipe)
    merge_to_dir(recipe, tmp_path / "out", progress=False)
    ids = torch.tensor([[4, 9, 11, 20, 6]])
    assert torch.equal(_logits(engine.model, ids), _logits(_load(tmp_path / "out"), ids))
    engine.apply(Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(m0), "layer_range": [0, 3]}]}]}))  # re-wired back: the source itself
    assert torch.equal(_logits(engine.model, ids), _logits(_load(m0), ids))


def test_qwen2_stack_keeps_layer_types_and_its_tied_head(tmp_path):
    """transformers 5 configs with layer_types (Qwen2): one entry per output layer, live and exported."""
    _, (m0, m1) = make_family(tmp_path, "qwen2", n_models=2, layers=3)
    recipe = Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(m0), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(m1), "layer_range": [1, 3]}]}]})
    engine = StackEngine([str(m0), str(m1)])
    engine.apply(recipe)
    merge_to_dir(recipe, tmp_path / "out", progress=False)
    ref = _load(tmp_path / "out")
    assert engine.model.config.layer_types == ref.config.layer_types == ["full_attention"] * 5
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    ids = torch.tensor([[4, 9, 11, 20, 6]])
    assert torch.equal(_logits(engine.model, ids), _logits(ref, ids))
    cached = engine.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, engine.model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False))


def test_recipes_the_stack_cannot_build_are_refused(stack_case, tmp_path):
    engine, _, _, srcs = stack_case
    with pytest.raises(MergeError, match="passthrough recipe with slices"):
        engine.apply(Recipe.from_dict({"merge_method": "linear", "models": [{"model": srcs["add"]}]}))
    with pytest.raises(MergeError, match="not resident"):
        engine.apply(Recipe.from_dict({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(tmp_path), "layer_range": [0, 1]}]}]}))


# ---- replay ------------------------------------------------------------------------------------
def test_evomerge_merge_replays_the_exported_recipe(stack_case, tmp_path):
    _, recipe, out, _ = stack_case
    path = recipe.save(tmp_path / "recipe.yaml")
    proc = subprocess.run([sys.executable, "-m", "evomerge.engine.cli", str(path), str(tmp_path / "replay")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_recipe(path).to_mergekit() == recipe.to_mergekit()
    assert torch.equal(_logits(_load(tmp_path / "replay")), _logits(_load(out)))


def test_mergekit_builds_the_same_stack(stack_case, tmp_path):
    """mergekit-yaml 0.1.5 (its own venv, tests/mergekit_ref.py; skipped with the reason without it)."""
    _, recipe, out, _ = stack_case
    path = tmp_path / "mk.yaml"
    path.write_text(recipe.to_yaml(mergekit_only=True))
    (mk,) = mergekit_yaml([(path, tmp_path / "mk")])
    assert json.loads((mk / "config.json").read_text())["num_hidden_layers"] == 6
    assert_same_tensors(state(out), state(mk), label="stack")  # a copy or one float32 multiply: equal


# ---- the search --------------------------------------------------------------------------------
@pytest.mark.slow
def test_search_runs_end_to_end_and_exports_the_scored_stack(tiny_zoo, tmp_path):
    run_dir = tmp_path / "run"
    args = ["+search=dataflow_math", "search.n_trials=7", "search.limit=20", "progress=false", "final.top_k=1",
            f"final.score_cache={tmp_path / 'scores'}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "evomerge.run.app", *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "passthrough" and summary["trials"]["finished"] == 7
    assert set(summary["baselines"]) == {"alone:add", "alone:sub", "frankenmerge:add+sub"}
    assert all(b["test_fitness"] is not None for b in summary["baselines"].values())
    recipe = load_recipe(run_dir / "best" / "recipe.yaml")
    n = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in recipe.slices)
    assert json.loads((run_dir / "best" / "model" / "config.json").read_text())["num_hidden_layers"] == n
    engine = StackEngine([str(tiny_zoo.specialists[k]) for k in ("add", "sub")])
    engine.apply(recipe)  # the scored stack, rebuilt from the exported recipe, is the exported model
    assert torch.equal(_logits(engine.model), _logits(_load(run_dir / "best" / "model")))
    assert "p0.l0.add" in (run_dir / "trials.csv").read_text().splitlines()[0]
    report = (run_dir / "report.md").read_text()  # the chosen stack, drawn and tabled
    assert f"The winner has {n} layers." in report and (run_dir / "layers.png").is_file()
    assert len(summary["layer_sequence"]) == n
    base = summary["baselines"]["frankenmerge:add+sub"]["trial"]  # any trial exports later, from the study alone
    proc = subprocess.run([sys.executable, "-m", "evomerge.export.cli", str(run_dir), "--trial", str(base),
                           "--out", str(tmp_path / "fm")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "fm" / "model" / "config.json").read_text())["num_hidden_layers"] == 6


def test_parameter_space_search_must_be_a_parameter_space_config(tmp_path):
    from evomerge.run.session import run_parameter_space

    with pytest.raises(ConfigError, match="no search config"):
        run_parameter_space({"study_name": "x"}, tmp_path, {"search": "no_such_search"})
    with pytest.raises(ConfigError, match="itself a data-flow search"):
        run_parameter_space({"study_name": "x"}, tmp_path, {"search": "dataflow_math"})
    with pytest.raises(ConfigError, match="not as cluster workers"):
        run_parameter_space({"study_name": "x", "worker": 0}, tmp_path, {"search": "ties_math"})


@pytest.mark.slow
def test_ps_then_dfs_from_one_command(tiny_zoo, tmp_path):
    """The parameter-space search runs first; its exported winner is the data-flow search's source `ps`."""
    run_dir = tmp_path / "run"
    args = ["+search=dataflow_math", "search.parameter_space={search: ties_math, n_trials: 4, limit: 20}",
            "search.n_trials=5", "search.limit=20", "progress=false", "final.top_k=1", "final.score_cache=null",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "evomerge.run.app", *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ps = json.loads((run_dir / "parameter_space" / "summary.json").read_text())
    dfs = json.loads((run_dir / "summary.json").read_text())
    assert ps["method"] == "ties" and ps["trials"]["finished"] == 4
    assert dfs["sources"] == ["add", "sub", "ps"] and "alone:ps" in dfs["baselines"]
    # the PS winner, loaded from its export into the stack, scores on test what the PS search recorded for it
    assert dfs["baselines"]["alone:ps"]["test_fitness"] == ps["best"]["test_fitness"]
