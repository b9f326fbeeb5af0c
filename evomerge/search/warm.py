"""Warm start: begin a search from an earlier study's best trials or from recipe files, as extra baselines.

Why as baselines: an enqueued trial is scored exactly like a hand-set recipe (its parameters are
fixed, it counts toward ``search.n_trials``, the final re-score weighs it like any baseline), and
the sampler's start point is the best finished baseline, so a second search on the same models
begins where the first ended instead of from the textbook recipe.

The config (top-level ``warm_start``, null: off)::

    warm_start: {study: RUN_DIR or STORAGE_URL, top: 3, study_name: null}   # an earlier study's best trials
    warm_start: {recipes: [runs/x/best/recipe.yaml, ...]}                  # recipe files

A study's trials are taken when its genes are this search's genes (same names, categorical values
among this search's choices), else a ConfigError names the mismatch. A recipe file is taken when
this genome can express it: its parameters are read back into genes and the genome's recipe of
them must equal the file (method, models, base, every value), else a ConfigError says where it
differs. Labels: ``warm:trial_<N>`` and ``warm:<file>``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from evomerge.errors import ConfigError, EvomergeError

PREFIX = "warm:"


@dataclass(frozen=True)
class WarmPoint:
    label: str                 # the baseline label, e.g. warm:trial_12
    params: dict[str, Any]     # this genome's parameters
    seed: int | None           # the DARE/DELLA mask seed the earlier trial or recipe used (None: the search's)


def parse_warm(cfg: Any) -> dict[str, Any] | None:
    """The ``warm_start`` config, checked (None: no warm start)."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict) or not (("study" in cfg) ^ ("recipes" in cfg)) or set(cfg) - {"study", "top", "study_name", "recipes"}:
        raise ConfigError(f"warm_start = {cfg!r}: either {{study: RUN_DIR or STORAGE_URL, top: 3}} (an earlier "
                          f"study's best trials; study_name: NAME when its storage holds several) or {{recipes: "
                          f"[path/recipe.yaml, ...]}}; null for none.")
    if "study" in cfg:
        top = cfg.get("top", 3)
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ConfigError(f"warm_start.top = {top!r}: how many of the earlier study's best trials to enqueue, >= 1.")
        if not isinstance(cfg["study"], str) or not cfg["study"]:
            raise ConfigError(f"warm_start.study = {cfg['study']!r}: the earlier search's run directory or its "
                              f"storage URL (e.g. sqlite:///runs/x/study.db).")
        return {"study": cfg["study"], "top": top, "study_name": cfg.get("study_name")}
    recipes = cfg["recipes"]
    if isinstance(recipes, str):
        recipes = [recipes]
    if not isinstance(recipes, list) or not recipes or not all(isinstance(r, str) for r in recipes):
        raise ConfigError(f"warm_start.recipes = {recipes!r}: a list of recipe file paths, e.g. [runs/x/best/recipe.yaml].")
    return {"recipes": list(recipes)}


def warm_points(cfg: dict[str, Any] | None, genome: Any) -> list[WarmPoint]:
    """The warm-start points of ``cfg`` (see :func:`parse_warm`) in this genome, best first."""
    if cfg is None:
        return []
    if "study" in cfg:
        return _from_study(cfg, genome)
    points, seen = [], set()
    for p in cfg["recipes"]:
        point = _from_recipe(Path(p), genome)
        label, k = point.label, 1
        while label in seen:  # two runs' best/recipe.yaml: warm:best/recipe, warm:best/recipe#2
            k += 1
            label = f"{point.label}#{k}"
        seen.add(label)
        points.append(WarmPoint(label, point.params, point.seed))
    return points


# ---- an earlier study ----------------------------------------------------------------------------
def _load_study(source: str, study_name: str | None) -> optuna.Study:
    from evomerge.search.storage import make_storage

    where = f"warm_start.study = {source!r}"
    if "://" in source:
        storage: Any = source
    else:
        run_dir = Path(source)
        cfg: dict[str, Any] = {"kind": "sqlite", "path": "study.db"}
        hydra_cfg = run_dir / ".hydra" / "config.yaml"
        if hydra_cfg.is_file():
            import yaml

            cfg = (yaml.safe_load(hydra_cfg.read_text()) or {}).get("storage") or cfg
        rel = Path(cfg.get("path") or "study.db")
        path = rel if rel.is_absolute() else run_dir / rel
        if cfg.get("kind") == "postgres":
            raise ConfigError(f"{where}: that search's study lives in PostgreSQL; give its storage URL instead "
                              f"(warm_start.study=postgresql://USER@HOST:5432/DB, study_name: NAME).")
        if not path.is_file():
            raise ConfigError(f"{where}: {run_dir} holds no study file ({path} is missing); name the earlier search's "
                              f"run directory, or its storage URL (e.g. sqlite:///{path}).")
        storage = make_storage({**cfg, "heartbeat_interval": None}, run_dir)
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # noqa: BLE001 - a bad URL or unreadable file: one message
        raise ConfigError(f"{where}: its storage could not be opened ({type(exc).__name__}: {exc}).") from None
    if study_name is None:
        if len(names) != 1:
            raise ConfigError(f"{where}: its storage holds {len(names)} studies ({', '.join(names) or 'none'}); name "
                              f"one with warm_start.study_name.")
        study_name = names[0]
    elif study_name not in names:
        raise ConfigError(f"{where}: no study {study_name!r} in its storage (it holds {', '.join(names) or 'none'}).")
    return optuna.load_study(study_name=study_name, storage=storage)


def _from_study(cfg: dict[str, Any], genome: Any) -> list[WarmPoint]:
    from evomerge.search import record

    study = _load_study(cfg["study"], cfg.get("study_name"))
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not record.baseline_of(t)]  # this search enqueues its own baselines
    if not done:
        raise ConfigError(f"warm_start.study = {cfg['study']!r}: study {study.study_name!r} has no finished searched "
                          f"trial to start from.")
    dists = genome.distributions()
    conditional = getattr(genome, "conditional", False)  # define-by-run (search/method_space.py): a trial holds
    genes = set(done[0].params)                          # its method's genes only
    if (genes - set(dists)) if conditional else genes != set(dists):
        missing, extra = sorted(set(dists) - genes), sorted(genes - set(dists))
        raise ConfigError(
            f"warm_start.study = {cfg['study']!r}: study {study.study_name!r} searched other genes than this search, "
            f"so its trials cannot be mapped into this genome (this search has {len(dists)} genes, it had {len(genes)}"
            + (f"; missing there: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}" if missing else "")
            + (f"; not here: {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}" if extra else "")
            + "). Warm-start from a study of the same search config and models, or from its best/recipe.yaml "
              "(warm_start.recipes) if this genome can express it.")
    out = []
    for t in sorted(done, key=record.ranking_fitness, reverse=True)[: cfg["top"]]:
        for name, dist in dists.items():
            if isinstance(dist, CategoricalDistribution) and name in t.params and t.params[name] not in dist.choices:
                raise ConfigError(f"warm_start.study: trial {t.number} of study {study.study_name!r} has {name} = "
                                  f"{t.params[name]!r}, not among this search's choices {list(dist.choices)}.")
        out.append(WarmPoint(f"{PREFIX}trial_{t.number}", {n: t.params[n] for n in dists if n in t.params},
                             record.seed_of(t)))
    return out


# ---- a recipe file -------------------------------------------------------------------------------
def _from_recipe(path: Path, genome: Any) -> WarmPoint:
    from evomerge.engine.recipe import load_recipe

    where = f"warm_start.recipes: {path}"
    if hasattr(genome, "genomes"):  # the method is a gene (search/method_space.py): the recipe's method reads it
        try:
            method = load_recipe(path).merge_method
        except EvomergeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if method not in genome.genomes:
            raise ConfigError(f"{where}: it is a {method!r} recipe, and this search's methods are "
                              f"{', '.join(genome.methods)}; warm-start from a recipe of one of them.")
        point = _from_recipe(path, genome.genomes[method])
        return WarmPoint(point.label, genome.encode(method, point.params), point.seed)
    if not hasattr(genome, "setting"):
        raise ConfigError(f"{where}: a data-flow search is warm-started from an earlier study (warm_start.study), "
                          f"not from a recipe file.")
    try:
        recipe = load_recipe(path)
    except EvomergeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if recipe.merge_method != genome.method.name or recipe.slices:
        raise ConfigError(f"{where}: it is a {recipe.merge_method!r} recipe{' with slices' if recipe.slices else ''}, "
                          f"and this search merges with {genome.method.name!r} over whole models; warm-start from a "
                          f"recipe of the same method.")
    by_path = {_norm(s.model, path): s for s in recipe.models}
    params: dict[str, Any] = {}
    try:
        for gene in genome.spec.genes.values():
            for owner in genome._owners(gene):
                if owner is None:
                    value = recipe.parameters.get(gene.name)
                else:
                    src = by_path.get(_norm(genome.sources[owner], None))
                    if src is None:
                        raise ValueError(f"it does not merge source {owner!r} ({genome.sources[owner]})")
                    value = src.parameters.get(gene.name)
                if value is None:
                    raise ValueError(f"it sets no {gene.name!r}" + (f" for {owner!r}" if owner else ""))
                for slot in genome._slots(owner, gene):
                    params[slot] = _read_slot(genome, gene, slot, value)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ConfigError(f"{where}: this search's genome cannot express it: {exc}.") from None
    seed = int(recipe.seed)
    mine = genome.recipe(params, seed=seed)
    theirs = recipe.to_dict()
    ours = mine.to_dict()
    for d in (theirs, ours):
        d["models"] = [{**m, "model": _norm(m["model"], path if d is theirs else None)} for m in d.get("models", [])]
        if d.get("base_model"):
            d["base_model"] = _norm(d["base_model"], path if d is theirs else None)
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ConfigError(f"{where}: this search's genome cannot express it (the closest recipe of its genes differs in "
                          f"{', '.join(diff)}: other layer groups, modules, fixed parameters or models). Warm-start "
                          f"from a recipe of the same search config, e.g. an earlier run's best/recipe.yaml.")
    return WarmPoint(f"{PREFIX}{path.parent.name}/{path.stem}" if path.parent.name else f"{PREFIX}{path.stem}",
                     params, seed)


def _norm(model: str, recipe_path: Path | None) -> str:
    p = Path(model)
    if not p.is_absolute() and recipe_path is not None and not p.exists() and (recipe_path.parent / p).exists():
        p = recipe_path.parent / p
    return str(p.resolve()) if p.exists() else model


def _read_slot(genome: Any, gene: Any, slot: str, value: Any) -> Any:
    """One gene's value read back from a recipe setting (checked afterwards by rebuilding the recipe)."""
    if gene.categorical:
        return value
    lay = genome.layout
    rest, by_filter = value, {}
    if isinstance(value, list) and value and all(isinstance(c, dict) for c in value):
        by_filter = {c["filter"]: c["value"] for c in value if "filter" in c}
        rest = next(c["value"] for c in value if "filter" not in c)
    parts = slot.split(".")
    if parts[-1] == "embed":
        return float(by_filter[lay.pre[0]])
    if parts[-1] == "head":
        return float(by_filter[lay.post[0]])
    group = int(parts[-1][1:]) if len(genome.groups) > 1 and parts[-1].startswith("g") else 0
    module = next((m for m in genome.modules if f".{m}" in f".{slot}."), None)
    values = by_filter[module] if module is not None else rest
    layers = genome.groups[group]
    at = round((layers[0] + layers[-1]) / 2) if genome.spec.interpolate else layers[0]
    return float(values[at] if isinstance(values, list) else values)
