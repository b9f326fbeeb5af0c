"""The config schemas (evomerge/search/config.py): every shipped config passes, a bad value is refused naming its key.

Each config group option is composed with Hydra's compose API exactly as the app composes it, so a key that
a shipped YAML file spells wrongly, or a schema that forgot a shipped value, fails here in a second.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from evomerge.errors import ConfigError
from evomerge.search.config import CONF_DIR, RunConfig, compose_search, parse_config
from evomerge.search.dataflow import DataflowSpec

GROUPS = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml") if not p.stem.startswith("_"))
          for g in ("models", "tasks", "sampler", "storage", "search")}


def _compose(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    return raw


@pytest.fixture(scope="module")
def own_models(tmp_path_factory) -> list[str]:
    """models=user_example with directories that exist (the schema checks each holds config.json)."""
    root = tmp_path_factory.mktemp("models")
    for name in ("base", "math", "code"):
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
    return [f"models.base={root / 'base'}", f"models.specialists={{math: {root / 'math'}, code: {root / 'code'}}}"]


def _overrides_for(group: str, option: str, own_models: list[str]) -> list[str]:
    over = [f"+search={option}" if group == "search" else f"{group}={option}"]
    if group != "search":
        over.append("+search=ties_math")
    if group == "models" and option == "user_example":
        over += own_models
    if group == "tasks" and option == "user_example":
        over.append("tasks.tasks={my_task: {acc: 1.0}}")
    return over


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_shipped_config_passes_its_schema(group, option, own_models):
    config = parse_config(_compose(*_overrides_for(group, option, own_models)))
    assert isinstance(config, RunConfig)
    if group == "storage":
        assert config.storage.kind == option
    elif group != "search":
        assert getattr(config, group).name == option
    assert config.final.top_k >= 1 and config.batch_size >= 1 and config.cluster.poll_s > 0


def test_the_search_configs_share_their_base_files():
    """Each search names its base in a defaults list; composed alone it still holds every shared key."""
    shared = {"sources", "n_trials", "limit", "pruning"}
    merge = shared | {"layers_per_group", "interpolate", "modules", "edges", "random_mode"}
    for name in GROUPS["search"]:
        defaults = OmegaConf.load(CONF_DIR / "search" / f"{name}.yaml").get("defaults") or []
        assert {"_base", "_merge"} & set(defaults), name
        keys = set(compose_search(name, "search"))
        assert (shared <= keys) if name == "dataflow_math" else (merge <= keys), name
    assert not set(compose_search("dataflow_math", "search")) & (merge - shared)  # what dataflow does not take
    config = parse_config(_compose("+search=slerp_pair", "search.n_trials=7", "search.pruning.enabled=false"))
    assert config.search.n_trials == 7 and not config.search.pruning.enabled and config.search.sources == ["add", "sub"]
    assert isinstance(parse_config(_compose("+search=dataflow_math")).search, DataflowSpec)
    with pytest.raises(ConfigError, match="no search config"):
        compose_search("_base", "search.parameter_space.search")  # a base file is not a search


@pytest.mark.parametrize("override,key", [
    ("models.base=/no/such/dir", "models.base"),
    ("models.zoo=huge", "models.zoo"),
    ("+models.task_dirs=[/no/such/tasks]", "models.task_dirs[0]"),
    ("models.tokenizer=/no/such/tok", "models.tokenizer"),
    ("tasks.objectives=both", "tasks.objectives"),
    ("sampler.name=annealing", "sampler.name"),
    ("sampler.start=corner", "sampler.start"),
    ("storage.kind=redis", "storage.kind"),
    ("storage.heartbeat_interval=-1", "storage.heartbeat_interval"),
    ("search.n_trials=0", "search.n_trials"),
    ("search.limit=1.0", "search.limit"),  # one item per task, not every item
    ("search.limit=0", "search.limit"),
    ("search.edges=mine", "search.edges"),
    ("final.top_k=0", "final.top_k"),
    ("final.margin_se=-1", "final.margin_se"),
    ("final.export_model=maybe", "final.export_model"),
    ("cluster.poll_s=0", "cluster.poll_s"),
    ("eval_dtype=int8", "eval_dtype"),
    ("batch_size=auto", "batch_size"),
    ("memory=gpu", "memory"),
    ("evaluator=vllm", "evaluator"),
    ("max_gen_toks=0", "max_gen_toks"),
    ("progress=sometimes", "progress"),
    ("~seed", "seed"),
    ("warm_start={top: 3}", "warm_start"),
])
def test_a_bad_value_is_refused_naming_its_key(override, key):
    with pytest.raises(ConfigError) as err:
        parse_config(_compose("+search=ties_math", override))
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message, message


def test_no_search_and_a_method_without_its_base_are_refused(own_models, tmp_path):
    with pytest.raises(ConfigError, match="no search selected"):
        parse_config(_compose())
    specialists = [o for o in own_models if o.startswith("models.specialists")]
    with pytest.raises(ConfigError, match=r"search.method 'ties' needs a base model .* models.base="):
        parse_config(_compose("+search=ties_math", "models=user_example", "models.base=null", *specialists))
    config = parse_config(_compose("+search=slerp_pair", "models=user_example", "models.base=null", *specialists,
                                   "search.sources=[math, code]"))
    assert config.models.base is None and Path(config.models.specialists["math"]).is_absolute()
