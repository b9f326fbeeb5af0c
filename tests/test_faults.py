"""A search survives a kill at every stage, a second process on its study, and a lost study file.

Real processes on the tiny zoo: a SIGKILL planted at one stage (tests/fault_runner.py), then the same
command again. What must hold after the rerun: exactly the budget finished, every trial that had finished
before the kill still finished with the same score, and ``best/`` complete (or, before the rerun, either
complete or absent, never half written).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.search import driver

HERE = Path(__file__).resolve().parent
N_TRIALS = 6
ARGS = ["+search=ties_math", f"search.n_trials={N_TRIALS}", "search.limit=40", "progress=false", "final.top_k=1",
        "final.rescore_search=false", "final.score_cache=null"]
STUDY = "ties_math-tiny"


def _run(run_dir: Path, *extra: str, fault: tuple[str, int] | None = None, wait: bool = True):
    head = [sys.executable, str(HERE / "fault_runner.py"), fault[0], str(fault[1])] if fault else \
        [sys.executable, "-m", "evomerge.run.app"]
    cmd = [*head, *ARGS, *extra, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(HERE)}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _finished(run_dir: Path) -> dict[int, float | None]:
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{run_dir / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    retried = driver.retry_of(trials)
    return {t.number: t.value for t in trials if driver.is_finished(t, retried)}


def _model_complete(model_dir: Path) -> bool:
    names = {p.name for p in model_dir.iterdir()}
    card = (model_dir / "README.md").read_text() if "README.md" in names else ""
    return {"config.json", "model.safetensors", "tokenizer.json"} <= names and "test (held out)" in card


def _no_staging(run_dir: Path) -> bool:
    return not list((run_dir / "best").glob(".model.evomerge-tmp-*"))


# One run folder killed at each stage in turn, each kill followed by a look at what it left: the rerun of
# one kill is the next stage's killed run, so five processes check every stage (and the end state is the
# finished run the other tests start from).
KILLS = [("prepare", 1), ("trial", 2), ("final", 2), ("export", 1)]


@pytest.fixture(scope="module")
def killed_at_every_stage(tiny_zoo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    model = run_dir / "best" / "model"
    finished: dict[int, float | None] = {}
    for stage, nth in KILLS:
        killed = _run(run_dir, fault=(stage, nth))
        assert killed.returncode == -9, f"{stage}: {killed.stderr[-2000:]}"
        now = _finished(run_dir)
        assert all(now.get(n) == v for n, v in finished.items()), stage  # nothing finished was lost or re-scored
        assert len(now) <= N_TRIALS, stage
        assert not model.exists() or _model_complete(model), stage  # complete or none
        finished = now
    assert not model.exists() and not _no_staging(run_dir)  # the export kill left a finished staging folder
    done = _run(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, finished


@pytest.mark.slow
def test_a_kill_at_any_stage_loses_nothing_and_the_rerun_ends_exactly(killed_at_every_stage):
    run_dir, before = killed_at_every_stage
    after = _finished(run_dir)
    assert len(after) == N_TRIALS and len(before) == N_TRIALS  # the budget was spent before the final kills
    assert all(after.get(n) == v for n, v in before.items())
    assert _model_complete(run_dir / "best" / "model") and _no_staging(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trials"]["finished"] == N_TRIALS and summary["best"]["test_fitness"] is not None


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _copy(run_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("*.session"))
    return to


@pytest.mark.slow
def test_a_kill_while_an_earlier_export_is_replaced_keeps_the_earlier_one(killed_at_every_stage, tmp_path):
    run_dir = _copy(killed_at_every_stage[0], tmp_path / "copy")
    best = run_dir / "best"
    before = _snapshot(best / "model")
    killed = _run(run_dir, fault=("export", 1))  # a rerun after the end exports again
    assert killed.returncode == -9
    assert _snapshot(best / "model") == before  # the complete earlier model, untouched
    again = _run(run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _model_complete(best / "model") and _no_staging(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["empty", "garbage", "missing"])
def test_a_lost_study_file_is_an_error_not_a_new_study(killed_at_every_stage, tmp_path, damage):
    run_dir = _copy(killed_at_every_stage[0], tmp_path / "copy")
    db = run_dir / "study.db"
    for side in run_dir.glob("study.db-*"):
        side.unlink()  # WAL files belong to the database being damaged
    if damage == "missing":
        db.unlink()
    else:
        db.write_bytes(b"" if damage == "empty" else b"not a database at all, but some bytes")
    before = {p: p.read_bytes() for p in (run_dir / "summary.json", run_dir / "best/model/model.safetensors")}
    proc = _run(run_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "evomerge: error:" in proc.stderr and "study.db" in proc.stderr and "Traceback" not in proc.stderr
    assert all(p.read_bytes() == b for p, b in before.items())


@pytest.mark.slow
def test_a_second_search_on_the_same_study_is_refused(tiny_zoo, tmp_path):
    run_dir = tmp_path / "run"
    first = _run(run_dir, "search.limit=150", wait=False)
    lock = run_dir / "study.db.session"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
        time.sleep(0.1)
    assert lock.exists(), "the first search never took its study"
    second = _run(run_dir, "search.limit=150")
    out, err = first.communicate(timeout=600)
    assert second.returncode == 2, second.stderr[-2000:]
    assert "in use by another evomerge process" in second.stderr and f"pid {first.pid}" in second.stderr
    assert first.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{run_dir / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(_finished(run_dir)) == N_TRIALS and len(trials) == N_TRIALS  # spent once, nothing failed
    assert not [t for t in trials if t.state == TrialState.FAIL]
