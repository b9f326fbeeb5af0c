"""Configuration problems are found before the study exists, each as one paragraph; the score cache's key.

The checks run on real tokenizers (the tiny zoo's, and copies changed as a user's would differ), real
Optuna samplers and real model families; the app test runs the console app on the tiny zoo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evomerge.evaluation.splits import SplitPlan, TaskSplits
from evomerge.search import preflight
from evomerge.search.config import parse_sampler
from evomerge.search.fitness import parse_tasks
from evomerge.search.genome import Genome, layout_of
from evomerge.search.score_cache import ScoreCache
from evomerge.search.spec import parse_search
from model_factory import make_family

ROOT = Path(__file__).resolve().parents[1]
APP = [sys.executable, "-m", "evomerge.run.app"]
TIES = {"name": "t", "method": "ties", "layers_per_group": "global", "genes": {"weight": {"low": 0.0, "high": 1.0},
        "density": {"low": 0.1, "high": 1.0}}, "parameters": {"normalize": True},
        "textbook": {"weight": 1.0, "density": 0.5}, "n_trials": 8}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = make_family(tmp_path_factory.mktemp("fam"), "llama", n_models=2, layers=2)
    return str(base), {f"m{i}": str(p) for i, p in enumerate(fts)}


def _genome(family):
    base, sources = family
    return Genome(parse_search(TIES), sources, base, layout_of(base))


def _tokenizer_copy(tiny_zoo, dest: Path, change=None) -> Path:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_zoo.base).save_pretrained(dest)
    if change is not None:
        change(dest)
    return dest


def _swap_two_tokens(d: Path) -> None:
    file = d / "tokenizer.json"
    tj = json.loads(file.read_text())
    vocab = tj["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    file.write_text(json.dumps(tj))


def _pad_is_unk(d: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.pad_token = tok.unk_token
    tok.save_pretrained(d)


# ---- the tokenizer against the base's (issue 21, item 5) ------------------------------------------------
def test_a_copy_of_the_base_tokenizer_passes(tiny_zoo, tmp_path):
    from transformers import AutoTokenizer

    d = _tokenizer_copy(tiny_zoo, tmp_path / "same")
    assert preflight.check_tokenizer(AutoTokenizer.from_pretrained(d), str(d), str(tiny_zoo.base)) == []


@pytest.mark.parametrize("change,needle", [
    (_swap_two_tokens, "token 'a' has id"),
    (_pad_is_unk, "has pad_token_id = "),
])
def test_a_tokenizer_that_encodes_otherwise_is_named_with_the_fix(tiny_zoo, tmp_path, change, needle):
    from transformers import AutoTokenizer

    d = _tokenizer_copy(tiny_zoo, tmp_path / "tok", change)
    (problem,) = preflight.check_tokenizer(AutoTokenizer.from_pretrained(d), str(d), str(tiny_zoo.base))
    assert needle in problem and str(d) in problem and "models.tokenizer=null" in problem


# ---- sampler, budget, models, chat template, metrics --------------------------------------------------
def test_sampler_options_are_tried_before_the_study():
    assert preflight.check_sampler_options(parse_sampler({"name": "tpe", "options": {"n_startup_trials": 3}}), 0) == []
    (unknown,) = preflight.check_sampler_options(parse_sampler({"name": "cmaes", "options": {"popsize_typo": 4}}), 0)
    assert "sampler.options for 'cmaes'" in unknown and "popsize_typo" in unknown
    (value,) = preflight.check_sampler_options(parse_sampler({"name": "nsga2", "options": {"population_size": 1}}), 0)
    assert "population_size" in value and "sampler.options.KEY" in value


def test_a_budget_below_the_baselines_is_refused(family):
    names = list(_genome(family).baselines())
    assert preflight.check_budget(len(names), names) == []  # baselines only is a valid (if short) study
    (problem,) = preflight.check_budget(len(names) - 1, names)
    assert f"search.n_trials = {len(names) - 1}" in problem and "alone:m0" in problem


def test_models_that_do_not_merge_are_found_before_the_study(family, tmp_path):
    assert preflight.check_models(_genome(family)) == []
    other, (ft,) = make_family(tmp_path, "llama", n_models=1, layers=3)  # another depth: not one base's fine-tunes
    base, sources = family
    g = Genome(parse_search(TIES), {**sources, "odd": str(ft)}, base, layout_of(base))
    (problem,) = preflight.check_models(g)
    assert "num_hidden_layers" in problem


def test_every_problem_is_reported_together_and_nothing_is_opened(tiny_zoo, family, tmp_path):
    from transformers import AutoTokenizer

    from evomerge.errors import ConfigError
    from evomerge.evaluation import Evaluator

    spec = parse_tasks({"tasks": {"gsm8k_local": {"acc": 1.0}}, "apply_chat_template": True})
    tok_dir = _tokenizer_copy(tiny_zoo, tmp_path / "tok", _swap_two_tokens)
    ev = Evaluator(AutoTokenizer.from_pretrained(tok_dir), list(spec.tasks),
                   include_paths=[str(ROOT / "examples" / "gsm8k_local")], splits=spec.split_plan())
    with pytest.raises(ConfigError) as err:
        preflight.check_before_study(ev, spec, base=str(tiny_zoo.base), tokenizer_dir=str(tok_dir),
                                     genome=_genome(family), n_trials=1,
                                     sampler=parse_sampler({"name": "cmaes", "options": {"x": 1}}), seed=0)
    paragraphs = str(err.value).split("\n\n")
    for needle in ("has no split 'search'", "does not report the metric 'acc'", "token 'a' has id",
                   "no chat template", "unexpected keyword argument 'x'", "search.n_trials = 1",
                   "Nothing was started"):
        assert sum(needle in p for p in paragraphs) == 1, (needle, paragraphs)


# ---- the app: refused before a study exists, then the corrected command runs --------------------------
@pytest.mark.slow
def test_a_mismatched_tokenizer_is_refused_before_any_candidate(tiny_zoo, tmp_path):
    tok_dir = _tokenizer_copy(tiny_zoo, tmp_path / "tok", _swap_two_tokens)
    run_dir = tmp_path / "run"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([*APP, "+search=ties_math", f"models.tokenizer={tok_dir}", "search.n_trials=5",
                           "progress=false", f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert proc.returncode == 2 and "evomerge: error: models.tokenizer" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (run_dir / "study.db").exists()


# ---- the score cache's key: every input changes it (issue 21, item 5) ---------------------------------
def _session_cache(family, root: Path, tokenizer_dir: str, items: str, task_dirs: list[str], **raw) -> ScoreCache:
    """The cache exactly as a search session builds it (SearchSession._score_cache on the session's fields)."""
    from evomerge.run.session import SearchSession

    fake = SimpleNamespace(
        config=SimpleNamespace(**{"final": SimpleNamespace(score_cache=str(root)), "eval_dtype": "float32",
                                  "batch_size": 32, "max_gen_toks": None, "evaluator": "fast", **raw}),
        tasks=parse_tasks({"tasks": {"t": {"acc": 1.0}}}), objectives=["fitness"], device="cpu",
        scorer=SimpleNamespace(evaluator=SimpleNamespace(splits=SimpleNamespace(digest=lambda: items))),
        models=SimpleNamespace(task_dirs=task_dirs), tokenizer_dir=tokenizer_dir)
    return SearchSession._score_cache(fake)


def test_the_score_cache_misses_when_any_input_of_the_key_changes(family, tiny_zoo, tmp_path, monkeypatch):
    import evomerge.search.score_cache as sc

    root, g = tmp_path / "scores", _genome(family)
    tok = str(_tokenizer_copy(tiny_zoo, tmp_path / "tok"))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "t.yaml").write_text("task: t\n")
    recipe = g.recipe(g.baselines()["textbook"])

    def cache(**over):
        kw = {"tokenizer_dir": tok, "items": "digest-1", "task_dirs": [str(task_dir)], **over}
        return _session_cache(family, root, **kw)

    cache().put(recipe, "test", {"fitness": 0.5})
    assert cache().get(recipe, "test") == {"fitness": 0.5}
    misses = {
        "split": cache().get(recipe, "search"),
        "recipe": cache().get(g.recipe(g.baselines()["alone:m0"]), "test"),
        "eval_dtype": cache(eval_dtype="bfloat16").get(recipe, "test"),
        "batch_size": cache(batch_size=8).get(recipe, "test"),
        "max_gen_toks": cache(max_gen_toks=4).get(recipe, "test"),
        "items": cache(items="digest-2").get(recipe, "test"),
        "tokenizer dir": cache(tokenizer_dir=str(tiny_zoo.base)).get(recipe, "test"),
        "task dirs": cache(task_dirs=[]).get(recipe, "test"),
    }
    tasks_changed = _session_cache(family, root, tok, "digest-1", [str(task_dir)])
    tasks_changed.context["tasks"] = "another fitness key"
    misses["tasks"] = tasks_changed.get(recipe, "test")
    os.utime(task_dir / "t.yaml", ns=(1, 1))
    misses["a task file"] = cache().get(recipe, "test")
    os.utime(task_dir / "t.yaml", ns=(2, 2))
    cache().put(recipe, "test", {"fitness": 0.5})
    os.utime(Path(tok) / "tokenizer.json", ns=(1, 1))
    misses["a tokenizer file"] = cache().get(recipe, "test")
    cache().put(recipe, "test", {"fitness": 0.5})
    weights = next(Path(family[1]["m0"]).glob("*.safetensors"))
    os.utime(weights, ns=(1, 1))
    misses["a model file"] = cache().get(recipe, "test")
    cache().put(recipe, "test", {"fitness": 0.5})
    real = sc._versions()
    monkeypatch.setattr(sc, "_versions", lambda: {**real, "evomerge code": "edited"})
    misses["code"] = cache().get(recipe, "test")
    monkeypatch.undo()
    assert cache().get(recipe, "test") == {"fitness": 0.5}  # nothing above was a miss by accident
    assert {k: v for k, v in misses.items() if v is not None} == {}


def test_the_score_cache_shares_a_deterministic_recipe_across_seeds(family, tiny_zoo, tmp_path):
    """A run's seed reaches every recipe it writes, but only DARE and DELLA masks read it: a TIES score is served
    to a run of another seed, a DARE-TIES score only to its own seed."""
    import dataclasses

    tok = str(_tokenizer_copy(tiny_zoo, tmp_path / "tok"))
    cache = _session_cache(family, tmp_path / "scores", tok, "digest-1", [])
    g = _genome(family)
    ties = g.recipe(g.baselines()["textbook"], seed=0)
    cache.put(ties, "test", {"fitness": 0.5})
    assert cache.get(dataclasses.replace(ties, seed=1), "test") == {"fitness": 0.5}
    dare = dataclasses.replace(ties, merge_method="dare_ties")
    cache.put(dare, "test", {"fitness": 0.6})
    assert cache.get(dare, "test") == {"fitness": 0.6}
    assert cache.get(dataclasses.replace(dare, seed=1), "test") is None
    assert cache.get(dataclasses.replace(dare, random_mode="fresh"), "test") is None


def test_the_items_digest_follows_the_items(tiny_zoo):
    from transformers import AutoTokenizer

    from evomerge.evaluation import Evaluator
    from evomerge.evaluation.splits import Partition

    def digest(opts: TaskSplits, shot_seed: int = 0) -> str:
        ev = Evaluator(AutoTokenizer.from_pretrained(tiny_zoo.base), ["gsm8k_local"],
                       include_paths=[str(ROOT / "examples" / "gsm8k_local")],
                       splits=SplitPlan({"gsm8k_local": opts}, shot_seed=shot_seed))
        ev.splits.resolve(ev.task_manager)
        return ev.splits.digest()

    a = digest(TaskSplits(search_split="train"))
    assert a == digest(TaskSplits(search_split="train"))
    assert a != digest(TaskSplits(partition=Partition("test", 0.3, 0)))
    assert digest(TaskSplits(partition=Partition("test", 0.3, 0))) != digest(TaskSplits(partition=Partition("test", 0.3, 1)))
    # the few-shot seed (a run's seed) counts only where a task draws examples: zero-shot scores are shared
    zero, shots = TaskSplits(search_split="train", num_fewshot=0), TaskSplits(search_split="train", num_fewshot=2)
    assert digest(zero, shot_seed=0) == digest(zero, shot_seed=1)
    assert digest(shots, shot_seed=0) != digest(shots, shot_seed=1)


def test_the_amx_probe_follows_torch_and_assumes_amx_where_torch_cannot_tell(monkeypatch):
    """The bfloat16-on-this-CPU hint asks torch's oneDNN probe; a torch without the probe gets no hint."""
    from evomerge.run.session import _cpu_has_amx

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert _cpu_has_amx() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert _cpu_has_amx() is True
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert _cpu_has_amx() is True
