"""The merge engine end to end on small real transformers models.

Math of each method is tested in test_methods.py; here: reading checkpoints,
planning (gradients, filters, slices), writing loadable model directories, and
the prepared engine giving exactly the one-shot result in every memory mode.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.checkpoints import open_checkpoint
from evomerge.engine.oneshot import merge_to_dir
from evomerge.engine.prepared import PreparedMerge
from evomerge.engine.recipe import Recipe, load_recipe
from model_factory import make_family


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("llama"), "llama")


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _recipe(method: str, base: Path | None, models: list[Path], params: list[dict], global_params: dict | None = None,
            **extra) -> Recipe:
    data = {"merge_method": method, "models": [{"model": str(m), "parameters": p} for m, p in zip(models, params)]}
    if base is not None:
        data["base_model"] = str(base)
    if global_params:
        data["parameters"] = global_params
    data.update(extra)
    return Recipe.from_dict(data)


def _generates(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("12+34=", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4


@pytest.mark.slow  # a subprocess per architecture
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cli_round_trip_loads_and_generates(tmp_path, arch):
    base, fts = make_family(tmp_path / "fam", arch, n_models=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {fts[0]}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {fts[1]}\n    parameters: {{weight: 0.4, density: 0.7}}\n"
        f"dtype: bfloat16\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "evomerge.engine.cli", str(recipe), str(out), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert (out / "mergekit_config.yml").is_file() and "ties" in (out / "README.md").read_text()
    assert load_recipe(out / "mergekit_config.yml").merge_method == "ties"
    _generates(out)


def test_linear_merge_is_weighted_average_and_shards(llama, tmp_path):
    base, fts = llama
    r = _recipe("linear", None, fts, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])
    out = merge_to_dir(r, tmp_path / "lin", shard_size="20KB", progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    merged = _state(out)
    srcs = [_state(f) for f in fts]
    for name, t in merged.items():
        want = (srcs[0][name] + 2 * srcs[1][name] + srcs[2][name]) / 4
        torch.testing.assert_close(t.float(), want.float(), rtol=0, atol=1e-6)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    _generates(out)


def test_gradient_and_filter_parameters(llama, tmp_path):
    base, fts = llama
    # task_arithmetic, one model: out = base + w * delta, so w is readable per tensor.
    r = _recipe("task_arithmetic", base, fts[:1], [{"weight": [
        {"filter": "self_attn", "value": 0.0}, {"value": [0.0, 1.0]}]}])
    merged = _state(merge_to_dir(r, tmp_path / "g", progress=False))
    b, f = _state(base), _state(fts[0])
    n = 4
    for name, t in merged.items():
        delta = f[name] - b[name]
        if delta.abs().max() == 0:
            continue
        w = ((t - b[name]) * delta).sum() / (delta * delta).sum()
        if "self_attn" in name:
            want = 0.0
        elif ".layers." in name:
            want = int(name.split(".layers.")[1].split(".")[0]) / (n - 1)
        else:
            want = 0.0  # embeddings, final norm and lm_head at t = 0, as mergekit 0.1.5 plans them
        assert float(w) == pytest.approx(want, abs=1e-5), name


def test_passthrough_stacks_layers(llama, tmp_path):
    base, fts = llama
    r = Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(fts[0]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(fts[1]), "layer_range": [1, 4]}]},
    ]})
    out = merge_to_dir(r, tmp_path / "stack", progress=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    merged, a, b = _state(out), _state(fts[0]), _state(fts[1])
    key = "self_attn.q_proj.weight"
    assert torch.equal(merged[f"model.layers.2.{key}"], a[f"model.layers.2.{key}"])
    assert torch.equal(merged[f"model.layers.3.{key}"], b[f"model.layers.1.{key}"])
    assert torch.equal(merged[f"model.layers.5.{key}"], b[f"model.layers.3.{key}"])
    _generates(out)


PREPARED_CASES = [
    ("ties", [{"weight": 0.5, "density": 0.4}, {"weight": 0.3, "density": 0.8}, {"weight": 0.2, "density": 0.6}], {}),
    ("dare_ties", [{"weight": 0.5, "density": 0.4}, {"weight": 0.3, "density": 0.8}, {"weight": 0.2, "density": 0.6}], {}),
    ("breadcrumbs", [{"weight": 0.5, "density": 0.6}, {"weight": 0.5, "density": 0.7}, {"weight": 0.5, "density": 0.8}], {}),
    ("task_arithmetic", [{"weight": 0.7}, {"weight": -0.3}, {"weight": 0.5}], {}),
    ("linear", [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], {}),
    ("della", [{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.7}, {"weight": 0.2, "density": 0.6}], {}),
    ("della_linear", [{"weight": 0.5, "density": 0.5, "epsilon": 0.1}] * 3, {"rescale_norm": "probability"}),
    ("dare_linear", [{"weight": 0.5, "density": 0.5}] * 3, {}),
    ("breadcrumbs_ties", [{"weight": 0.5, "density": 0.8, "gamma": 0.05}] * 3, {}),
    ("model_stock", [{}, {}, {}], {}),
    ("sce", [{}, {}, {}], {"select_topk": 0.5}),
    ("multislerp", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], {}),
    ("karcher", [{}, {}, {}], {}),
]


# Methods whose result goes through whole-tensor reductions (norms, dot products) and, for karcher, an
# iteration on them: torch splits a reduction by the threads it runs on, and the one-shot merge runs two
# jobs in worker threads, so the two engines may round differently (karcher differed by 2 ulp on an AMD
# CPU). The others are elementwise given per-tensor lookups both engines share: equal bit for bit.
REDUCING = {"model_stock", "sce", "multislerp", "karcher"}


@pytest.mark.parametrize("method,params,glob", PREPARED_CASES, ids=[c[0] for c in PREPARED_CASES])
def test_prepared_equals_oneshot_in_every_memory_mode(llama, tmp_path, method, params, glob):
    base, fts = llama
    r = _recipe(method, base, fts, params, glob)
    want = _state(merge_to_dir(r, tmp_path / "one", out_dtype="float32", progress=False))
    for memory in ("device", "host", "disk"):
        engine = PreparedMerge(r, memory=memory, progress=False)
        got = engine.state_dict()
        for name, t in got.items():
            # a reduction's rounding: a few float32 steps at the tensor's scale (max_iter steps for karcher)
            atol = 16 * torch.finfo(torch.float32).eps * float(want[name].abs().max()) if method in REDUCING else 0.0
            torch.testing.assert_close(t, want[name], rtol=0, atol=atol, msg=f"{memory}: {name}")


def test_prepared_applies_candidates_in_place(llama, tmp_path):
    base, fts = llama
    r1 = _recipe("ties", base, fts, [{"weight": 1.0, "density": 0.3}] * 3)
    r2 = _recipe("ties", base, fts, [{"weight": [0.1, 0.9], "density": [0.9, 0.2]}] * 3)
    engine = PreparedMerge(r1, progress=False)
    model = engine.model
    ptr = model.model.layers[0].mlp.up_proj.weight.data_ptr()
    engine.apply(r2)
    assert model.model.layers[0].mlp.up_proj.weight.data_ptr() == ptr  # same live model, same storage
    want = _state(merge_to_dir(r2, tmp_path / "r2", out_dtype="float32", progress=False))
    for name, t in engine.state_dict().items():
        torch.testing.assert_close(t, want[name], rtol=0, atol=0)
    # a candidate with another method is refused, not silently merged
    with pytest.raises(Exception, match="prepare a new engine"):
        engine.apply(_recipe("linear", base, fts, [{"weight": 1.0}] * 3))


def test_slerp_prepared_matches_oneshot(llama, tmp_path):
    base, fts = llama
    r = Recipe.from_dict({"merge_method": "slerp", "base_model": str(base),
                          "models": [{"model": str(base)}, {"model": str(fts[0])}],
                          "parameters": {"t": [0.0, 0.3, 0.7, 1.0]}})
    want = _state(merge_to_dir(r, tmp_path / "s", out_dtype="float32", progress=False))
    got = PreparedMerge(r, progress=False).state_dict()
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], rtol=1e-6, atol=1e-7)
    b, f = _state(base), _state(fts[0])
    assert torch.equal(want["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # t=0 -> base
    assert torch.equal(want["model.norm.weight"], b["model.norm.weight"])  # also t=0 (mergekit), the base
    torch.testing.assert_close(want["model.layers.3.mlp.up_proj.weight"], f["model.layers.3.mlp.up_proj.weight"])  # t=1


def test_lora_adapter_stands_for_a_model(llama, tmp_path):
    peft = pytest.importorskip("peft")
    base, _ = llama
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    merged_ref = pm.merge_and_unload().state_dict()
    ck = open_checkpoint(adapter, base=open_checkpoint(base))
    for name in ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]:
        torch.testing.assert_close(ck.get(name), merged_ref[name], rtol=1e-5, atol=1e-6)
    r = _recipe("task_arithmetic", base, [adapter], [{"weight": 1.0}])
    out = _state(merge_to_dir(r, tmp_path / "lora_out", progress=False))
    torch.testing.assert_close(out["model.layers.1.self_attn.v_proj.weight"],
                               merged_ref["model.layers.1.self_attn.v_proj.weight"], rtol=1e-5, atol=1e-6)


def test_reads_pytorch_bin_checkpoints(llama, tmp_path):
    base, fts = llama
    bin_dir = tmp_path / "bin_model"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((fts[0] / "config.json").read_text())
    torch.save({k: v.clone() for k, v in _state(fts[0]).items()}, bin_dir / "pytorch_model.bin")
    ck = open_checkpoint(bin_dir)
    src = _state(fts[0])
    assert set(ck.tensor_names()) == set(src)
    assert torch.equal(ck.get("model.norm.weight"), src["model.norm.weight"])


FUSED_CASES = [
    ("ties", [{"weight": 0.5, "density": 0.4}, {"weight": 0.3, "density": 0.8}, {"weight": -0.2, "density": 0.6}], {}),
    ("dare_ties", [{"weight": 0.5, "density": 0.4}, {"weight": 0.3, "density": 1.0}, {"weight": 0.2, "density": 0.6}], {}),
    ("breadcrumbs", [{"weight": 0.5, "density": 0.6, "gamma": 0.05}] * 3, {"rescale": True, "rescale_norm": "probability"}),
    ("linear", [{"weight": 0.5}, {"weight": 0.3}, {"weight": -0.2}], {}),
    ("slerp", [{}], {"t": [0.0, 0.3, 0.7, 1.0]}),
]


@pytest.mark.slow  # torch.compile per method
@pytest.mark.parametrize("method,params,glob", FUSED_CASES, ids=[c[0] for c in FUSED_CASES])
def test_fused_kernel_matches_eager(llama, tmp_path, method, params, glob):
    """The one-pass compiled kernel computes the eager formula (float32 rounding aside)."""
    base, fts = llama
    r = _recipe(method, base, fts, params, glob)
    eager = PreparedMerge(r, fused=False, progress=False).state_dict()
    engine = PreparedMerge(r, fused=True, progress=False)
    assert engine.fused, "the fused kernel fell back to eager torch"
    for name, t in engine.state_dict().items():
        torch.testing.assert_close(t, eager[name], rtol=1e-6, atol=1e-7, msg=name)
    oneshot = _state(merge_to_dir(r, tmp_path / "fused", out_dtype="float32", fused=True, progress=False))
    live = engine.state_dict()
    for name, t in oneshot.items():
        torch.testing.assert_close(t, eager[name], rtol=1e-6, atol=1e-7, msg=name)
        if method != "slerp":  # the engine holds task vectors, SLERP's one-shot the models (exact at t = 1)
            assert torch.equal(t, live[name]), name  # written with the engine's kernel: the scored weights, bit for bit
    # a second candidate through the same compiled kernel (no recompile, new values)
    if method == "slerp":
        r2 = _recipe(method, base, fts, params, {"t": [1.0, 0.2]})
    else:
        r2 = _recipe(method, base, fts, [{**p, "weight": 0.9 - 0.3 * i} for i, p in enumerate(params)], glob)
    engine.apply(r2)
    eager2 = PreparedMerge(r2, fused=False, progress=False).state_dict()
    for name, t in engine.state_dict().items():
        torch.testing.assert_close(t, eager2[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow  # torch.compile per variant
def test_fused_kernel_compiles_every_variant_a_method_search_reaches(llama):
    """A search over every method reaches more variants of the one kernel (sign election or not, normalised or
    not, a random mask or not, two or three models) than dynamo compiles by default (8 per function); past
    that, each new variant would run eagerly for the rest of the process, so none may hit the limit."""
    import logging

    base, fts = llama
    hits: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "recompile_limit" in record.getMessage():
                hits.append(record.getMessage())

    catch, dynamo_log = Catch(level=logging.WARNING), logging.getLogger("torch._dynamo.convert_frame")
    dynamo_log.addHandler(catch)
    try:
        for n in (2, 3):
            for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
                for normalize in (False, True):
                    r = _recipe(method, base, fts[:n], [{"weight": 0.4, "density": 0.6}] * n,
                                {"normalize": normalize})
                    assert PreparedMerge(r, fused=True, progress=False).fused, (method, n, normalize)
    finally:
        dynamo_log.removeHandler(catch)
    assert not hits, hits[0]


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_non_finite_merge_names_the_tensor(llama, tmp_path, fused):
    """A merge that yields inf/NaN is one clear error naming the tensor, in the prepared engine and one-shot."""
    from safetensors.torch import save_file

    from evomerge.errors import MergeError

    base, fts = llama
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(fts[0], bad)
    (weights,) = bad.glob("*.safetensors")
    state = load_file(str(weights))
    name = next(n for n in state if n.endswith("layers.1.mlp.up_proj.weight"))
    state[name][0, 0] = float("inf")
    save_file(state, str(weights), metadata={"format": "pt"})
    r = _recipe("ties", base, [bad, fts[1]], [{"weight": 0.5, "density": 0.5}] * 2)
    with pytest.raises(MergeError, match=r"layers\.1\.mlp\.up_proj\.weight.*NaN or infinite"):
        PreparedMerge(r, fused=fused, progress=False)
    with pytest.raises(MergeError, match=r"layers\.1\.mlp\.up_proj\.weight.*NaN or infinite"):
        merge_to_dir(r, tmp_path / "out", fused=fused, progress=False)
    assert not (tmp_path / "out").exists()


def test_dare_tables_give_the_oneshot_tensors_for_every_seed(tmp_path):
    """Tensors of at least U_GRID entries take DARE's kept L1 from the prepared tables (per seed);
    the result must still be the one-shot merge's, seed for seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.methods.sparsify import U_GRID
    from model_factory import make_tokenizer

    torch.manual_seed(3)
    base_dir = tmp_path / "base"
    tok = make_tokenizer(base_dir)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=U_GRID // 64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(base_dir)
    fts = []
    for i in range(2):
        ft = LlamaForCausalLM(cfg)
        ft.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()})
        ft.save_pretrained(tmp_path / f"ft{i}")
        tok.save_pretrained(tmp_path / f"ft{i}")
        fts.append(tmp_path / f"ft{i}")
    params = [{"weight": 0.7, "density": 0.35}, {"weight": 0.5, "density": 0.6}]
    for fused in (False, True):
        r = _recipe("dare_ties", base_dir, fts, params)
        engine = PreparedMerge(r, fused=fused, memory="device", progress=False)
        for seed in (0, 7):
            r.seed = seed
            engine.apply(r)
            oneshot = _state(merge_to_dir(r, tmp_path / f"o{fused}{seed}", out_dtype="float32", progress=False))
            for name, t in engine.state_dict().items():
                torch.testing.assert_close(t, oneshot[name], rtol=1e-6, atol=1e-7, msg=name)
        assert any(tables for res in engine._resident.values() for tables in res.l1_below_u.values()
                   if any(t is not None for t in tables))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(model.device)).logits.float().cpu()


def _split_map(n_layers: int, first: str | int, rest: str | int) -> dict:
    """Embeddings and the first half of the layers on ``first``, the rest (and the head) on ``rest``."""
    half = n_layers // 2
    return {"model.embed_tokens": first, "model.rotary_emb": first,
            **{f"model.layers.{i}": first if i < half else rest for i in range(n_layers)},
            "model.norm": rest, "lm_head": rest}


def _check_placed_engine(engine: PreparedMerge, r2: Recipe, tmp_path: Path) -> None:
    """Merged tensors equal the one-shot merge on whatever device each lives, before and after a
    second candidate, and the dispatched model computes what the written model computes."""
    for recipe, name in ((engine.recipe, "a"), (r2, "b")):
        if recipe is r2:
            engine.apply(r2)
        out = merge_to_dir(recipe, tmp_path / name, out_dtype="float32", progress=False)
        want = _state(out)
        for tname, t in engine.state_dict().items():
            torch.testing.assert_close(t.cpu(), want[tname], rtol=0, atol=1e-6, msg=tname)
        ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
        written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(_logits(engine.model, ids), _logits(written, ids), rtol=1e-4, atol=1e-4)


def test_device_map_places_the_live_model(llama, tmp_path):
    """accelerate places the live model (here every module on the CPU: CI has one device); each
    tensor is merged where its module lives and the dispatched model runs the merged weights."""
    base, fts = llama
    r1 = _recipe("dare_ties", base, fts, [{"weight": 1.0, "density": 0.5}] * 3)
    r2 = _recipe("dare_ties", base, fts, [{"weight": [0.2, 0.8], "density": [0.9, 0.3]}] * 3)
    auto = PreparedMerge(r1, device="cpu", device_map="auto", max_memory={"cpu": "2GiB"}, progress=False)
    assert set(auto.device_map.values()) == {"cpu"}
    _check_placed_engine(auto, r2, tmp_path / "auto")
    explicit = PreparedMerge(r1, device="cpu", device_map=_split_map(4, "cpu", "cpu"), progress=False)
    assert explicit.model.hf_device_map == explicit.device_map  # dispatched by accelerate
    _check_placed_engine(explicit, r2, tmp_path / "explicit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the live model split between GPU and CPU")
def test_device_map_splits_between_gpu_and_cpu(llama, tmp_path):
    base, fts = llama
    r1 = _recipe("ties", base, fts, [{"weight": 1.0, "density": 0.3}] * 3)
    r2 = _recipe("ties", base, fts, [{"weight": [0.2, 0.8], "density": [0.9, 0.3]}] * 3)
    engine = PreparedMerge(r1, device="cuda", device_map=_split_map(4, 0, "cpu"), progress=False)
    devices = {p.device.type for p in engine.state_dict().values()}
    assert devices == {"cuda", "cpu"}  # the CPU half is offloaded: run on the GPU, stored on the host
    _check_placed_engine(engine, r2, tmp_path / "split")
    auto = PreparedMerge(r1, device="cuda", device_map="auto", max_memory={0: "100KiB", "cpu": "1GiB"}, progress=False)
    assert {0, "cpu"} <= set(auto.device_map.values()), auto.device_map
    _check_placed_engine(auto, r2, tmp_path / "auto")


@pytest.mark.parametrize("device_map,match", [
    ({"": "disk"}, "on 'disk'"),
    ({"model.layers": "cpu"}, "names no module holding tensor 'model.embed_tokens.weight'"),
    ("balanced_low_0", "not understood"),
])
def test_bad_device_map_is_a_clear_error(llama, device_map, match):
    from evomerge.errors import MergeError

    base, fts = llama
    with pytest.raises(MergeError, match=match):
        PreparedMerge(_recipe("ties", base, fts, [{"weight": 1.0, "density": 0.5}] * 3), device="cpu",
                      device_map=device_map, progress=False)
