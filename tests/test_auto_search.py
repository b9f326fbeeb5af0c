"""`evomerge +search=auto_math` end to end on the tiny zoo (the real app, as a subprocess): every method can be
chosen and merges, every baseline is scored, and an exported recipe is its method's ordinary recipe, which
`evomerge-merge` replays to the weights the search scored. Behaviour only, never a study outcome."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file

APP = [sys.executable, "-m", "evomerge.run.app"]
METHODS = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
           "della_linear", "linear", "slerp", "nuslerp", "model_stock"]
DERIVED = {"linear", "nuslerp", "slerp"}  # merged from models rebuilt as base + task vector (engine/prepared.py)
EPS = torch.finfo(torch.float32).eps


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    """One score cache for both searches: their baselines are the same recipes, re-scored once."""
    return tmp_path_factory.mktemp("scores")


def _search(tmp_path_factory, scores: Path, name: str, *args: str) -> Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    proc = _run([*APP, "+search=auto_math", "search.n_trials=17", "search.limit=40", "progress=false",
                 "final.top_k=2", f"final.score_cache={scores}", f"hydra.run.dir={run_dir}", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return run_dir


@pytest.fixture(scope="module")
def conditional(tiny_zoo, tmp_path_factory, scores):
    return _search(tmp_path_factory, scores, "auto_tpe", "sampler=tpe")


@pytest.fixture(scope="module")
def flat(tiny_zoo, tmp_path_factory, scores):
    return _search(tmp_path_factory, scores, "auto_cmaes", "sampler=cmaes", "final.export_model=false")


def _study(run_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="auto_math-tiny", storage=f"sqlite:///{run_dir / 'study.db'}")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["conditional", "flat"])
def test_every_method_is_a_choice_and_every_baseline_is_scored(which, request):
    from evomerge.export.run import genome_from_study

    run_dir = request.getfixturevalue(which)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trials"]["finished"] == 17
    assert set(summary["baselines"]) == {"alone:add", "alone:sub", *(f"textbook:{m}" for m in METHODS)}
    assert all(b["test_fitness"] is not None for b in summary["baselines"].values())
    study = _study(run_dir)
    genome = genome_from_study(study)  # rebuilt from what the study stored: the encoding the sampler settled
    assert genome.conditional is (which == "conditional") and list(genome.methods) == METHODS
    trials = study.get_trials()
    for t in trials:
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED), (t.number, t.user_attrs.get("fail_reason"))
        b = t.user_attrs.get("baseline")
        if b and b.startswith("textbook:"):  # each method's own recipe merged and was scored
            assert genome.recipe(t.params).merge_method == b.split(":", 1)[1]
    if which == "conditional":
        assert all(set(t.params) <= set(genome.distributions()) and "method" in t.params for t in trials)
    else:
        assert all(set(t.params) == set(genome.distributions()) for t in trials)
    csv_head = (run_dir / "trials.csv").read_text().splitlines()[0]
    assert ("method" in csv_head.split(",")) is (which == "conditional")


def _replay(run_dir: Path, trial: int, out: Path) -> tuple[dict, dict, str]:
    """(the engine's scored weights, evomerge-merge's replay of the exported recipe, the method)."""
    from evomerge.engine.prepared import PreparedMerge
    from evomerge.engine.recipe import load_recipe
    from evomerge.export.run import genome_from_study

    exported = out / "export"
    proc = _run([sys.executable, "-m", "evomerge.export.cli", str(run_dir), "--trial", str(trial), "--out",
                 str(exported), "--recipe-only"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    recipe_file = exported / "recipe.yaml"
    recipe = load_recipe(recipe_file)
    proc = _run([sys.executable, "-m", "evomerge.engine.cli", str(recipe_file), str(out / "model"), "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = _study(run_dir)
    genome = genome_from_study(study)
    t = study.trials[trial]
    engine = PreparedMerge(genome.structure_recipe(), methods=genome.methods, device="cpu", progress=False)
    engine.apply(genome.recipe(t.params, seed=int(t.user_attrs.get("seed", genome.seed))))
    return {k: v.clone() for k, v in engine.state_dict().items()}, _state(out / "model"), recipe.merge_method


@pytest.mark.slow
def test_the_exported_winner_replays_to_the_scored_weights(conditional, tiny_zoo, tmp_path):
    """best/recipe.yaml is the chosen method's ordinary mergekit recipe; evomerge-merge rebuilds the scored
    weights from it (bit for bit over task vectors, within float32 rounding where models are rebuilt), and
    best/model holds them."""
    import yaml

    summary = json.loads((conditional / "summary.json").read_text())
    data = yaml.safe_load((conditional / "best/recipe.yaml").read_text())
    assert data["merge_method"] in METHODS and set(data) <= {"merge_method", "base_model", "models", "parameters",
                                                              "dtype", "evomerge"}
    scored, replayed, method = _replay(conditional, summary["best"]["trial"], tmp_path)
    best_model = _state(conditional / "best/model")
    _same(scored, replayed, method, tiny_zoo)
    _same(scored, best_model, method, tiny_zoo)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "slerp"])  # models rebuilt from task vectors (the winner's method
# may be any; the task-vector methods' equality is engine-tested, tests/test_prepared_methods.py)
def test_exported_trials_of_other_methods_replay_too(conditional, tiny_zoo, tmp_path, method):
    study = _study(conditional)
    number = next(t.number for t in study.trials if t.user_attrs.get("baseline") == f"textbook:{method}")
    scored, replayed, got = _replay(conditional, number, tmp_path)
    assert got == method
    _same(scored, replayed, method, tiny_zoo)


def _same(scored: dict, replayed: dict, method: str, zoo) -> None:
    inputs = [_state(zoo.base), *(_state(zoo.specialists[s]) for s in ("add", "sub"))]
    assert set(scored) <= set(replayed)
    for name, t in scored.items():
        if method in DERIVED:  # two float32 roundings of each rebuilt model (tests/test_prepared_methods.py)
            atol = 4 * EPS * max(float(s[name].abs().max()) for s in inputs)
            torch.testing.assert_close(t, replayed[name], rtol=0, atol=atol, msg=name)
        elif method.startswith("dare_"):  # tensors of 2^16+ entries take the kept L1 from the prepared table,
            # summed in float64, where one merge sums the kept entries in float32 (test_engine.py's DARE table test)
            torch.testing.assert_close(t, replayed[name], rtol=1e-6, atol=1e-7, msg=name)
        elif method == "model_stock":  # a reduction: torch's thread split may round it apart (test_engine.py)
            atol = 16 * EPS * max(float(s[name].abs().max()) for s in inputs)
            torch.testing.assert_close(t, replayed[name], rtol=0, atol=atol, msg=name)
        else:
            assert torch.equal(t, replayed[name]), name
