"""During a search the winner is written from the engine that scored it (export/run.py ``export_trial(engine=)``).

The exported directory must be the one a merge from disk writes: the same tensors as ``evomerge-merge`` of
the exported recipe (the engine's guarantee against the one-shot merge: bit for bit for TIES), the same card,
config and tokenizer, through the same staging and swap. And the merge from disk must not run.
"""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import load_file

from evomerge.engine import oneshot
from evomerge.engine.oneshot import merge_to_dir
from evomerge.engine.prepared import PreparedMerge
from evomerge.engine.recipe import load_recipe
from evomerge.export.run import export_trial
from evomerge.search.genome import Genome, layout_of
from evomerge.search.spec import parse_search
from model_factory import make_family

SEARCH = {"name": "ties_t", "method": "ties", "sources": ["m0", "m1"], "layers_per_group": 2,
          "genes": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}},
          "parameters": {"normalize": True}, "textbook": {"weight": 1.0, "density": 0.5}, "n_trials": 8, "limit": 20}
SCORES = {"label": "trial 0", "search_fitness": 0.5, "search_full_fitness": 0.45, "test_fitness": 0.4,
          "test_metrics": {"task_a": {"acc": 0.4}}}


def _setup(root: Path, arch: str = "llama", model_dtype: torch.dtype = torch.float32):
    base, fts = make_family(root / "models", arch, n_models=2, layers=4)
    sources = {"m0": str(fts[0]), "m1": str(fts[1])}
    genome = Genome(parse_search(SEARCH), sources, str(base), layout_of(str(base)), seed=0)
    engine = PreparedMerge(genome.recipe(genome.baselines()["textbook"]), model_dtype=model_dtype, progress=False)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(2):
        t = study.ask(genome.distributions())
        study.tell(t, 0.5)
    return genome, engine, study.trials


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _no_disk_merge(*args, **kwargs):
    raise AssertionError("the winner was merged again from disk")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "mixtral"])  # plain, tied head, renamed, experts
def test_the_winner_written_from_the_engine_is_the_merge_from_disk(tmp_path, monkeypatch, arch):
    genome, engine, (_, trial) = _setup(tmp_path, arch)
    with monkeypatch.context() as m:
        m.setattr(oneshot, "merged_tensors", _no_disk_merge)
        export_trial(genome, trial, tmp_path / "live", scores=SCORES, title="evomerge t: trial 1", search_limit=20,
                     device="cpu", progress=False, engine=engine)
    export_trial(genome, trial, tmp_path / "disk", scores=SCORES, title="evomerge t: trial 1", search_limit=20,
                 device="cpu", progress=False)
    assert _files(tmp_path / "live") == _files(tmp_path / "disk")  # weights, card, config, tokenizer, manifest
    # and what evomerge-merge makes of the exported recipe
    merge_to_dir(load_recipe(tmp_path / "live" / "recipe.yaml"), tmp_path / "oneshot", device="cpu", progress=False)
    live, want = _tensors(tmp_path / "live" / "model"), _tensors(tmp_path / "oneshot")
    assert live.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(live[name], t), name
    for name, t in engine.state_dict().items():  # the engine holds the exported trial now
        assert torch.equal(t, live[name]), name


def test_an_engine_whose_live_model_holds_another_dtype_leaves_the_merge_to_the_disk(tmp_path, monkeypatch):
    """bfloat16 evaluation of float32 models: the live tensors are not the output's, so the model is merged from
    disk (as before the engine could write it)."""
    genome, engine, (trial, _) = _setup(tmp_path, model_dtype=torch.bfloat16)
    calls = []
    real = oneshot.merged_tensors
    monkeypatch.setattr(oneshot, "merged_tensors", lambda *a, **k: calls.append(1) or real(*a, **k))
    export_trial(genome, trial, tmp_path / "out", scores=SCORES, title="t", device="cpu", progress=False, engine=engine)
    assert calls == [1]
    assert next(iter(_tensors(tmp_path / "out" / "model").values())).dtype == torch.float32


def test_live_tensors_are_refused_where_a_tensor_has_no_parameter_of_its_own(tmp_path):
    genome, engine, (trial, _) = _setup(tmp_path)
    recipe = genome.recipe(trial.params, seed=0)
    plan = oneshot.MergePlan(recipe)
    assert oneshot.live_tensors(engine, plan, torch.float32) is not None

    class Tied:  # a live model whose head is its embeddings' parameter
        model_dtype = torch.float32

        def __init__(self, inner):
            self.inner = inner

        def apply(self, r):
            return self.inner.apply(r)

        def state_dict(self):
            s = dict(self.inner.state_dict())
            s["lm_head.weight"] = s["model.embed_tokens.weight"]
            return s

    assert oneshot.live_tensors(Tied(engine), plan, torch.float32) is None
    assert oneshot.live_tensors(engine, plan, torch.bfloat16) is None
    assert oneshot.live_tensors(object(), plan, torch.float32) is None  # not a prepared engine (a layer stack)


def test_writing_from_the_engine_keeps_the_folder_rules(tmp_path, monkeypatch):
    """Over an earlier export that a user added a file to: the model is replaced, the user's file stays."""
    genome, engine, (first, second) = _setup(tmp_path)
    monkeypatch.setattr(oneshot, "merged_tensors", _no_disk_merge)
    out = tmp_path / "best"
    export_trial(genome, first, out, scores=SCORES, title="t", device="cpu", progress=False, engine=engine)
    (out / "model" / "notes.txt").write_text("mine")
    before = _tensors(out / "model")
    export_trial(genome, second, out, scores=SCORES, title="t", device="cpu", progress=False, engine=engine)
    assert (out / "model" / "notes.txt").read_text() == "mine"
    after = _tensors(out / "model")
    assert after.keys() == before.keys() and any(not torch.equal(after[n], before[n]) for n in after)
    assert not list(out.glob(".model*"))  # no staging folder left behind
