"""One search session: models, evaluator and study set up once, then search, final scoring and outputs.

The same path for one process and for each worker of a cluster sweep: what a process shares with others
is the :class:`~evomerge.run.coordination.Coordination` it is given (run/coordination.py; the cluster
worker's is run/cluster.py's ``Shared``), never a different copy of the path.

Why a resumed study refuses a changed search space: Optuna stores parameters
by name, so a study whose genes changed meaning (another method, other bounds,
other layer groups, another fitness) would silently mix incompatible trials.
The session stores a fingerprint of everything that gives a parameter or a
score its meaning and stops with a clear message when it differs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
from tqdm.auto import tqdm

from evomerge.errors import ConfigError
from evomerge.export.run import export_trial, run_files, trial_counts, write_json, write_trials_csv
from evomerge.search import driver, estimators, record
from evomerge.search.winner import FinalResult, rescore
from evomerge.search.fitness import Scorer, TaskSpec, objective_names
from evomerge.search.config import RunConfig, parse_config
from evomerge.search.estimators import LookEstimator
from evomerge.search.dataflow import DataflowGenome, DataflowSpec, is_dataflow
from evomerge.search.genome import Genome, layout_of
from evomerge.search.models import pick_sources, resolve_models
from evomerge.search.preflight import check_before_study
from evomerge.search.samplers import make_pruner, make_sampler
from evomerge.search.score_cache import ScoreCache
from evomerge.search.warm import warm_points
from evomerge.run.coordination import Coordination, Local, Outcome
from evomerge.search.storage import expect_study, storage_url


class SearchSession:
    def __init__(self, config: RunConfig, run_dir: Path, *, t0: float, coord: Coordination | None = None) -> None:
        self.coord = coord if coord is not None else Local(config, run_dir)  # what is shared with other processes
        self.config, self.run_dir, self.tasks, self.t0 = config, self.coord.out_dir, config.tasks, t0  # checked once (search/config.py)
        self.raw = config.raw
        self.multi_objective = config.multi_objective
        self.progress = config.progress
        self.timings: dict[str, Any] = {}
        self.trust_remote_code = config.trust_remote_code  # model-directory code runs only if set
        self.engine: Any = None  # the prepared merge, once a candidate needed it (its kernel choice is the export's)

    def _timed(self, key: str, start: float) -> None:
        self.timings[key] = round(time.perf_counter() - start, 3)

    # ---- set-up ----------------------------------------------------------------------
    def _setup(self) -> None:
        raw = self.raw
        models = resolve_models(self.config.models, progress=self.progress)
        self.timings["zoo_s"] = round(models.build_seconds, 3)
        self.tasks = self.tasks.expand(models.zoo_tasks)
        self.objectives = objective_names(self.tasks, self.multi_objective)
        self.spec = spec = _with_sources(self.config.search, list(models.specialists))
        self.search_cfg = {**raw["search"], "sources": spec.sources}  # what the study records of its search
        dataflow = isinstance(spec, DataflowSpec)  # layer stacking (search/dataflow.py): its own spec, genome and engine
        if dataflow and spec.parameter_space:  # PS-then-DFS: the parameter-space winner joins the sources
            from evomerge.search.dataflow import PS_SOURCE

            models.specialists = {**models.specialists,
                                  PS_SOURCE: run_parameter_space(raw, self.run_dir, spec.parameter_space)}
            self.spec = spec = _with_sources(spec, [*spec.sources, PS_SOURCE], replace=True)
        self.sources = pick_sources(models, spec.sources)
        self.models = models
        start = time.perf_counter()
        self.device = _device(self.coord.device(self.config.device))
        if self.config.eval_dtype == "bfloat16" and self.device.type == "cpu" and not _cpu_has_amx():
            print("evomerge: eval_dtype=bfloat16 on a CPU without AMX, where bfloat16 matmuls are slower than "
                  "float32 (results/search_speed.md); eval_dtype=float32 scores faster here.")
        self.scorer = Scorer(self._evaluator(), self.tasks, self.objectives)
        self._timed("evaluator_s", start)
        layout = layout_of(models.base or next(iter(self.sources.values())))
        seed = self.config.seed
        self.genome = (DataflowGenome(spec, self.sources, layout, seed=seed) if dataflow  # type: ignore[arg-type]
                       else _genome(spec, self.sources, models.base, layout, seed=seed))
        # every configuration check that can fail runs now, before a study exists (evomerge/search/preflight.py)
        check_before_study(self.scorer.evaluator, self.tasks, base=models.base or next(iter(self.sources.values())),
                           tokenizer_dir=self.tokenizer_dir,
                           genome=self.genome, n_trials=spec.n_trials, sampler=self.config.sampler, seed=seed,
                           scorer=self.scorer, fresh_items=spec.fresh_items, limit=spec.limit,
                           estimator=spec.estimator)
        self.warm = warm_points(self.config.warm_start, self.genome)  # its errors, too, come first

    def _evaluator(self) -> Any:
        from evomerge.checkpoints.tokenizer import load_tokenizer
        from evomerge.evaluation import Evaluator

        tok_dir = self.models.tokenizer or self.models.base or next(iter(self.sources.values()))
        self.tokenizer_dir = tok_dir
        tokenizer = load_tokenizer(tok_dir, trust_remote_code=self.trust_remote_code,
                                   how_to_trust="trust_remote_code=true")
        return Evaluator(tokenizer, list(self.tasks.tasks), include_paths=self.models.task_dirs,
                         batch_size=self.config.batch_size, device=str(self.device),
                         max_gen_toks=self.config.max_gen_toks, splits=self.tasks.split_plan(self.config.seed),
                         apply_chat_template=self.tasks.apply_chat_template,
                         fewshot_as_multiturn=self.tasks.fewshot_as_multiturn,
                         backend=self.config.evaluator)

    def _study_meta(self) -> record.StudyManifest:
        lay = self.genome.layout
        return record.StudyManifest(
            fingerprint=self.genome.fingerprint() + "/" + _fitness_key(self.tasks, self.objectives, self.spec.limit,
                                                                       self.spec.fresh_items, self.spec.estimator),
            search=self.search_cfg, sources=self.sources, base=self.models.base, seed=self.genome.seed,
            layout={"n_layers": lay.n_layers, "pre": list(lay.pre), "post": list(lay.post),
                    "layer_names": list(lay.layer_names)},
            tasks=self.tasks.tasks, objectives=self.objectives, limit=self.spec.limit,
        )

    def _open_study(self) -> optuna.Study:
        """The study in ``self.storage``, created or resumed, refused when its search space or fitness changed."""
        spec, storage = self.spec, self.storage
        single = len(self.objectives) == 1
        looks = spec.pruning.looks  # the steps before the whole look: fractions of its items, or counts
        prune = bool(spec.pruning.enabled and single and looks != (1.0,))  # (a first look of 1.0: the whole look)
        self.looks = looks if prune else ()
        self.pruner = make_pruner(prune, float(spec.pruning.keep), int(spec.pruning.startup_trials))
        config, seed = self.config, self.coord.sampler_seed(self.config.seed)  # a worker's sampler: a seed of its own
        self.sampler_for = lambda start: make_sampler(config.sampler, seed, self._inside(start))
        name = config.study_name
        expect_study(storage, name, self.run_dir)
        study = optuna.create_study(study_name=name, storage=storage, directions=["maximize"] * len(self.objectives),
                                    load_if_exists=True)
        meta = self._study_meta()
        old = record.manifest_of(study)
        if old is None:
            record.set_manifest(study, meta)
        elif old.fingerprint != meta.fingerprint:
            raise ConfigError(
                f"study {name!r} in {self.run_dir} was started with a different search space or fitness (method, genes, "
                f"bounds, layer groups, models, tasks or limit changed), so its trials cannot be mixed with this one's. "
                f"Start a new study with `study_name=NEW_NAME` (or hydra.run.dir=...), or restore the old settings."
            )
        if len(study.directions) != len(self.objectives):
            raise ConfigError(f"study {name!r} has {len(study.directions)} objective(s) and this config {len(self.objectives)}; "
                              f"use another study_name for a different sampler/objectives.")
        record.set_objectives(study, self.objectives)
        write_json(self.run_dir / "splits.json", self.scorer.evaluator.splits.record())  # which items each split used
        return study

    def _inside(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """A start point clipped into the bounds (a baseline may lie outside them, e.g. weight 0 with low 0.1)."""
        if params is None:
            return None
        out: dict[str, Any] = {}
        for name, dist in self.genome.distributions().items():
            v = params.get(name)
            if isinstance(dist, optuna.distributions.FloatDistribution) and v is not None:
                v = min(max(float(v), dist.low), dist.high)
            out[name] = v
        return out

    # ---- the session -----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The whole search in one sitting: set-up, the study and its baselines, the search, the final choice,
        the outputs. What this process shares with others (nothing, or a study other workers run too) is
        ``self.coord``'s to decide (run/coordination.py); the path is the same."""
        coord, name = self.coord, self.config.study_name
        # a second search of this study file is refused before it loads anything (workers share the lock)
        with coord.session_lock(name):
            # ---- set-up: models, evaluator, genome; every check that can fail runs before a study exists
            self._setup()
            n_trials = self.spec.n_trials
            self.storage = coord.open_storage()
            # ---- the study and its baselines, set up once per study
            with coord.setup_lock(self.storage, name):
                study = self._open_study()
                coord.begin(study, n_trials)
                self._enqueue_baselines(study)
            # ---- search: trials until the budget is spent (the engine is prepared only if one is left)
            get_engine = driver.lazy(self._engine, lambda start: self._timed("prepare_s", start))
            budget, stats, outcome = coord.budget(study, n_trials), driver.LoopStats(), Outcome()
            start = time.perf_counter()
            if budget.finished() < n_trials:
                estimator = self._estimator(study, get_engine())
                loop = driver.SearchLoop(study, self.sampler_for, self.pruner, self.genome, get_engine(), self.scorer,
                                         n_trials=n_trials, limit=self.spec.limit, looks=self.looks,
                                         fresh_items=self.spec.fresh_items, estimator=estimator,
                                         seed=self.genome.seed,
                                         fresh_seeds=self.spec.random_mode == "fresh", progress=self.progress,
                                         budget=budget)
                stats = loop.run()
                outcome = Outcome(ran=loop.ran, taken_over=loop.taken_over, interrupted=stats.interrupted)
            self.timings["search_s"] = round(time.perf_counter() - start - self.timings.get("prepare_s", 0.0), 3)
            self.timings["per_candidate"] = stats.per_candidate()
            # ---- final: the best re-scored on held-out items and the winner chosen, by one process
            summary = None
            with coord.export(study, outcome, n_trials) as exporting:
                if exporting:
                    start, prep = time.perf_counter(), self.timings.get("prepare_s", 0.0)
                    final = self._rescore(study, get_engine)
                    self.timings["final_s"] = round(time.perf_counter() - start
                                                    - (self.timings.get("prepare_s", 0.0) - prep), 3)
                    # ---- outputs: best/, trials.csv, report.md, summary.json
                    summary = self._outputs(study, final, stats.interrupted, coord.summary_keys(study))
                    outcome.exported = True
            if summary is not None:
                _print_summary(summary, self.run_dir)
            return coord.finish(study, summary, outcome, self.timings)

    def _enqueue_baselines(self, study: optuna.Study) -> None:
        """The hand-set recipes, then the warm start's points (search/warm.py), each enqueued once per study."""
        driver.enqueue_baselines(study, self.genome.baselines())
        if self.warm:
            driver.enqueue_baselines(study, {w.label: w.params for w in self.warm}, {w.label: w.seed for w in self.warm})

    def _estimator(self, study: optuna.Study, engine: Any) -> LookEstimator | None:
        """``search.estimator``: what the baselines' results on every search item say, scored once per study
        (before its first searched trial) and kept in it. ``paired`` reads the textbook recipe's (the first
        textbook of a method-gene search; else the first baseline): a merge near the candidates, so that the
        per-item differences are small. ``irt`` reads every baseline's, to fit each item's difficulty."""
        kind, baselines = self.spec.estimator, self.genome.baselines()
        if kind == "mean":
            return None

        def results(label: str) -> record.ReferenceScores:
            engine.apply(self.genome.recipe(baselines[label], seed=self.genome.seed))
            return self.scorer.reference(engine.model, "search", label)

        if kind == "paired":
            ref = record.reference_of(study)
            if ref is None:
                ref = results(next((b for b in baselines if b.split(":")[0] == "textbook"), next(iter(baselines))))
                record.set_reference(study, ref)
            return estimators.Paired(ref)
        cal = record.calibration_of(study)
        if cal is None:
            cal = estimators.calibrate([results(label) for label in
                                        tqdm(baselines, desc="item calibration", unit="baseline", disable=not self.progress)])
            record.set_calibration(study, cal)
        return estimators.Irt(cal)

    def _rescore(self, study: optuna.Study, get_engine: Any) -> FinalResult:
        final = self.config.final
        return rescore(study, self.genome, get_engine, self.scorer, top_k=final.top_k,
                       rescore_search=final.rescore_search, search_limit=self.spec.limit,
                       progress=self.progress, margin_se=final.margin_se,
                       cache=self._score_cache(), select_split=self.scorer.evaluator.splits.has("select"))

    def _score_cache(self) -> ScoreCache | None:
        config = self.config
        root = config.final.score_cache
        if not root:
            return None
        if root == "auto":
            from evomerge.zoo.build import cache_root

            root = cache_root() / "scores"
        context = {"tasks": _fitness_key(self.tasks, self.objectives, None), "eval_dtype": config.eval_dtype,
                   "batch_size": config.batch_size, "max_gen_toks": config.max_gen_toks,
                   "evaluator": config.evaluator,
                   "device": getattr(self.device, "type", str(self.device)),
                   "items": self.scorer.evaluator.splits.digest()}
        return ScoreCache(root, context, self.models.task_dirs, tokenizer_dir=self.tokenizer_dir)

    def _engine(self) -> Any:
        from evomerge.checkpoints import parse_dtype
        from evomerge.engine.prepared import PreparedMerge

        dtype = parse_dtype(self.config.eval_dtype, "eval_dtype")
        if isinstance(self.genome, DataflowGenome):  # no merge kernel: the live model is re-wired per candidate
            from evomerge.engine.stack import StackEngine

            self.engine = StackEngine(list(self.sources.values()), device=str(self.device), model_dtype=dtype,
                                      trust_remote_code=self.trust_remote_code)
            return self.engine
        methods = getattr(self.genome, "methods", None)  # a method-gene search: every method from one engine
        recipe = (self.genome.structure_recipe() if methods else self.genome.recipe(self.genome.baselines()["textbook"]))
        self.engine = PreparedMerge(recipe, methods=methods, device=str(self.device), memory=self.config.memory,
                                    model_dtype=dtype, progress=self.progress, device_map=self.config.device_map,
                                    max_memory=self.config.max_memory, trust_remote_code=self.trust_remote_code)
        return self.engine

    def _outputs(self, study: optuna.Study, final: FinalResult, interrupted: bool,
                 extra: dict[str, Any]) -> dict[str, Any]:
        """``extra``: the coordination's own summary keys (a cluster worker: who exported, trials per worker)."""
        from evomerge.export.report import write_report

        start = time.perf_counter()
        run_dir = self.run_dir
        best = final.winner
        chosen = "select" if self.scorer.evaluator.splits.has("select") else "search"
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        if best is not None:
            export_trial(self.genome, by_number[best.number], run_dir / "best", scores=best.as_dict(),
                         title=f"evomerge {self.spec.name}: {best.label}", search_limit=self.spec.limit,
                         model=self.config.final.export_model, device=str(self.device),
                         progress=False, fused=self.engine.fused if self.engine is not None else "auto",
                         trust_remote_code=self.trust_remote_code, engine=self.engine)  # the scored weights
        for n in final.front:
            export_trial(self.genome, by_number[n], run_dir / "pareto" / f"trial_{n}", scores=None,
                         title=f"trial {n}", model=False)
        self._timed("export_s", start)
        write_trials_csv(study, run_dir / "trials.csv")
        self.timings["total_s"] = round(time.perf_counter() - self.t0, 3)
        summary = {
            "study": study.study_name, "storage": storage_url(self.storage), "run_dir": str(run_dir.resolve()),
            "search": self.spec.name, "method": self.spec.method, "sources": list(self.sources),
            "models": self.models.name, "objectives": self.objectives, "n_trials": self.spec.n_trials,
            "limit": self.spec.limit, "interrupted": interrupted, "trials": trial_counts(study),
            "best": None if best is None else best.as_dict(),
            "baselines": {c.label: c.as_dict() for c in final.baselines},
            "best_baseline": _best_baseline(final),
            "winner_rule": (f"the best searched recipe if its {chosen}-split fitness beats the best baseline's by more "
                            f"than {self.config.final.margin_se:g} standard error(s) of the "
                            f"difference (paired over the same items where both were scored item by item), else "
                            f"that baseline; the test split is never used to choose"),
            "comparison": final.comparison,
            "held_out": final.held_out,
            "split_roles": {"search": "optimised", **({"select": "chose the winner"} if chosen == "select" else {}),
                            "test": "reported only"},
            "top": [c.as_dict() for c in final.candidates], "pareto_front": final.front,
            "timings": self.timings, **extra,
        }
        if best is not None and hasattr(self.genome, "sequence"):  # a data-flow winner: its layer stack, for the report
            summary["layer_sequence"] = self.genome.sequence(best.params)
        table = None if best is None else self.genome.per_layer_table(best.params)
        report_start = time.perf_counter()
        write_report(run_dir, study, summary, table, self.objectives)
        self.timings["report_s"] = round(time.perf_counter() - report_start, 3)
        write_json(run_dir / "summary.json", summary)
        return summary


def is_cluster(raw: dict[str, Any]) -> bool:
    """A worker of a shared study: ``worker`` is set, or the study lives in PostgreSQL."""
    return raw.get("worker") is not None or (raw.get("storage") or {}).get("kind") == "postgres"


def run_parameter_space(raw: dict[str, Any], run_dir: Path, ps: dict[str, Any]) -> str:
    """PS-then-DFS: run the parameter-space search ``ps`` names (its own study in ``run_dir/parameter_space``,
    resumed like any study) and return its exported winner's model directory, the data-flow search's ``ps`` source.

    Why a nested session and not a second command: the winner's directory, the tasks and the models are then
    the data-flow search's own, and rerunning the one command resumes whichever of the two was unfinished.
    """
    from omegaconf import OmegaConf

    if is_cluster(raw):
        raise ConfigError("search.parameter_space runs the parameter-space search inside one process, not as cluster "
                          "workers: run that search first (`evomerge +search=ties_math ...`), then this one with its "
                          "winner as a source (`'models.specialists={ps: RUN_DIR/best/model}' 'search.sources=[...,ps]'`).")
    from evomerge.search.config import compose_search

    loaded = compose_search(ps["search"], "search.parameter_space.search")
    if is_dataflow(loaded):
        raise ConfigError(f"search.parameter_space.search = {ps['search']!r} is itself a data-flow search; name a "
                          f"parameter-space one (ties_math, dare_ties_math, ...).")
    root = OmegaConf.create({k: v for k, v in raw.items() if k != "search"})
    root.search = OmegaConf.merge(loaded, {k: v for k, v in ps.items() if k != "search"})
    ps_raw = OmegaConf.to_container(root, resolve=True)
    ps_raw["study_name"] = f"{raw['study_name']}-{ps['search']}"  # type: ignore[index]
    ps_raw["final"] = {**ps_raw["final"], "export_model": True}  # type: ignore[index,dict-item]
    ps_dir = run_dir / "parameter_space"
    session = SearchSession(parse_config(ps_raw), ps_dir, t0=time.perf_counter())  # type: ignore[arg-type]
    session.multi_objective = False  # its winner is one model, whatever the data-flow search's sampler
    session.run()
    model = ps_dir / "best" / "model"
    if not (model / "config.json").is_file():
        raise ConfigError(f"the parameter-space search in {ps_dir} exported no winner model; see its report.md.")
    return str(model.resolve())


def _with_sources(spec: Any, sources: list[str], *, replace: bool = False) -> Any:
    """A copy of the search spec with ``sources``: where it has none (null: every specialist of the models
    group), or always with ``replace``. A copy, so the run's config stays as it was parsed."""
    from dataclasses import replace as copy

    if spec.sources is not None and not replace:
        return spec
    if isinstance(spec, DataflowSpec):
        return copy(spec, common=copy(spec.common, sources=sources))
    if hasattr(spec, "per_method"):  # a method-gene search (search/method_space.py): every method's spec
        return copy(spec, common=copy(spec.common, sources=sources),
                    per_method={m: copy(s, sources=sources) for m, s in spec.per_method.items()})
    return copy(spec, sources=sources)


def _genome(spec: Any, sources: dict[str, str], base: str | None, layout: Any, *, seed: int) -> Any:
    """A merge-method genome: one method's, or the method-gene search's (search/method_space.py)."""
    from evomerge.search.method_space import AutoGenome, AutoSpec

    if isinstance(spec, AutoSpec):
        genome = AutoGenome(spec, sources, base, layout, seed=seed)
        for m, why in genome.left_out.items():
            print(f"evomerge: search.methods: {m} is left out ({why}).")
        return genome
    return Genome(spec, sources, base, layout, seed=seed)


def _best_baseline(final: FinalResult) -> dict[str, Any] | None:
    scored = [c for c in final.baselines if c.test is not None]
    if not scored:
        return None
    b = max(scored, key=lambda c: c.selection)
    return {"label": b.label, "trial": b.number, "search_fitness": b.search, "test_fitness": b.test,
            "best_test_fitness": max(c.test for c in scored)}  # type: ignore[type-var]


def _fitness_key(tasks: TaskSpec, objectives: list[str], limit: float | None, fresh_items: int | None = None,
                 estimator: str = "mean") -> str:
    import hashlib
    import json

    blob = json.dumps({"tasks": tasks.tasks, "objectives": objectives, "limit": limit, **tasks.options_key(),
                       **({"fresh_items": fresh_items} if fresh_items is not None else {}),
                       **({"estimator": estimator} if estimator != "mean" else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _device(name: str) -> Any:
    from evomerge.engine.jobs import resolve_device
    from evomerge.errors import EvomergeError

    try:
        return resolve_device(name)
    except EvomergeError as exc:
        raise ConfigError(f"device = {name!r}: {exc}") from None


def _cpu_has_amx() -> bool:
    """Whether oneDNN can use AMX tiles for bfloat16 here (torch's own probe; True where it has none)."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return True if probe is None else bool(probe())


def _se_text(comp: dict[str, Any]) -> str:
    """A comparison's standard error as the summary prints it: the value, and whether it is paired."""
    return "n/a" if comp["se"] is None else f"{comp['se']:.4f}" + (" paired" if comp["paired"] else " unpaired")


def _print_summary(s: dict[str, Any], run_dir: Path) -> None:
    def f(v: Any) -> str:
        return "   n/a" if v is None else f"{v:.4f}"

    t = s["trials"]
    counts = ", ".join(f"{k} {v}" for k, v in t.items() if k != "finished")
    print(f"\nevomerge: study {s['study']}: {t.get('finished', 0)}/{s['n_trials']} trials finished ({counts}) "
          f"in {s['timings'].get('total_s', 0):.0f} s")
    rows = []
    if s["best"]:
        rows.append((f"winner ({s['best']['label']})", s["best"]))
    rows += [(f"baseline {k}", v) for k, v in s["baselines"].items()]
    select = "select" in (s.get("split_roles") or {})
    head = f" {'select':>8}" if select else ""
    print(f"  {'candidate':<34} {'search':>8} {'search*':>8}{head} {'test':>8}")
    for label, r in rows:
        sel = f" {f(r.get('select_fitness')):>8}" if select else ""
        print(f"  {label:<34} {f(r['search_fitness']):>8} {f(r.get('search_full_fitness')):>8}{sel} {f(r['test_fitness']):>8}")
    print("  (search: the search-time sample, optimised; search*: every search item; "
          + ("select: never optimised, chose the winner; " if select else "")
          + "test: held out, reported only, never used to choose)")
    comp = s.get("comparison")
    if comp:
        print(f"  winner rule: {comp['searched']} vs {comp['baseline']} on {comp['on']}: {comp['difference']:+.4f} "
              f"(standard error {_se_text(comp)})")
    held = s.get("held_out")
    if held:
        print(f"  held out: {held['winner']} vs the best other hand-set recipe on test, {held['baseline']}: "
              f"{held['difference']:+.4f} (standard error {_se_text(held)}; reported, never used to choose)")
    pc = s["timings"].get("per_candidate") or {}
    if pc:
        print(f"  per candidate: merge {pc['merge_s']:.2f} s, evaluation {pc['eval_s']:.2f} s, overhead {pc['overhead_s']:.3f} s")
    print(f"run directory: {run_dir}")
    print("  " + "  ".join(run_files(run_dir)))
    if s.get("storage"):
        print(f"dashboard: optuna-dashboard {s['storage']}")
