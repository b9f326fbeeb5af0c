"""The merge search: genome -> recipe (pure), config errors, budget/resume, and the app end to end.

Unit tests use the engine's small random model families (no zoo, no lm-eval);
the end-to-end tests run the real console app as a subprocess on the tiny zoo.
"""
from __future__ import annotations

import copy

import optuna
import pytest
import torch
from optuna.trial import TrialState

from evomerge.engine.prepared import PreparedMerge
from evomerge.engine.recipe import Recipe, evaluate_setting
from evomerge.errors import ConfigError
from evomerge.search import driver
from evomerge.search.genome import Genome, layout_of
from evomerge.search.spec import parse_search
from model_factory import make_family

TIES = {
    "name": "t", "method": "ties", "layers_per_group": 1, "genes": {"weight": {"low": 0.0, "high": 1.0},
                                                                     "density": {"low": 0.1, "high": 1.0}},
    "parameters": {"normalize": True}, "textbook": {"weight": 1.0, "density": 0.5}, "n_trials": 8,
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, fts = make_family(tmp_path_factory.mktemp("fam"), "llama", n_models=3, layers=4)
    return str(base), {f"m{i}": str(p) for i, p in enumerate(fts)}


def genome(family, **over):
    base, sources = family
    cfg = copy.deepcopy(TIES)
    cfg.update(over)
    return Genome(parse_search(cfg), sources, base, layout_of(base))


def _random_point(g: Genome, seed: int = 0) -> dict:
    rng = torch.Generator().manual_seed(seed)
    out = {}
    for name, d in g.distributions().items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            out[name] = d.choices[0]
        else:
            out[name] = d.low + float(torch.rand(1, generator=rng)) * (d.high - d.low)
    return out


# ---- genome --------------------------------------------------------------------------------
def test_per_layer_genes_give_exact_per_layer_values(family):
    g = genome(family)
    assert g.dimension == 3 * 2 * 4  # 3 models x (weight, density) x 4 layers
    p = _random_point(g)
    r = g.recipe(p)
    w = r.models[1].parameters["weight"]
    layers = w[-1]["value"]  # the per-layer gradient; the edge tensors' values are stated by name before it
    assert isinstance(layers, list) and len(layers) == 4
    for i in range(4):  # mergekit gradient: layer i at t = i / 3 gets element i exactly
        assert evaluate_setting(w, f"model.layers.{i}.mlp.up_proj.weight", i / 3) == pytest.approx(round(p[f"m1.weight.g{i}"], 6))
    # edges: follow, stated explicitly (mergekit 0.1.5 reads every edge tensor at t = 0)
    assert evaluate_setting(w, "model.embed_tokens.weight", 0.0) == layers[0]
    assert evaluate_setting(w, "lm_head.weight", 0.0) == evaluate_setting(w, "model.norm.weight", 0.0) == layers[-1]
    assert r.base_model == family[0] and r.parameters == {"normalize": True}


def test_groups_global_interpolation(family):
    g2 = genome(family, layers_per_group=2)
    assert g2.dimension == 3 * 2 * 2
    p = {k: 0.5 for k in g2.distributions()}
    p["m0.weight.g0"], p["m0.weight.g1"] = 0.2, 0.8
    assert g2.recipe(p).models[0].parameters["weight"][-1]["value"] == [0.2, 0.2, 0.8, 0.8]
    gi = genome(family, layers_per_group=2, interpolate=True)  # centres at layers 0.5 and 2.5
    w = gi.recipe(p).models[0].parameters["weight"][-1]["value"]
    assert w == pytest.approx([0.2, 0.35, 0.65, 0.8])
    gg = genome(family, layers_per_group="global")
    assert gg.dimension == 6 and "m0.weight" in gg.distributions()
    assert gg.recipe({k: 0.3 for k in gg.distributions()}).models[0].parameters["weight"] == 0.3


def test_modules_and_own_edges_are_mergekit_conditions(family):
    g = genome(family, layers_per_group="global", modules=["self_attn", "mlp"], edges="own")
    names = set(g.distributions())
    assert {"m0.weight.self_attn", "m0.weight.mlp", "m0.weight.embed", "m0.weight.head"} <= names
    p = {k: 0.5 for k in names}
    p.update({"m0.weight.self_attn": 0.2, "m0.weight.mlp": 0.6, "m0.weight.embed": 0.9, "m0.weight.head": 0.1})
    setting = g.recipe(p).models[0].parameters["weight"]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.3) == 0.2
    assert evaluate_setting(setting, "model.layers.1.mlp.down_proj.weight", 0.3) == 0.6
    assert evaluate_setting(setting, "model.layers.1.input_layernorm.weight", 0.3) == pytest.approx(0.4)  # mean rule
    assert evaluate_setting(setting, "model.embed_tokens.weight", 0.0) == 0.9
    assert evaluate_setting(setting, "lm_head.weight", 1.0) == 0.1
    assert evaluate_setting(setting, "model.norm.weight", 1.0) == 0.1
    Recipe.from_dict(g.recipe(p).to_dict())  # a valid recipe


def test_categorical_gene_and_negative_weights(family):
    g = genome(family, layers_per_group="global", genes={"weight": {"low": -0.5, "high": 1.0},
                                                          "density": {"low": 0.1, "high": 1.0},
                                                          "normalize": {"choices": [True, False]}},
               parameters={})
    assert isinstance(g.distributions()["normalize"], optuna.distributions.CategoricalDistribution)
    p = {k: (False if k == "normalize" else -0.25) for k in g.distributions()}
    r = g.recipe(p)
    assert r.parameters["normalize"] is False and r.models[0].parameters["weight"] == -0.25


def test_recipe_replays_from_yaml(family, tmp_path):
    g = genome(family)
    r = g.recipe(_random_point(g, 3))
    path = r.save(tmp_path / "r.yaml")
    from evomerge.engine.recipe import load_recipe

    again = load_recipe(path)
    assert again.to_mergekit() == r.to_mergekit()


@pytest.mark.parametrize("method,extra", [
    ("ties", {}),
    ("dare_ties", {"parameters": {"normalize": True}}),
    ("task_arithmetic", {"genes": {"weight": {"low": 0.0, "high": 1.0}}, "parameters": {}, "textbook": {"weight": 0.5}}),
])
def test_alone_baselines_reproduce_each_model(family, method, extra):
    """Weight 1 / 0 and density 1 is the source model itself, for every method the math searches use."""
    base, sources = family
    g = genome(family, method=method, **extra)
    bl = g.baselines()
    assert list(bl) == ["alone:m0", "alone:m1", "alone:m2", "textbook"]
    engine = PreparedMerge(g.recipe(bl["textbook"]), device="cpu", progress=False)
    from safetensors.torch import load_file

    for name, path in sources.items():
        engine.apply(g.recipe(bl[f"alone:{name}"]))
        want = load_file(f"{path}/model.safetensors")
        for k, v in engine.state_dict().items():
            assert torch.allclose(v, want[k], atol=1e-6, rtol=0), (name, k)


def test_slerp_pair_baselines_are_the_two_ends(family):
    base, sources = family
    pair = {k: sources[k] for k in ("m0", "m1")}
    spec = parse_search({"name": "s", "method": "slerp", "base_model": "first", "genes": {"t": {"low": 0.0, "high": 1.0}},
                         "textbook": {"t": 0.5}})
    g = Genome(spec, pair, base, layout_of(base))
    assert g.dimension == 4 and "t.g0" in g.distributions()
    bl = g.baselines()
    assert set(bl) == {"alone:m0", "alone:m1", "textbook"}
    r = g.recipe(bl["alone:m1"])
    assert r.base_model == sources["m0"] and [m.model for m in r.models] == [sources["m0"], sources["m1"]]
    engine = PreparedMerge(g.recipe(bl["textbook"]), device="cpu", progress=False)
    from safetensors.torch import load_file

    for name in ("m0", "m1"):
        engine.apply(g.recipe(bl[f"alone:{name}"]))
        want = load_file(f"{sources[name]}/model.safetensors")
        for k, v in engine.state_dict().items():
            assert torch.allclose(v, want[k], atol=1e-5, rtol=1e-5), (name, k)


def test_fingerprint_tracks_the_space(family):
    assert genome(family).fingerprint() == genome(family).fingerprint()
    assert genome(family).fingerprint() != genome(family, layers_per_group=2).fingerprint()


# ---- config errors (pure) -------------------------------------------------------------------
@pytest.mark.parametrize("over,needle", [
    ({"genes": {"weight": {"low": 0, "high": 1}, "density": {"low": 0.1, "high": 1.5}}}, "search.genes.density.high"),
    ({"genes": {"weight": {"low": 0, "high": 1}, "densty": {"low": 0.1, "high": 1}}}, "has no parameter 'densty'"),
    ({"method": "tis"}, "unknown merge_method 'tis'"),
    ({"layers_per_group": 0}, "search.layers_per_group"),
    ({"genes": {"density": {"low": 0.1, "high": 1.0}}}, "needs 'weight'"),
    ({"n_trials": 0}, "search.n_trials"),
    ({"bogus": 1}, "search.bogus"),
])
def test_bad_search_configs(over, needle):
    cfg = copy.deepcopy(TIES)
    cfg.update(over)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        parse_search(cfg)


def test_method_needing_a_base_without_one(family):
    _, sources = family
    g = parse_search(TIES)
    base_dir = family[0]
    with pytest.raises(ConfigError, match="needs a base model"):
        Genome(g, sources, None, layout_of(base_dir))


# ---- budget and resume bookkeeping (in-memory Optuna, no models) -----------------------------
def test_budget_counts_retries_once():
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    driver.enqueue_baselines(study, {"a": {"x": 0.0}, "b": {"x": 1.0}})
    driver.enqueue_baselines(study, {"a": {"x": 0.0}, "b": {"x": 1.0}})  # idempotent
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2
    t = study.ask(dist)
    study.tell(t, 0.5)
    t2 = study.ask(dist)  # "dies" while running
    assert driver.take_over_dead_trials(study) == 1
    assert driver.take_over_dead_trials(study) == 0
    trials = study.get_trials()
    assert trials[t2.number].state == TrialState.FAIL
    retry = [x for x in trials if x.user_attrs.get("retry_of") == t2.number]
    assert len(retry) == 1 and retry[0].params == {} and retry[0].user_attrs["baseline"] == "b"
    assert driver.count_finished(study) == 1  # the retried FAIL does not count
    t3 = study.ask(dist)
    assert t3.params == {"x": 1.0} and t3.user_attrs["retry_of"] == t2.number
    study.tell(t3, state=TrialState.FAIL)  # a candidate failure counts
    assert driver.count_finished(study) == 2


# ---- the app, end to end on the tiny zoo (real subprocesses) -----------------------------------
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

APP = [sys.executable, "-m", "evomerge.search.app"]
SMALL = ["+search=ties_math", "search.n_trials=9", "search.limit=60", "progress=false", "final.top_k=2"]


def _app(run_dir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*APP, *args, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def e2e(tiny_zoo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    start = time.perf_counter()
    proc = _app(run_dir, *SMALL, f"final.score_cache={run_dir.parent / 'scores'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc, time.perf_counter() - start


@pytest.mark.slow
def test_end_to_end_writes_every_output(e2e):
    run_dir, proc, seconds = e2e
    for rel in ("best/recipe.yaml", "best/model/config.json", "best/model/README.md", "best/model/mergekit_config.yml",
                "trials.csv", "summary.json", "report.md", "history.png", "winner_genes.png", "study.db", ".hydra/config.yaml"):
        assert (run_dir / rel).exists(), rel
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trials"]["finished"] == 9
    best, bb = summary["best"], summary["best_baseline"]
    # the winner never loses to a hand-made recipe on the search split, and holds up on the held-out test split
    def selection(c):  # what the winner is chosen by: every search item when re-scored, else the search sample
        return c["search_full_fitness"] if c["search_full_fitness"] is not None else c["search_fitness"]

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
    # 2 top candidates + 3 baselines, each on the full search and test splits
    assert len(entries) == 2 * 5, sorted(entries)
    other = run_dir.parent / "other"  # a new study: only the three baselines, scored by the cache
    proc = _app(other, *SMALL, "search.n_trials=3", f"final.score_cache={cache}", "final.export_model=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.json")} == entries  # nothing scored, nothing rewritten
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


# ---- the search loop with stand-ins for the engine and the evaluator (fast, no lm-eval) -------
class _Timing:
    seconds = 0.001


class _Engine:
    """Fails (like a NaN merge) when the first model's first weight gene is below ``fail_below``."""

    def __init__(self, fail_below: float = -1.0, interrupt_at: int | None = None) -> None:
        self.model, self.fail_below, self.interrupt_at, self.calls = object(), fail_below, interrupt_at, 0

    def apply(self, recipe):
        from evomerge.errors import MergeError

        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        w = recipe.models[0].parameters["weight"]
        if (w[0] if isinstance(w, list) else w) < self.fail_below:
            raise MergeError("merging tensor 'x' produced NaN or infinite values")
        self.last = recipe
        return _Timing()


class _Scorer:
    def score(self, model, split, limit):
        from evomerge.search.fitness import Score

        return Score(values=[0.5], fitness=0.5, metrics={"t": {"acc": 0.5}}, seconds=0.001)

    def can_split(self, split):
        return False


class _EasyFirstItems(_Scorer):
    """A two-stage scorer whose first look scores every candidate ``bias`` above its whole look (the first
    items of a task are easier), the whole look being the first model's weight."""

    def __init__(self, engine: _Engine, bias: float) -> None:
        self.engine, self.bias = engine, bias

    def _score(self, fitness: float):
        from evomerge.search.fitness import Score

        return Score(values=[fitness], fitness=fitness, metrics={"t": {"acc": fitness}}, seconds=0.001)

    def _whole(self) -> float:
        w = self.engine.last.models[0].parameters["weight"]
        return float(w[0] if isinstance(w, list) else w)

    def score(self, model, split, limit):
        return self._score(self._whole())

    def can_split(self, split):
        return True

    def first_look(self, model, split, limit, first):
        return self._score(self._whole() + self.bias), {}

    def rest(self, model, split, state):
        return self._score(self._whole())


def _loop(family, engine, n_trials, storage=None, scorer=None, pruner=None):
    g = genome(family, layers_per_group="global")
    study = optuna.create_study(direction="maximize", storage=storage)
    driver.enqueue_baselines(study, g.baselines())
    loop = driver.SearchLoop(study, lambda start: optuna.samplers.RandomSampler(seed=0),
                             pruner or optuna.pruners.NopPruner(), g, engine, scorer or _Scorer(), n_trials=n_trials,
                             limit=None, first_limit=0.25 if pruner else None, prune=pruner is not None,
                             seed=0, fresh_seeds=False, progress=False)
    return study, loop


def test_a_pruned_trial_tells_the_sampler_its_first_look_on_the_whole_looks_scale(family):
    """Told its raw first look, a pruned candidate would outrank every kept one whenever the first items are
    easier (on the smol zoo by 0.07), and CMA-ES would walk towards what the pruner rejected."""
    engine = _Engine()
    study, loop = _loop(family, engine, n_trials=30, scorer=_EasyFirstItems(engine, bias=0.3),
                        pruner=optuna.pruners.PercentilePruner(50.0, n_startup_trials=3))
    loop.run()
    g = genome(family, layers_per_group="global")
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert len(pruned) >= 5
    for t in pruned:
        whole = g.recipe(t.params, seed=0).models[0].parameters["weight"]
        whole = whole[0] if isinstance(whole, list) else whole
        assert t.intermediate_values[0] == pytest.approx(whole + 0.3)  # the pruner compares raw first looks
        assert t.value == t.intermediate_values[1] == pytest.approx(whole)  # what samplers read
        assert t.user_attrs["fitness"] == pytest.approx(whole) and t.user_attrs["first_fitness"] == pytest.approx(whole + 0.3)
    kept = [t.value for t in study.get_trials() if t.state == TrialState.COMPLETE and not t.user_attrs.get("baseline")]
    assert max(t.value for t in pruned) < max(kept)


def test_failed_candidates_are_recorded_and_the_search_goes_on(family):
    study, loop = _loop(family, _Engine(fail_below=0.3), n_trials=12)
    loop.run()
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all("NaN" in t.user_attrs["fail_reason"] for t in failed)
    assert driver.count_finished(study) == 12 and len(trials) == 12
    assert [t.user_attrs.get("baseline") for t in trials[:4]] == ["alone:m0", "alone:m1", "alone:m2", "textbook"]


def test_many_failures_in_a_row_stop_with_the_reason(family):
    from evomerge.errors import EvomergeError

    study, loop = _loop(family, _Engine(fail_below=2.0), n_trials=20)
    with pytest.raises(EvomergeError, match="5 candidates in a row failed.*NaN"):
        loop.run()


def test_ctrl_c_marks_the_trial_and_queues_its_retry(family, tmp_path):
    study, loop = _loop(family, _Engine(interrupt_at=6), n_trials=10, storage=f"sqlite:///{tmp_path / 's.db'}")
    stats = loop.run()
    assert stats.interrupted
    trials = study.get_trials()
    dead = trials[5]
    assert dead.state == TrialState.FAIL and "interrupted" in dead.user_attrs["fail_reason"]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == 5
    assert driver.count_finished(study) == 5
    # resuming runs the retry first, with the dead trial's parameters, and ends at exactly the budget
    g = genome(family, layers_per_group="global")
    loop2 = driver.SearchLoop(study, lambda start: optuna.samplers.RandomSampler(seed=1), optuna.pruners.NopPruner(),
                              g, _Engine(), _Scorer(), n_trials=10, limit=None, first_limit=None, prune=False,
                              seed=0, fresh_seeds=False, progress=False)
    loop2.run()
    trials = study.get_trials()
    retried = [t for t in trials if t.user_attrs.get("retry_of") == 5]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and retried[0].params == dead.params
    assert driver.count_finished(study) == 10
