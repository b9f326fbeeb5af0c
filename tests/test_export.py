"""Exporting a search's results from its study alone: any trial, the tables, the report.

A synthetic study (written the way the search writes one, over a small random
model family) keeps these tests free of lm-eval and the zoo.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import optuna
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.engine.prepared import PreparedMerge
from evomerge.export.report import write_report
from evomerge.export.run import genome_from_study, trial_counts, write_trials_csv
from evomerge.search import driver
from evomerge.search.genome import Genome, layout_of
from evomerge.search.spec import parse_search
from model_factory import make_family

SEARCH = {"name": "ties_t", "method": "ties", "sources": ["m0", "m1"], "layers_per_group": 2,
          "genes": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}},
          "parameters": {"normalize": True}, "textbook": {"weight": 1.0, "density": 0.5}, "n_trials": 8, "limit": 20}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory whose SQLite study looks like a finished search's."""
    root = tmp_path_factory.mktemp("export")
    base, fts = make_family(root / "models", "llama", n_models=2, layers=4)
    sources = {"m0": str(fts[0]), "m1": str(fts[1])}
    genome = Genome(parse_search(SEARCH), sources, str(base), layout_of(str(base)), seed=0)
    rd = root / "run"
    rd.mkdir()
    study = optuna.create_study(study_name="ties_t-fam", storage=f"sqlite:///{rd / 'study.db'}", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    lay = genome.layout
    study.set_user_attr("evomerge", {"search": SEARCH, "sources": sources, "base": str(base), "seed": 0, "limit": 20,
                                     "layout": {"n_layers": lay.n_layers, "pre": list(lay.pre), "post": list(lay.post),
                                                "layer_names": list(lay.layer_names)}})
    driver.enqueue_baselines(study, genome.baselines())
    dists = genome.distributions()
    for i in range(8):
        t = study.ask(dists)
        t.set_user_attr("seed", 0)
        t.set_user_attr("metrics", {"task_a": {"acc": 0.1 * i}, "task_b": {"acc": 0.5}})
        t.set_user_attr("merge_s", 0.01)
        t.set_user_attr("eval_s", 0.5)
        if i == 5:
            t.set_user_attr("fail_reason", "MergeError: NaN")
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            continue
        t.set_user_attr("fitness", 0.1 * i)
        study.tell(t, 0.1 * i)
    study.set_user_attr("final:7", {"search_full": 0.69, "test": 0.66, "test_metrics": {"task_a": {"acc": 0.7}}})
    study.set_user_attr("winner", 7)
    return rd, genome, study


def test_genome_rebuilds_from_the_study(run_dir):
    rd, genome, study = run_dir
    again = genome_from_study(optuna.load_study(study_name="ties_t-fam", storage=f"sqlite:///{rd / 'study.db'}"))
    t = study.trials[4]
    assert again.recipe(t.params).to_dict() == genome.recipe(t.params).to_dict()
    assert again.fingerprint() == genome.fingerprint()


@pytest.mark.slow  # the CLI as a subprocess
def test_export_cli_writes_recipe_model_and_card(run_dir, tmp_path):
    rd, genome, study = run_dir
    out = tmp_path / "t7"
    proc = subprocess.run([sys.executable, "-m", "evomerge.export.cli", str(rd), "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "recipe.yaml").is_file() and (out / "model" / "config.json").is_file()
    card = (out / "model" / "README.md").read_text()
    assert "trial 7" in card and "0.6600" in card and "test (held out)" in card and "merge_method: ties" in card
    # the exported model is exactly the candidate the search scored (the prepared engine's tensors)
    trial = study.trials[7]
    engine = PreparedMerge(genome.recipe(trial.params, seed=0), device="cpu", progress=False)
    got = load_file(str(out / "model" / "model.safetensors"))
    for name, value in engine.state_dict().items():
        assert torch.equal(got[name], value), name
    AutoModelForCausalLM.from_pretrained(out / "model")  # loads


def test_export_cli_any_trial_and_errors(run_dir, tmp_path, capsys):
    from evomerge.export.cli import main

    rd, _, _ = run_dir
    main([str(rd), "--trial", "2", "--recipe-only", "--out", str(tmp_path / "t2")])
    assert "not scored on the held-out test split" in capsys.readouterr().out
    assert "merge_method: ties" in (tmp_path / "t2" / "recipe.yaml").read_text()
    for argv, needle in (([str(rd), "--trial", "99"], "has no trial 99"), ([str(rd), "--trial", "5"], "is FAIL"),
                         ([str(tmp_path)], "holds no study")):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--recipe-only"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("evomerge-export: error:") and needle in err, err


def test_trials_csv_and_counts(run_dir, tmp_path):
    rd, genome, study = run_dir
    path = write_trials_csv(study, tmp_path / "trials.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 8
    assert rows[0]["baseline"] == "alone:m0" and rows[5]["state"] == "FAIL" and rows[5]["fail_reason"] == "MergeError: NaN"
    assert float(rows[7]["test_fitness"]) == pytest.approx(0.66) and float(rows[7]["task_a/acc"]) == pytest.approx(0.7)
    assert "m0.weight.g1" in rows[0] and rows[0]["merge_s"] == "0.01"
    assert trial_counts(study) == {"COMPLETE": 7, "FAIL": 1, "finished": 8}


def test_report_draws_every_plot(run_dir, tmp_path):
    rd, genome, study = run_dir
    best = {"trial": 7, "label": "trial 7", "search_fitness": 0.7, "search_full_fitness": 0.69, "test_fitness": 0.66}
    summary = {"method": "ties", "sources": ["m0", "m1"], "trials": trial_counts(study), "n_trials": 8,
               "storage": "sqlite:///x", "best": best, "baselines": {}, "top": [best],
               "timings": {"search_s": 3.0, "per_candidate": {"candidates": 8, "merge_s": 0.01, "eval_s": 0.5,
                                                               "overhead_s": 0.02, "total_s": 0.53}}}
    path = write_report(tmp_path, study, summary, genome.per_layer_table(study.trials[7].params), ["fitness"])
    text = path.read_text()
    for png in ("history.png", "winner_genes.png", "importances.png"):
        assert f"]({png})" in text and (tmp_path / png).stat().st_size > 1000, text
    assert "winner: trial 7" in text
    json.dumps(summary)
