"""The method is a gene (search/method_space.py): the config, both encodings, the baselines, the decoder
(a pure function of the parameters: each point is its method's ordinary recipe) and the config errors."""
from __future__ import annotations

import copy

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.search import driver
from evomerge.search.genome import Genome, layout_of
from evomerge.search.method_space import AutoGenome, parse_auto, resolve_encoding
from evomerge.search.spec import parse_search
from search_factory import ConstantScorer, family  # noqa: F401  (a fixture: a base and three fine-tunes m0, m1, m2)

ALL = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear", "linear", "slerp", "nuslerp", "model_stock"]


@pytest.fixture(scope="module")
def shipped():
    """conf/search/auto_math.yaml as `+search=auto_math` composes it (its defaults list included)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from evomerge.search.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+search=auto_math"])
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw["search"]["sources"] = None
    return raw


def _cfg(shipped, **over) -> dict:
    search = copy.deepcopy(shipped["search"])
    search.update(over)
    return search


def _genome(shipped, family, encoding="conditional", sources=None, **over) -> AutoGenome:
    base, all_sources = family
    spec = parse_auto(_cfg(shipped, encoding=encoding, **over))
    sources = {k: all_sources[k] for k in (sources or ["m0", "m1"])}
    return AutoGenome(spec, sources, base, layout_of(base))


def _one_method(shipped, family, method, sources=("m0", "m1")) -> Genome:
    """The one-method genome of ``method``'s entry, as a search of that method alone builds it."""
    base, all_sources = family
    s = _cfg(shipped)
    own = {k: v for k, v in s["per_method"][method].items() if k in ("genes", "parameters", "textbook", "base_model")}
    spec = parse_search({**{k: s[k] for k in ("layers_per_group", "interpolate", "modules", "edges", "random_mode",
                                              "n_trials", "limit", "pruning")}, **own, "method": method, "name": "x"})
    return Genome(spec, {k: all_sources[k] for k in sources}, base, layout_of(base))


# ---- the config ------------------------------------------------------------------------------
def test_the_shipped_config_reuses_the_one_method_configs(shipped):
    spec = parse_auto(_cfg(shipped))
    assert list(spec.methods) == ALL
    from evomerge.search.config import compose_search

    for method, name in (("ties", "ties_math"), ("task_arithmetic", "task_arithmetic_math"),
                         ("dare_ties", "dare_ties_math"), ("slerp", "slerp_pair")):
        theirs = compose_search(name, "test")  # the one-method config: its genes are stated there only
        # every textbook is the one-method config's but task arithmetic's: the plain sum of the task vectors
        # (weight 1, the paper's lambda 1) here, not task_arithmetic_math's uniform scaling of 0.5
        expected = {"weight": 1.0} if method == "task_arithmetic" else theirs["textbook"]
        assert spec.per_method[method].textbook == expected, method
        assert set(spec.per_method[method].genes) == set(theirs["genes"]), method
    assert spec.per_method["slerp"].base_model == "first"
    assert spec.layers_per_group is None and spec.n_trials == 80  # the auto search's own shared keys


@pytest.mark.parametrize("over,match", [
    ({"encoding": "sometimes"}, r"search.encoding = 'sometimes': use conditional"),
    ({"methods": ["ties", "frankenstein"]}, r"'frankenstein' is not a merge method"),
    ({"methods": ["ties", "ties"]}, r"distinct merge method names"),
    ({"methods": ["ties", "karcher"]}, r"search.per_method.karcher is missing"),
    ({"genes": {"weight": {"low": 0, "high": 1}}}, r"search.genes is not a method-gene search setting"),
])
def test_config_errors_name_the_key(shipped, over, match):
    with pytest.raises(ConfigError, match=match):
        parse_auto(_cfg(shipped, **over))


def test_an_entrys_errors_name_its_key(shipped):
    cfg = _cfg(shipped)
    cfg["per_method"]["ties"]["genes"]["density"]["high"] = 1.5
    with pytest.raises(ConfigError, match=r"search.per_method.ties.genes.density.high = 1.5 is outside"):
        parse_auto(cfg)
    cfg = _cfg(shipped)
    cfg["per_method"]["linear"]["textbok"] = {"weight": 1.0}
    with pytest.raises(ConfigError, match=r"search.per_method.linear.textbok is not a search setting"):
        parse_auto(cfg)
    cfg = _cfg(shipped)
    cfg["per_method"]["linear"]["method"] = "ties"
    with pytest.raises(ConfigError, match=r"search.per_method.linear.method = 'ties'"):
        parse_auto(cfg)


def test_the_encoding_follows_the_sampler(shipped):
    for sampler, want in (("cmaes", "flat"), ("tpe", "conditional"), ("gp", "conditional"), ("random", "conditional")):
        raw = {"search": _cfg(shipped), "sampler": {"name": sampler, "options": {"multivariate": True}}}
        resolve_encoding(raw, sampler)
        assert raw["search"]["encoding"] == want
        # TPE over a conditional space models each method's genes jointly only with group: true
        assert raw["sampler"]["options"].get("group") is (True if sampler == "tpe" else None)
    raw = {"search": _cfg(shipped, encoding="flat"), "sampler": {"name": "tpe", "options": {"multivariate": True}}}
    resolve_encoding(raw, "tpe")
    assert raw["search"]["encoding"] == "flat" and "group" not in raw["sampler"]["options"]
    with pytest.raises(ConfigError, match="search.encoding = conditional under sampler=cmaes.*search.encoding=flat"):
        resolve_encoding({"search": _cfg(shipped, encoding="conditional"), "sampler": {"name": "cmaes"}}, "cmaes")


def test_a_method_that_cannot_merge_the_sources_is_left_out(shipped, family):
    g3 = _genome(shipped, family, sources=["m0", "m1", "m2"])
    assert "slerp" not in g3.methods and "nuslerp" not in g3.methods and "model_stock" in g3.methods
    assert "exactly 1" in g3.left_out["slerp"] and "exactly 2" in g3.left_out["nuslerp"]
    g2 = _genome(shipped, family)
    assert list(g2.methods) == ALL and not g2.left_out
    g1 = _genome(shipped, family, sources=["m0"])
    assert "model_stock" in g1.left_out and "ties" in g1.methods
    with pytest.raises(ConfigError, match="none of .* can merge"):
        _genome(shipped, family, sources=["m0"], methods=["model_stock", "nuslerp"])
    base, sources = family
    with pytest.raises(ConfigError, match="set models.base"):
        AutoGenome(parse_auto(_cfg(shipped, encoding="flat")), sources, None, layout_of(base))


# ---- the conditional encoding ----------------------------------------------------------------
def test_conditional_space_suggests_the_method_then_only_its_genes(shipped, family):
    g = _genome(shipped, family)
    dists = g.distributions()
    assert dists["method"] == CategoricalDistribution(ALL)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        t = study.ask()
        g.suggest(t)
        m = t.params["method"]
        seen.add(m)
        assert set(t.params) == {"method"} | {k for k in dists if k.startswith(f"{m}/")}
        r = g.recipe(t.params)
        assert r.merge_method == m
        one = _one_method(shipped, family, m)
        sub = {k.split("/", 1)[1]: v for k, v in t.params.items() if k != "method"}
        assert r.to_dict() == one.recipe(sub).to_dict()  # the method's ordinary recipe, byte for byte
        assert g.recipe(dict(t.params)).to_dict() == r.to_dict()  # a pure function of the parameters
        study.tell(t, 0.0)
    assert seen == set(ALL)


# ---- the flat encoding -----------------------------------------------------------------------
def test_flat_encoding_is_all_floats_and_argmax_picks(shipped, family):
    g = _genome(shipped, family, encoding="flat")
    dists = g.distributions()
    assert all(isinstance(d, FloatDistribution) for d in dists.values())
    subs = {m: _one_method(shipped, family, m).distributions() for m in ALL}
    assert g.dimension == len(ALL) + sum(len(s) for s in subs.values())
    assert dists["model_stock/filter_wise"] == FloatDistribution(0.0, 1.0)  # a categorical as a float
    p = {k: (d.low + d.high) / 2 for k, d in dists.items()}
    p.update({f"method.{m}": 0.2 for m in ALL})
    p["method.della"] = 0.9
    r = g.recipe(p)
    assert r.merge_method == "della"
    p["method.ties"] = 0.9  # a tie: the first listed wins
    assert g.recipe(p).merge_method == "ties"
    p.update({"method.ties": 0.0, "method.della": 0.0, "method.model_stock": 0.95})
    for x, want in ((0.1, False), (0.49, False), (0.5, True), (1.0, True)):
        p["model_stock/filter_wise"] = x
        assert g.recipe(p).parameters["filter_wise"] is want
    # the same method and genes give the same recipe in either encoding
    c = _genome(shipped, family)
    p["method.model_stock"], p["method.linear"] = 0.0, 1.0
    sub = {k: v for k, v in p.items() if k.startswith("linear/")}
    assert g.recipe(p).to_dict() == c.recipe({"method": "linear", **sub}).to_dict()


# ---- baselines -------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["conditional", "flat"])
def test_baselines_are_every_source_alone_and_every_textbook(shipped, family, encoding):
    g = _genome(shipped, family, encoding=encoding)
    b = g.baselines()
    assert list(b) == ["alone:m0", "alone:m1"] + [f"textbook:{m}" for m in ALL]
    for m in ALL:
        one = _one_method(shipped, family, m)
        assert g.recipe(b[f"textbook:{m}"]).to_dict() == one.recipe(one.baselines()["textbook"]).to_dict(), m
    alone = g.recipe(b["alone:m1"])  # task arithmetic, weight 1 for the source and 0 for the other
    assert alone.merge_method == "task_arithmetic"
    assert [s.parameters["weight"] for s in alone.models] == [0.0, 1.0]
    if encoding == "flat":
        logits = {k: v for k, v in b["textbook:linear"].items() if k.startswith("method.")}
        assert logits["method.linear"] == 0.6 and set(logits.values()) == {0.6, 0.4}
        assert set(b["textbook:linear"]) == set(g.distributions())  # a complete point: CMA-ES starts there
    else:
        assert set(b["textbook:linear"]) == {"method"} | {k for k in g.distributions() if k.startswith("linear/")}


def test_every_methods_recipe_merges_in_one_engine(shipped, family):
    """The session's engine (one set of resident inputs, every method of the genome) takes every baseline."""
    from evomerge.engine.prepared import PreparedMerge

    g = _genome(shipped, family)
    engine = PreparedMerge(g.structure_recipe(), methods=g.methods, progress=False)
    assert set(g.methods) <= set(engine.methods)
    for params in g.baselines().values():
        engine.apply(g.recipe(params))


def test_fingerprint_changes_with_the_space(shipped, family):
    a = _genome(shipped, family).fingerprint()
    assert a == _genome(shipped, family).fingerprint()
    assert a != _genome(shipped, family, encoding="flat").fingerprint()
    assert a != _genome(shipped, family, methods=["ties", "linear"]).fingerprint()


# ---- the search loop, define-by-run -----------------------------------------------------------
class _Timing:
    seconds = 0.001


class _Engine:
    def __init__(self) -> None:
        self.model, self.methods = object(), []

    def apply(self, recipe):
        self.methods.append(recipe.merge_method)
        return _Timing()


@pytest.mark.parametrize("encoding", ["conditional", "flat"])
def test_the_loop_runs_baselines_then_searched_trials(shipped, family, tmp_path, encoding):
    g = _genome(shipped, family, encoding=encoding)
    storage = f"sqlite:///{tmp_path / 's.db'}" if encoding == "conditional" else None  # a trial's subset, stored
    study = optuna.create_study(direction="maximize", storage=storage)
    driver.enqueue_baselines(study, g.baselines())
    engine = _Engine()
    sampler = (lambda start: optuna.samplers.TPESampler(seed=0, multivariate=True, group=True)) \
        if encoding == "conditional" else (lambda start: optuna.samplers.CmaEsSampler(seed=0, x0=start))
    loop = driver.SearchLoop(study, sampler, optuna.pruners.NopPruner(), g, engine, ConstantScorer(), n_trials=17,
                             limit=None, seed=0, fresh_seeds=False, progress=False)
    loop.run()
    trials = study.get_trials()
    assert len(trials) == 17 and all(t.state == TrialState.COMPLETE for t in trials)
    assert engine.methods[:14] == ["task_arithmetic"] * 3 + ALL[1:]  # alone x 2, then every textbook
    for t in trials:
        assert g.recipe(t.params).merge_method == engine.methods[t.number]
        if encoding == "conditional":
            assert set(t.params) == {"method"} | {k for k in g.distributions() if k.startswith(f"{t.params['method']}/")}
        else:
            assert set(t.params) == set(g.distributions())


# ---- warm start (search/warm.py) ----------------------------------------------------------------
def test_warm_start_from_a_one_method_recipe_and_from_an_auto_study(shipped, family, tmp_path):
    from evomerge.search.warm import warm_points

    g = _genome(shipped, family)
    one = _one_method(shipped, family, "ties")
    params = {k: 0.7 for k in one.distributions()}
    r = one.recipe(params)
    path = r.save(tmp_path / "best" / "recipe.yaml")  # e.g. a ties search's winner, same layer groups
    (point,) = warm_points({"recipes": [str(path)]}, g)
    assert point.label == "warm:best/recipe" and point.params["method"] == "ties"
    assert g.recipe(point.params, seed=point.seed).to_dict() == r.to_dict()
    flat = _genome(shipped, family, encoding="flat")
    (fp,) = warm_points({"recipes": [str(path)]}, flat)
    assert flat.recipe(fp.params, seed=fp.seed).to_dict() == r.to_dict()
    other = r.to_dict()
    other["merge_method"] = "karcher"
    import yaml

    (tmp_path / "k.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="'karcher' recipe, and this search's methods are"):
        warm_points({"recipes": [str(tmp_path / "k.yaml")]}, g)
    # an earlier auto study (conditional: each trial holds its own method's genes)
    url = f"sqlite:///{tmp_path / 'first.db'}"
    study = optuna.create_study(study_name="first", direction="maximize", storage=url,
                                sampler=optuna.samplers.RandomSampler(seed=1))
    for i in range(8):
        t = study.ask()
        g.suggest(t)
        study.tell(t, float(i))
    points = warm_points({"study": url, "top": 3, "study_name": "first"}, g)
    best = sorted(study.trials, key=lambda t: t.value, reverse=True)[:3]
    assert [p.params for p in points] == [t.params for t in best]
    for p in points:
        g.recipe(p.params)
