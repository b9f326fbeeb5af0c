"""Tokenizer merges (``tokenizer_source``, the ``tokenizer:`` block, ``chat_template``) as mergekit 0.1.5 does them.

The family has DIFFERENT vocabularies: the base and ``ft0`` share one (48 tokens); ``ft1`` adds ``<think>``
(special) and ``<tool>`` and has 50 embedding rows, the new ones random; ``ft2`` adds ``<think>`` only and
pads its embeddings to 56 rows. Fast tests: the pure rules (:mod:`evomerge.engine.vocab`), the recipe keys,
and the re-laid rows of real checkpoints checked against the rule by hand. Slow tests: evomerge-merge
against mergekit-yaml on the same recipes (tensors bit for bit in float32 and bfloat16; the output
tokenizer's vocabulary and added tokens) and the built-in chat templates rendered through both tools'
output tokenizers.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer

import mergekit_ref as mk
from evomerge.engine.chat_templates import BUILTIN, resolve_chat_template
from evomerge.engine.oneshot import merge_to_dir
from evomerge.engine.plan import MergePlan
from evomerge.engine.prepared import PreparedMerge
from evomerge.engine.recipe import Recipe, load_recipe
from evomerge.engine.vocab import (ABSENT, ModelVocab, TokenSource, padded_size, permutation, relay, row_plan,
                                   union_additions)
from evomerge.errors import MergeError, RecipeError
from model_factory import make_family, write_recipe


# ---- the pure rules ---------------------------------------------------------------------------------------
def _vocab(tokens: list[str], added: tuple[str, ...] = (), rows: int | None = None) -> ModelVocab:
    ids = {t: i for i, t in enumerate(tokens)}
    return ModelVocab(ids, {ids[t]: t for t in added}, len(tokens) if rows is None else rows)


def test_union_adds_missing_plain_tokens_then_added_tokens_first_model_wins():
    base = _vocab(["<s>", "a", "b"], added=("<s>",))
    one = _vocab(["<s>", "a", "c", "<x>"], added=("<s>", "<x>"))
    two = _vocab(["<s>", "d", "<x>", "<y>"], added=("<s>", "<x>", "<y>"))
    plain, added = union_additions(base, [one, two])
    assert plain == ["c", "d"]
    assert added == [(0, 0), (1, 3), (2, 3)]  # <s> from the base, <x> from the first model that has it, <y>


def test_union_ignores_ids_without_an_embedding_row():
    base = _vocab(["a", "b"])
    short = _vocab(["a", "b", "c", "<x>"], added=("<x>",), rows=2)
    assert union_additions(base, [short]) == ([], [])


def test_permutation_marks_absent_tokens_and_ids_beyond_the_rows():
    out = {"a": 0, "b": 1, "c": 2, "d": 3}
    model = ModelVocab({"b": 0, "a": 1, "d": 5}, {}, rows=4)
    assert permutation(out, model) == (1, 0, ABSENT, ABSENT)


def _plan(tokens: dict | None = None, base: str | None = "B", pad: int | None = None, inputs=("B", "X", "Y")):
    out = {"a": 0, "t1": 1, "t2": 2, "t3": 3}
    vocabs = {"B": _vocab(["a"]), "X": _vocab(["a", "t1", "t2"]), "Y": _vocab(["t2", "a", "t3"])}
    perms = {k: permutation(out, v) for k, v in vocabs.items()}
    return row_plan(out, list(inputs), perms, base, tokens or {}, vocabs, pad, "<test>")


def test_defaults_for_absent_tokens():
    plan = _plan()
    assert plan.rows == ((0, ABSENT, ABSENT, ABSENT), (0, 1, 2, ABSENT), (1, ABSENT, 0, 2))
    assert plan.defaults[1].kind == "copy" and plan.defaults[1].picks == ((1, 1),)  # only X has t1
    assert plan.defaults[2].kind == "average" and plan.defaults[2].picks == ((1, 2), (2, 0))  # X and Y, base lacks it
    assert plan.defaults[3].picks == ((2, 2),)
    assert 0 not in plan.defaults and not plan.identity
    assert 0 not in _plan(inputs=("X", "Y"), base=None).defaults


def test_base_row_wins_when_several_models_and_the_base_have_the_token():
    out = {"a": 0, "t": 1}
    vocabs = {"B": _vocab(["a", "t"]), "X": _vocab(["a", "t"]), "Y": _vocab(["a"])}
    perms = {k: permutation(out, v) for k, v in vocabs.items()}
    plan = row_plan(out, ["X", "B", "Y"], perms, "B", {}, vocabs, None, "<t>")
    assert plan.defaults[1].picks == ((1, 1),)
    none = row_plan(out, ["Y"], perms, "B", {}, vocabs, None, "<t>")
    assert none.defaults[1].kind == "zero"


def test_token_overrides_force_zero_model_token_and_padding():
    tokens = {"t1": TokenSource("zero"), "a": TokenSource("model", model="Y", force=True),
              "t3": TokenSource("model_token", model="X", token="t2")}
    plan = _plan(tokens, pad=8)
    assert plan.size == 8 and plan.vocab_len == 4
    assert plan.defaults[1].kind == "zero"
    assert plan.defaults[0].picks == ((2, 1),) and all(r[0] == ABSENT for r in plan.rows)  # forced for all
    assert plan.defaults[3].picks == ((1, 2),)
    with pytest.raises(MergeError, match="lacks 't1'"):
        _plan({"t1": TokenSource("model", model="Y")})
    with pytest.raises(MergeError, match="not an input"):
        _plan({"t1": TokenSource("model", model="Q")})
    with pytest.raises(MergeError, match="no source"):
        _plan({"t1": TokenSource(None)})
    assert padded_size(48, 16) == 48 and padded_size(49, 16) == 64 and padded_size(49, None) == 49


def test_relay_builds_the_rows_the_plan_names():
    plan = _plan(pad=6)
    b, x, y = (torch.randn(n, 3) for n in (1, 3, 3))
    rb, rx, ry = relay(plan, [b, x, y])
    assert rb.shape == (6, 3)
    for r in (rb, rx, ry):
        assert torch.equal(r[1], x[1]) and torch.equal(r[3], y[2])
        assert torch.equal(r[4], r[:4].mean(0)) and torch.equal(r[5], r[:4].mean(0))
    assert torch.equal(rb[2], (torch.zeros(3) + x[2] + y[0]) / 2)  # the base lacks t2: X's and Y's mean
    assert torch.equal(rx[2], x[2]) and torch.equal(ry[2], y[0])  # those that have it keep their own
    assert torch.equal(rb[0], b[0]) and torch.equal(rx[0], x[0]) and torch.equal(ry[0], y[1])


# ---- recipes ---------------------------------------------------------------------------------------------------
def _recipe(extra: dict) -> Recipe:
    return Recipe.from_dict({"merge_method": "linear", "models": [{"model": "m", "parameters": {"weight": 1}}], **extra})


def test_recipe_keys_round_trip_to_mergekit():
    block = {"source": "base", "pad_to_multiple_of": 8,
             "tokens": {"<x>": {"source": {"kind": "model_token", "model": "m", "token": "a"}, "force": True}}}
    r = _recipe({"tokenizer": block, "chat_template": "chatml"})
    assert r.tokenizer_source == "base" and r.pad_to_multiple_of == 8
    assert r.token_sources()["<x>"] == TokenSource("model_token", model="m", token="a", force=True)
    again = Recipe.from_dict(r.to_mergekit())
    assert again.to_mergekit() == r.to_mergekit() and again.chat_template == "chatml"
    assert _recipe({"tokenizer": {}}).tokenizer_source == "union"  # mergekit's default source


@pytest.mark.parametrize("extra, match", [
    ({"chat_template": "zephyr"}, "neither 'auto'"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "m"}}}}}, "exactly one of token"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "nope"}}}}}, "must be a model path"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "positive integer"),
    ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "not both"),
])
def test_bad_tokenizer_keys_are_refused_before_any_work(extra, match):
    with pytest.raises(RecipeError, match=match):
        _recipe(extra)


def test_auto_chat_template_takes_the_most_common():
    assert resolve_chat_template("auto", ["x {{a}}", None, {"default": "y {{b}} "}, "y {{b}}"]) == "y {{b}}"
    assert resolve_chat_template("auto", [None, ""]) is None
    assert resolve_chat_template("chatml", []) == BUILTIN["chatml"]


# ---- a family with different vocabularies ---------------------------------------------------------------------
def _grow(model_dir: Path, new: list[AddedToken], rows: int, seed: int) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_tokens(new)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    old = model.config.vocab_size
    model.resize_token_embeddings(rows, mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[old:] = torch.randn(rows - old, w.shape[1], generator=gen) * 0.02
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    base, fts = make_family(tmp_path_factory.mktemp("tokfam"), "llama", n_models=3, layers=2)
    _grow(fts[1], [AddedToken("<think>", special=True), AddedToken("<tool>", special=False)], 50, 1)
    _grow(fts[2], [AddedToken("<think>", special=True)], 56, 2)
    tok = AutoTokenizer.from_pretrained(fts[0])  # a template of its own, for chat_template: auto
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(fts[0])
    return {"A": base, "B": fts[0], "C": fts[1], "D": fts[2]}


def _fill(text: str, fam: dict[str, Path]) -> str:
    for k, v in fam.items():
        text = text.replace(f"@{k}", str(v))
    return text


def _rows(model_dir: Path) -> dict[str, torch.Tensor]:
    st = mk.state(model_dir)
    return {k: v for k, v in st.items() if "embed_tokens" in k or "lm_head" in k}


def test_relaid_rows_follow_the_rule_on_real_checkpoints(fam):
    r = Recipe.from_dict(yaml.safe_load(_fill(RECIPES["ties_union"], fam)))
    plan = MergePlan(r)
    assert plan.out_config["vocab_size"] == 50 and plan.vocab_tensors == {"model.embed_tokens.weight", "lm_head.weight"}
    vocab = plan.tokenizer.out_vocab
    think, tool = vocab["<think>"], vocab["<tool>"]
    src = {k: AutoTokenizer.from_pretrained(fam[k]).get_vocab() for k in "ACD"}
    for job in (j for j in plan.jobs if j.out_name in plan.vocab_tensors):
        refs = [job.base, *job.models]
        got = plan.relaid(job, [plan.checkpoints[m].get(n) for m, n in refs], torch.float32)
        w = {m: plan.checkpoints[str(fam[m])].get(job.out_name) for m in "ACD"}
        mean = (torch.zeros(32) + w["C"][src["C"]["<think>"]] + w["D"][src["D"]["<think>"]]) / 2
        for i, row in enumerate(got):  # inputs: base, ft0, ft1, ft2
            assert row.shape[0] == 50
            assert torch.equal(row[tool], w["C"][src["C"]["<tool>"]])  # only ft1 has <tool>: its row for all
            # ft1 and ft2 keep their own <think>; the base and ft0 lack it and get the mean of those two
            # (the base has no <think> row to give)
            want = {2: w["C"][src["C"]["<think>"]], 3: w["D"][src["D"]["<think>"]]}.get(i, mean)
            assert torch.equal(row[think], want)
        assert torch.equal(got[0][:48], w["A"]) and torch.equal(got[3][:48], w["D"][:48])


def test_prepared_engine_refuses_a_vocabulary_it_would_have_to_relay(fam):
    r = Recipe.from_dict(yaml.safe_load(_fill(RECIPES["ties_union"], fam)))
    with pytest.raises(RecipeError, match="tokenizer_source: union .* prepared engine does not re-lay"):
        PreparedMerge(r, device="cpu", memory="disk", progress=False)


def test_prepared_engine_takes_a_tokenizer_source_that_changes_no_row(fam, tmp_path):
    text = f"""
merge_method: ties
base_model: {fam['A']}
models:
  - model: {fam['B']}
    parameters: {{weight: 0.5, density: 0.6}}
tokenizer_source: base
"""
    recipe = Recipe.from_dict(yaml.safe_load(text))
    engine = PreparedMerge(recipe, device="cpu", progress=False)
    merged = mk.state(merge_to_dir(recipe, tmp_path / "out", progress=False))
    scored = engine.state_dict()
    mk.assert_same_tensors(scored, {k: merged[k] for k in scored}, label="prepared vs one-shot")
    other = Recipe.from_dict(yaml.safe_load(text.replace("tokenizer_source: base", "tokenizer_source: union")))
    with pytest.raises(MergeError, match="prepare a new engine"):  # another tokenizer setting: not this engine's
        engine.apply(other)


def test_differing_vocabularies_without_a_tokenizer_source_are_still_refused(fam):
    text = _fill(RECIPES["ties_union"], fam).replace("tokenizer_source: union\n", "")
    with pytest.raises(Exception, match="vocab"):
        MergePlan(Recipe.from_dict(yaml.safe_load(text)))


RECIPES = {
    "ties_union": """
merge_method: ties
base_model: @A
models:
  - model: @B
    parameters: {weight: 0.5, density: 0.6}
  - model: @C
    parameters: {weight: 0.7, density: 0.5}
  - model: @D
    parameters: {weight: 0.4, density: 0.7}
tokenizer_source: union
""",
    "ties_base": """
merge_method: ties
base_model: @A
models:
  - model: @C
    parameters: {weight: 0.5, density: 0.6}
  - model: @D
    parameters: {weight: 0.5, density: 0.6}
tokenizer_source: base
""",
    "task_arithmetic_model_source": """
merge_method: task_arithmetic
base_model: @A
models:
  - model: @B
    parameters: {weight: 0.5}
  - model: @C
    parameters: {weight: 0.3}
  - model: @D
    parameters: {weight: 0.3}
tokenizer_source: @C
""",
    "linear_union_no_base_bf16": """
merge_method: linear
models:
  - model: @C
    parameters: {weight: 0.6}
  - model: @D
    parameters: {weight: 0.4}
dtype: bfloat16
tokenizer_source: union
""",
    "tokens_block": """
merge_method: ties
base_model: @A
models:
  - model: @C
    parameters: {weight: 0.6, density: 0.5}
  - model: @D
    parameters: {weight: 0.5, density: 0.8}
tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    <tool>: {source: {kind: zero}}
    <think>: {source: @D, force: true}
    <new>: {source: {kind: model_token, model: @A, token: a}}
    b: {source: {kind: model_token, model: @C, token_id: 5}, force: true}
chat_template: llama3
""",
}


# ---- against mergekit-yaml ---------------------------------------------------------------------------------
def _tokenizer_view(model_dir: Path) -> tuple[dict, dict]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    added = {i: (a.content, a.special, a.normalized, a.lstrip, a.rstrip, a.single_word)
             for i, a in tok.added_tokens_decoder.items()}
    return tok.get_vocab(), added


@pytest.mark.slow
def test_merges_with_different_vocabularies_equal_mergekit(fam, tmp_path):
    jobs, ours = [], {}
    for name, text in RECIPES.items():
        recipe = write_recipe(tmp_path / f"{name}.yml", _fill(text, fam))
        ours[name] = merge_to_dir(load_recipe(recipe), tmp_path / f"ours-{name}", progress=False)
        jobs.append((recipe, tmp_path / f"mk-{name}"))
    mk.mergekit_yaml(jobs)
    for name, (_, theirs) in zip(RECIPES, jobs):
        mk.assert_same_tensors(mk.state(ours[name]), mk.state(theirs), label=name)
        assert _tokenizer_view(ours[name]) == _tokenizer_view(theirs), name
        cfg_ours, cfg_theirs = (json.loads((d / "config.json").read_text()) for d in (ours[name], theirs))
        assert cfg_ours["vocab_size"] == cfg_theirs["vocab_size"], name
    # the tokens: block by hand. A row every input gets from one source (forced, or a token no model has)
    # leaves no task vector, so the merged row is that source row itself
    rows = _rows(ours["tokens_block"])["model.embed_tokens.weight"]
    vocab = AutoTokenizer.from_pretrained(ours["tokens_block"]).get_vocab()
    emb = {k: _rows(fam[k])["model.embed_tokens.weight"] for k in "ACD"}
    src = {k: AutoTokenizer.from_pretrained(fam[k]).get_vocab() for k in "ACD"}
    assert rows.shape[0] == 64 and vocab["<new>"] == 50  # 51 tokens padded to a multiple of 16
    assert torch.equal(rows[vocab["<think>"]], emb["D"][src["D"]["<think>"]])  # source ft2, forced
    assert torch.equal(rows[vocab["b"]], emb["C"][5])  # token_id 5 of ft1, forced
    assert torch.equal(rows[vocab["<new>"]], emb["A"][src["A"]["a"]])  # in no model: the base's row of "a"
    assert _render(ours["tokens_block"]) == _render(jobs[-1][1])


CHAT_RECIPE = """
merge_method: linear
models:
  - model: @A
    parameters: {weight: 0.5}
  - model: @B
    parameters: {weight: 0.5}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "be brief "}, {"role": "user", "content": " 2+2?"},
     {"role": "assistant", "content": "4 "}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}],
    [{"role": "user_context", "content": "ctx"}, {"role": "user", "content": "q"}],
]


def _render(model_dir: Path) -> list:
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for conv in CONVERSATIONS:
        for gen in (False, True):
            try:
                out.append(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen))
            except Exception as exc:  # noqa: BLE001 - the same refusal counts as the same rendering
                out.append(("error", str(exc)))
    return out


@pytest.mark.slow
def test_chat_templates_render_as_mergekit_output_tokenizers(fam, tmp_path):
    """Every built-in name (and auto) renders the same prompts through both tools' output tokenizers."""
    names = [*sorted(BUILTIN), "auto"]
    jobs, ours = [], {}
    for name in names:
        text = _fill(CHAT_RECIPE, fam) + f"chat_template: {name}\n"
        recipe = write_recipe(tmp_path / f"{name}.yml", text)
        ours[name] = merge_to_dir(load_recipe(recipe), tmp_path / f"ours-{name}", progress=False)
        jobs.append((recipe, tmp_path / f"mk-{name}"))
    mk.mergekit_yaml(jobs)
    for name, (_, theirs) in zip(names, jobs):
        assert _render(ours[name]) == _render(theirs), name
        assert _tokenizer_view(ours[name]) == _tokenizer_view(theirs), name


@pytest.mark.slow
def test_other_vocabulary_tensor_names_equal_mergekit(tmp_path):
    """Tied embeddings (Qwen2: no lm_head stored) and GPT-2's wte re-laid as mergekit re-lays them."""
    jobs, ours = [], []
    for arch in ("qwen2", "gpt2"):
        base, fts = make_family(tmp_path / arch, arch, n_models=3, layers=2)
        _grow(fts[1], [AddedToken("<think>", special=True), AddedToken("<tool>", special=False)], 50, 1)
        _grow(fts[2], [AddedToken("<think>", special=True)], 56, 2)
        fam = {"A": base, "B": fts[0], "C": fts[1], "D": fts[2]}
        recipe = write_recipe(tmp_path / f"{arch}.yml", _fill(RECIPES["tokens_block"], fam))
        ours.append(merge_to_dir(load_recipe(recipe), tmp_path / f"ours-{arch}", progress=False))
        jobs.append((recipe, tmp_path / f"mk-{arch}"))
    mk.mergekit_yaml(jobs)
    for mine, (_, theirs) in zip(ours, jobs):
        mk.assert_same_tensors(mk.state(mine), mk.state(theirs), label=mine.name)
        assert _tokenizer_view(mine) == _tokenizer_view(theirs), mine.name
