"""The search app end to end on the tiny zoo: the real console app as a subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from evomerge.search import driver
from search_factory import family, genome  # noqa: F401  (family is a fixture)



APP = [sys.executable, "-m", "evomerge.run.app"]
SMALL = ["+search=ties_math", "search.n_trials=9", "search.limit=60", "progress=false", "final.top_k=2"]


# Put on PYTHONPATH, the app process cannot merge a model from the models on disk (engine/oneshot.py).
NO_DISK_MERGE = """import evomerge.engine.oneshot as _oneshot


def _merged_from_disk(*args, **kwargs):
    raise RuntimeError("test guard: a model was merged again from the models on disk")


_oneshot.merged_tensors = _merged_from_disk
"""


def _app(run_dir: Path, *args: str, timeout: int = 600, guard: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    if guard is not None:  # a folder with a sitecustomize.py, which Python runs at start-up
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(guard), env.get("PYTHONPATH")) if p)
    return subprocess.run([*APP, *args, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def e2e(tiny_zoo, tmp_path_factory):
    """The search, which writes its winner from the engine that scored it: a merge from disk would fail it."""
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    guard = run_dir.parent / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_DISK_MERGE)
    start = time.perf_counter()
    proc = _app(run_dir, *SMALL, f"final.score_cache={run_dir.parent / 'scores'}", guard=guard)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc, time.perf_counter() - start


@pytest.mark.slow
def test_end_to_end_writes_every_output(e2e):
    run_dir, proc, seconds = e2e
    for rel in ("best/recipe.yaml", "best/model/config.json", "best/model/README.md", "best/model/mergekit_config.yml",
                "trials.csv", "summary.json", "report.md", "history.png", "winner_genes.png", "study.db", ".hydra/config.yaml"):
        assert (run_dir / rel).exists(), rel
    assert "best/model/" in proc.stdout and "`best/model/`" in (run_dir / "report.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trials"]["finished"] == 9
    best, bb = summary["best"], summary["best_baseline"]
    # the winner never loses to a hand-made recipe on the search split, and holds up on the held-out test split
    def selection(c):  # what the winner is chosen by: the tiny zoo's select items (models.select), where it has them
        return next(c[k] for k in ("select_fitness", "search_full_fitness", "search_fitness") if c[k] is not None)

    assert summary["split_roles"]["select"] == "chose the winner"

    assert selection(best) >= max(selection(b) for b in summary["baselines"].values())
    assert best["test_fitness"] >= bb["best_test_fitness"] - 1e-9, summary
    assert set(summary["baselines"]) == {"alone:add", "alone:sub", "textbook"}
    for key in ("zoo_s", "evaluator_s", "prepare_s", "search_s", "final_s", "export_s", "per_candidate"):
        assert key in summary["timings"]
    card = (run_dir / "best/model/README.md").read_text()
    assert f"{best['test_fitness']:.4f}" in card and "test (held out)" in card
    assert "winner" in proc.stdout and str(run_dir) in proc.stdout and "Traceback" not in proc.stderr
    import csv

    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert len(rows) == 9 and {"merge_s", "eval_s", "fitness", "evomerge_add_ll/acc"} <= set(rows[0])


@pytest.mark.slow
def test_exported_winner_rescores_to_the_recorded_score(e2e, tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation import Evaluator

    run_dir, _, _ = e2e
    summary = json.loads((run_dir / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(run_dir / "best/model", dtype=torch.float32)
    tasks = tiny_zoo.tasks["math_ll"]
    ev = Evaluator(AutoTokenizer.from_pretrained(run_dir / "best/model"), tasks, include_paths=[str(tiny_zoo.task_dir)])
    res = ev.evaluate(model, split="test")
    fitness = sum(res[t]["acc"] for t in tasks) / len(tasks)
    assert fitness == pytest.approx(summary["best"]["test_fitness"], abs=1e-9)


@pytest.mark.slow
def test_the_winner_written_from_the_engine_is_what_evomerge_export_merges_from_disk(e2e, tmp_path):
    """The e2e search ran with the merge from disk disabled; its best/model is, file for file, what
    evomerge-export writes for the winner by merging the models on disk (weights, card, config, tokenizer)."""
    run_dir, _, _ = e2e
    proc = subprocess.run([sys.executable, "-m", "evomerge.export.cli", str(run_dir), "--out", str(tmp_path / "w"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    assert files(run_dir / "best" / "model") == files(tmp_path / "w" / "model")
    assert (run_dir / "best" / "recipe.yaml").read_text() == (tmp_path / "w" / "recipe.yaml").read_text()


@pytest.mark.slow
def test_rerun_after_the_end_resumes_without_new_work(e2e):
    run_dir, _, _ = e2e
    before = json.loads((run_dir / "summary.json").read_text())
    proc = _app(run_dir, *SMALL, "final.export_model=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["trials"] == before["trials"] and after["best"]["test_fitness"] == before["best"]["test_fitness"]
    assert after["timings"]["per_candidate"] == {}


@pytest.mark.slow
def test_another_run_takes_the_baselines_full_scores_from_the_cache(e2e):
    run_dir, _, _ = e2e
    cache = run_dir.parent / "scores"
    entries = {p: p.stat().st_mtime_ns for p in cache.rglob("*.json")}
    # 2 top candidates + 3 baselines, each on the full search, select (the tiny zoo's) and test splits
    assert len(entries) == 3 * 5, sorted(entries)
    other = run_dir.parent / "other"  # a new study: only the three baselines, scored by the cache
    proc = _app(other, *SMALL, "search.n_trials=3", f"final.score_cache={cache}", "final.export_model=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.json")} == entries  # nothing scored, nothing rewritten
    # export_model=false: the recipe alone, and neither the summary nor the report lists a model directory
    assert (other / "best" / "recipe.yaml").is_file() and not (other / "best" / "model").exists()
    assert "best/recipe.yaml" in proc.stdout and "best/model/" not in proc.stdout
    assert "`best/recipe.yaml`" in (other / "report.md").read_text() and "best/model" not in (other / "report.md").read_text()
    first, again = (json.loads((d / "summary.json").read_text())["baselines"] for d in (run_dir, other))
    for name, b in first.items():
        assert again[name]["test_fitness"] == b["test_fitness"] and again[name]["search_full_fitness"] == b["search_full_fitness"]


def test_score_cache_key_follows_recipe_split_and_model_files(family, tmp_path):
    from evomerge.search.score_cache import ScoreCache

    g = genome(family)
    cache = ScoreCache(tmp_path / "c", {"eval_dtype": "float32"}, [])
    r = g.recipe(g.baselines()["textbook"])
    cache.put(r, "test", {"fitness": 0.5})
    assert cache.get(r, "test") == {"fitness": 0.5}
    assert cache.get(r, "search") is None
    assert cache.get(g.recipe(g.baselines()["alone:m0"]), "test") is None
    assert ScoreCache(tmp_path / "c", {"eval_dtype": "bfloat16"}, []).get(r, "test") is None
    weights = next(Path(family[1]["m0"]).glob("*.safetensors"))
    weights.touch()  # a rebuilt model: same name, new file
    assert ScoreCache(tmp_path / "c", {"eval_dtype": "float32"}, []).get(r, "test") is None


@pytest.mark.slow
def test_sigkill_then_resume_finishes_exactly_the_budget(tiny_zoo, tmp_path):
    run_dir = tmp_path / "run"
    # 150 items per task: a trial lasts long enough (~0.5 s) that the kill lands inside one
    args = [*APP, "+search=ties_math", "search.n_trials=8", "search.limit=150", "progress=false",
            "final.top_k=1", "final.export_model=false", "final.rescore_search=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"sqlite:///{run_dir / 'study.db'}"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            time.sleep(0.1)
            if proc.poll() is not None:
                pytest.fail("the search ended before it could be killed")
            try:
                if driver.count_finished(optuna.load_study(study_name="ties_math-tiny", storage=url)) < 3:
                    continue
            except Exception:  # noqa: BLE001 - not created yet
                continue
            os.kill(proc.pid, signal.SIGSTOP)  # frozen, it cannot finish the trial between our look and the kill
            try:
                trials = optuna.load_study(study_name="ties_math-tiny", storage=url).get_trials(deepcopy=False)
                if any(t.state == TrialState.RUNNING for t in trials):
                    break
            except Exception:  # noqa: BLE001 - frozen inside a write: look again later
                pass
            os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = optuna.load_study(study_name="ties_math-tiny", storage=url)
    running = [t.number for t in killed.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    assert running, "kill it while a trial runs"
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "marked failed and will be retried" in done.stdout
    study = optuna.load_study(study_name="ties_math-tiny", storage=url)
    trials = study.get_trials(deepcopy=False)
    retried = driver.retry_of(trials)
    finished = [t for t in trials if driver.is_finished(t, retried)]
    assert len(finished) == 8
    assert set(running) <= retried  # the killed trial was retried ...
    for n in running:
        again = [t for t in finished if t.user_attrs.get("retry_of") == n]
        assert len(again) == 1 and again[0].params == trials[n].params  # ... once, with its parameters
    names = [t.user_attrs["baseline"] for t in finished if "baseline" in t.user_attrs]
    assert sorted(names) == ["alone:add", "alone:sub", "textbook"]  # none lost, none duplicated
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.parametrize("args,needle", [
    (["models=user_example"], "models.base: model directory '/path/to/base-model' does not exist"),
    (["tasks.tasks={no_such_task: {acc: 1}}"], "unknown lm-eval task(s) 'no_such_task'"),
    (["search.genes.density.high=1.5"], "search.genes.density.high = 1.5 is outside the valid range"),
    (["models=user_example", "models.base=null", "models.specialists={a: /tmp}"], "needs a base model"),
])
def test_bad_configuration_is_one_clear_error(tiny_zoo, tmp_path, args, needle):
    if "needs a base model" in needle:
        args = ["models=user_example", "models.base=null", f"models.specialists={{a: {tiny_zoo.specialists['add']}}}"]
    start = time.perf_counter()
    proc = _app(tmp_path / "run", "+search=ties_math", *args, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "evomerge: error:" in proc.stderr and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started
    assert time.perf_counter() - start < 60
