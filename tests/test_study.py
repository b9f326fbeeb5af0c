"""The ties_math study runner on the tiny zoo: the fast regression run of the study (issue #7).

Runs the real runner (experiments/study.py: real `evomerge` subprocesses) at a small budget into a
temporary directory, then checks only what is robust at that budget: the evolved winner is never
worse than the search's best baseline on the search split (the winner rule guarantees it) and stays
within noise of it on the held-out test split.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = [sys.executable, str(ROOT / "experiments" / "study.py"), "--zoo", "tiny"]
TEST_NOISE = 0.03  # about two standard errors of a difference of mean accuracies on 2 x 500 test items


@pytest.mark.slow
def test_tiny_study_rows_and_table(tiny_zoo, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    common = ["--runs", str(runs), "--out", str(out)]
    for row in (["--row", "handset"], ["--row", "global-cmaes", "--seeds", "0", "--trials", "12"]):
        proc = subprocess.run([*STUDY, *row, *common], capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]

    data = json.loads((out / "ties_math_tiny.json").read_text())
    assert {"alone:add", "alone:sub", "ties (textbook)", "dare_ties (textbook)", "task_arithmetic (textbook)",
            "uniform average"} <= set(data["handset"])
    assert len(data["search"]["global-cmaes-t12"]["test"]) == 1  # a non-default budget: a row of its own
    table = (out / "ties_math_tiny.md").read_text()
    assert "| global-cmaes-t12 | 1 | 12 |" in table and "| ties (textbook) |" in table

    summary = json.loads((runs / "global-cmaes-t12" / "s0" / "summary.json").read_text())
    best, baselines = summary["best"], summary["baselines"].values()

    def selection(c: dict) -> float:  # what the winner rule compares: every search item when re-scored
        return c["search_full_fitness"] if c["search_full_fitness"] is not None else c["search_fitness"]

    assert selection(best) >= max(selection(b) for b in baselines)
    assert best["test_fitness"] >= summary["best_baseline"]["best_test_fitness"] - TEST_NOISE, summary
