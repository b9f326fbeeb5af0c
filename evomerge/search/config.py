"""The composed config, read once: one typed, frozen schema per config group, checked before any work.

Why one place: the app hands the composed Hydra config to :func:`parse_config` and every later reader
gets typed values (a :class:`RunConfig`), so a key is checked once, where its error names it
(``models.base``, ``final.top_k``), and never again halfway through a search. Defaults live in the
YAML (``conf/``); where a parser here still fills one, the comment says which caller needs it.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    from evomerge.search.fitness import TaskSpec

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_search(name: str, where: str) -> dict[str, Any]:
    """``conf/search/NAME.yaml`` composed as ``+search=NAME`` composes it (its defaults list, ``_base`` /
    ``_merge``, included), its interpolations unresolved: the caller resolves them against the run's config.

    Why Hydra's compose and not a plain YAML load: a search config holds only what differs from the base
    files its defaults list names; loaded alone it would lack sources, n_trials, pruning, ... Inside the app
    Hydra is initialised (with any --config-dir the user added); a library caller gets the package's conf/.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    ready = GlobalHydra.instance().is_initialized()
    with nullcontext() if ready else initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        options = sorted(o for o in GlobalHydra.instance().config_loader().get_group_options("search")
                         if not o.startswith("_"))
        if name not in options:
            raise ConfigError(f"{where} = {name!r}: no search config conf/search/{name}.yaml; name one of "
                              f"{', '.join(options)}.")
        composed = compose(config_name=f"search/{name}")
    search = OmegaConf.to_container(composed.search, resolve=False)
    assert isinstance(search, dict)
    return search


# ---- the schemas ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelsConfig:
    """The ``models`` group, its directories checked (each exists and holds config.json) and made absolute.
    ``sets``, ``layers_per_group`` and ``limit`` are read by the search configs' interpolations, not here."""

    name: str
    zoo: str | None                  # an embedded zoo (tiny, smol), built on first use; None: directories only
    base: str | None                 # None: the zoo's base
    specialists: dict[str, str]      # name -> directory, added to (or replacing) the zoo's
    task_dirs: tuple[str, ...]
    tokenizer: str | None            # None: the base's tokenizer


@dataclass(frozen=True)
class SamplerConfig:
    """The ``sampler`` group: an Optuna sampler, its keyword options and (CMA-ES) its start point."""

    name: str
    options: dict[str, Any]
    start: str                       # best_baseline | center


@dataclass(frozen=True)
class StorageConfig:
    """The ``storage`` group. The storage layer (search/storage.py) reads it as a mapping, the form in which
    it also reads a cluster's manifest and an earlier run's ``.hydra/config.yaml``: :meth:`mapping`."""

    kind: str                        # sqlite | journal | postgres
    path: str | None                 # a file storage's file, relative to the run directory
    url: str | None                  # postgres: None means $EVOMERGE_STORAGE_URL
    heartbeat_interval: int | None   # seconds; None: no heartbeats (cluster workers: cluster.heartbeat_interval)
    grace_period: int | None

    def mapping(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("heartbeat_interval", "grace_period")}


@dataclass(frozen=True)
class FinalConfig:
    """``final``: the end of the search (re-scoring the best on held-out items, the export)."""

    top_k: int
    rescore_search: bool
    margin_se: float
    export_model: bool
    score_cache: str | None          # auto | a directory | None (off)


@dataclass(frozen=True)
class ClusterConfig:
    """``cluster``: what workers of a shared study use (docs/cluster.md)."""

    dir: str | None
    poll_s: float
    heartbeat_interval: int | None
    grace_period: int | None


@dataclass(frozen=True)
class RunConfig:
    """The whole composed config, typed: what :func:`parse_config` returns and a search session reads."""

    study_name: str
    seed: int
    device: str
    memory: str
    device_map: Any                  # None | auto | {module: device}
    max_memory: dict[Any, Any] | None
    eval_dtype: str
    batch_size: int
    max_gen_toks: int | None
    evaluator: str
    progress: bool
    trust_remote_code: bool
    warm_start: dict[str, Any] | None  # checked by search/warm.py's parse_warm
    worker: int | str | None
    models: ModelsConfig
    tasks: TaskSpec
    sampler: SamplerConfig
    storage: StorageConfig
    search: Any                      # SearchSpec, or DataflowSpec for ``space: dataflow``
    cluster: ClusterConfig
    final: FinalConfig
    raw: dict[str, Any] = field(repr=False)  # the composed config as plain data: what the study records of it
                                             # (its search keys) and what a nested search derives its own from

    @property
    def multi_objective(self) -> bool:
        return self.sampler.name == "nsga2"


# ---- reading the composed config -----------------------------------------------------------------
EVAL_DTYPES = ("float32", "bfloat16", "float16")
START_POINTS = ("best_baseline", "center")


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """Check the composed config (resolved, as plain data) group by group and return it typed.

    Every check here needs no model, no task data and no study, so a mistake costs a second; the checks that
    need the models' files, the tasks' data or the genome run later, still before any study exists
    (search/preflight.py). Each problem is a ConfigError naming the key, the value and the fix."""
    from evomerge.search.fitness import parse_tasks
    from evomerge.search.warm import parse_warm

    from evomerge.search.method_space import is_auto, resolve_encoding

    if is_auto(raw.get("search")):  # the method-gene search: its encoding follows the sampler (search/method_space.py)
        resolve_encoding(raw, str((raw.get("sampler") or {}).get("name")))
    search = _search(raw.get("search"))
    models = parse_models(_group(raw, "models"))
    _needs_base(search, models)
    final, cluster = _group(raw, "final"), _group(raw, "cluster")
    return RunConfig(
        study_name=str(_top(raw, "study_name")), seed=_int(_top(raw, "seed"), "seed"),
        device=_str(_top(raw, "device"), "device", "auto, cpu, cuda or cuda:N"),
        memory=_choice(_top(raw, "memory"), "memory", _memory_modes()),
        device_map=_top(raw, "device_map"), max_memory=_top(raw, "max_memory"),
        eval_dtype=_choice(_top(raw, "eval_dtype"), "eval_dtype", EVAL_DTYPES),
        batch_size=_batch_size(_top(raw, "batch_size")),
        max_gen_toks=_optional_count(_top(raw, "max_gen_toks"), "max_gen_toks"),
        evaluator=_evaluator(_top(raw, "evaluator")),
        progress=_flag(_top(raw, "progress"), "progress"),
        trust_remote_code=_flag(_top(raw, "trust_remote_code"), "trust_remote_code"),
        warm_start=parse_warm(_top(raw, "warm_start")), worker=_top(raw, "worker"),
        models=models, tasks=parse_tasks(_group(raw, "tasks")), sampler=parse_sampler(_group(raw, "sampler")),
        storage=parse_storage(_group(raw, "storage")), search=search,
        cluster=ClusterConfig(
            dir=_top(cluster, "dir", "cluster"), poll_s=_positive(_top(cluster, "poll_s", "cluster"), "cluster.poll_s",
                                                                  "seconds between looks for work"),
            heartbeat_interval=_seconds(_top(cluster, "heartbeat_interval", "cluster"), "cluster.heartbeat_interval"),
            grace_period=_seconds(_top(cluster, "grace_period", "cluster"), "cluster.grace_period")),
        final=FinalConfig(
            top_k=_top_k(_top(final, "top_k", "final")),
            rescore_search=_flag(_top(final, "rescore_search", "final"), "final.rescore_search"),
            margin_se=_margin(_top(final, "margin_se", "final")),
            export_model=_flag(_top(final, "export_model", "final"), "final.export_model"),
            score_cache=_top(final, "score_cache", "final")),
        raw=raw,
    )


def parse_models(cfg: dict[str, Any]) -> ModelsConfig:
    """The ``models`` group: every directory it names exists (before any zoo is built or model loaded).
    Keys a models file of the user's own leaves out mean what null means (no base, no extra directories)."""
    zoo = cfg.get("zoo")
    if zoo:
        from evomerge.zoo.build import ZOO_NAMES

        if zoo not in ZOO_NAMES:
            raise ConfigError(f"models.zoo = {zoo!r} is not an embedded zoo; use one of {', '.join(ZOO_NAMES)}, "
                              f"or null with your own directories under models.base / models.specialists.")
    base = None if cfg.get("base") is None else model_dir(cfg["base"], "models.base")
    specs = cfg.get("specialists") or {}
    if not isinstance(specs, dict):
        raise ConfigError("models.specialists must map names to model directories, e.g. {math: /models/math-ft}.")
    specialists = {str(k): model_dir(v, f"models.specialists.{k}") for k, v in specs.items()}
    if not zoo and not specialists:
        raise ConfigError("models.specialists is empty and models.zoo is null: list your fine-tuned models "
                          "(`specialists: {name: /path}`) or use an embedded zoo (`models=tiny`).")
    task_dirs = []
    for i, d in enumerate(cfg.get("task_dirs") or []):
        p = Path(str(d)).expanduser()
        if not p.is_dir():
            raise ConfigError(f"models.task_dirs[{i}]: task directory {d!r} does not exist; fix the path or remove it.")
        task_dirs.append(str(p.resolve()))
    tok = cfg.get("tokenizer")
    return ModelsConfig(name=str(cfg.get("name") or zoo or "models"), zoo=zoo or None, base=base,
                        specialists=specialists, task_dirs=tuple(task_dirs),
                        tokenizer=None if tok is None else model_dir(tok, "models.tokenizer"))


def model_dir(path: Any, key: str) -> str:
    """``path`` as an absolute model directory, or a ConfigError naming ``key``."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key} must be a path to a model directory, got {path!r}.")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{key}: model directory {str(p)!r} does not exist. Fix the path (override it with "
                          f"`{key}=/path/to/model`) or pick another models group (e.g. `models=tiny`).")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{key}: {str(p)!r} has no config.json, so it is not a Hugging Face model directory; "
                          f"point {key} at the folder holding config.json and the safetensors files.")
    return str(p.resolve())


def parse_sampler(cfg: dict[str, Any]) -> SamplerConfig:
    """The ``sampler`` group. Only cmaes.yaml sets ``start`` (no other sampler has a start point); a CMA-ES
    file of the user's own that leaves it out starts where CMA-ES's own files do, at the best baseline."""
    from evomerge.search.samplers import SAMPLERS

    name = cfg.get("name")
    if name not in SAMPLERS:
        raise ConfigError(f"sampler.name = {name!r} is unknown; pick one with `sampler=NAME`, NAME in {', '.join(SAMPLERS)}.")
    opts = cfg.get("options") or {}
    if not isinstance(opts, dict):
        raise ConfigError("sampler.options must be a mapping of keyword arguments for the Optuna sampler.")
    start = cfg.get("start", "best_baseline")
    if start not in START_POINTS:
        raise ConfigError(f"sampler.start = {start!r}: use best_baseline (CMA-ES starts at the best "
                          f"baseline's genes) or center (the middle of the bounds).")
    return SamplerConfig(name=str(name), options=dict(opts), start=start)


def parse_storage(cfg: dict[str, Any]) -> StorageConfig:
    """The ``storage`` group (or a storage mapping read from a file: a manifest, an earlier run's config)."""
    from evomerge.search.storage import STORAGE_KINDS

    kind = cfg.get("kind")
    if kind not in STORAGE_KINDS:
        raise ConfigError(f"storage.kind = {kind!r} is not supported; use one of {', '.join(sorted(STORAGE_KINDS))} "
                          f"(e.g. `storage=sqlite`).")
    for key in ("path", "url"):
        if cfg.get(key) is not None and (not isinstance(cfg[key], str) or not cfg[key]):
            raise ConfigError(f"storage.{key} = {cfg[key]!r}: a string, or null.")
    return StorageConfig(kind=kind, path=cfg.get("path"), url=cfg.get("url"),
                         heartbeat_interval=_seconds(cfg.get("heartbeat_interval"), "storage.heartbeat_interval"),
                         grace_period=_seconds(cfg.get("grace_period"), "storage.grace_period"))


def _search(cfg: dict[str, Any] | None) -> Any:
    from evomerge.search.dataflow import is_dataflow, parse_dataflow  # layer stacking: its own search keys
    from evomerge.search.method_space import is_auto, parse_auto  # the method is a gene: its own search keys
    from evomerge.search.spec import parse_search

    if is_auto(cfg):
        return parse_auto(cfg)  # type: ignore[arg-type]
    return parse_dataflow(cfg) if is_dataflow(cfg) else parse_search(cfg)  # type: ignore[arg-type]


def _needs_base(search: Any, models: ModelsConfig) -> None:
    from evomerge.methods import get_method
    from evomerge.search.method_space import AutoSpec

    needs_base = isinstance(search, AutoSpec) or get_method(search.method).needs_base  # auto: task vectors resident
    if needs_base and search.base_model is None and not models.base and not models.zoo:
        raise ConfigError(
            f"search.method {search.method!r} needs a base model (the model the specialists were fine-tuned from), and "
            f"models group {models.name!r} names none: set models.base=/path/to/base, or pick a method "
            f"without a base (e.g. +search=slerp_pair)."
        )


def _group(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"{name} = {value!r}: the {name} config group is missing or not a mapping; pick one with "
                          f"`{name}=NAME` (see `evomerge --help`).")
    return value


def _top(cfg: dict[str, Any], key: str, group: str = "") -> Any:
    """A key that the shipped file sets (conf/config.yaml for the top level, cluster and final)."""
    if key not in cfg:
        name = f"{group}.{key}" if group else key
        raise ConfigError(f"{name} is missing from the config; conf/config.yaml sets it (was it deleted with "
                          f"`~{name}`?): give it a value, e.g. `+{name}=...`.")
    return cfg[key]


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: true or false.")
    return value


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} = {value!r}: a whole number.")
    return value


def _str(value: Any, key: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} = {value!r}: one of {what}.")
    return value


def _choice(value: Any, key: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(f"{key} = {value!r}: use {', '.join(options[:-1])} or {options[-1]}.")
    return str(value)


def _memory_modes() -> tuple[str, ...]:
    from evomerge.engine.prepared import MEMORY_MODES

    return tuple(MEMORY_MODES)


def _batch_size(bs: Any) -> int:
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise ConfigError(f"batch_size = {bs!r}: a whole number >= 1 (a fixed size; 'auto' costs minutes per model on CPU).")
    return bs


def _optional_count(value: Any, key: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{key} = {value!r}: a whole number >= 1, or null.")
    return value


def _evaluator(value: Any) -> str:
    from evomerge.evaluation.evaluator import BACKENDS

    if value not in BACKENDS:
        raise ConfigError(f"evaluator = {value!r}: use fast (evomerge's FastLM) or hflm (lm-eval's HFLM, the "
                          f"reference FastLM is tested against).")
    return str(value)


def _positive(value: Any, key: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key} = {value!r}: {what}, > 0.")
    return float(value)


def _seconds(value: Any, key: str) -> int | None:
    """A heartbeat setting: null (none, or the cluster's), or whole seconds > 0 (Optuna takes ints)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or value != int(value):
        raise ConfigError(f"{key} = {value!r}: whole seconds > 0, or null.")
    return int(value)


def _top_k(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"final.top_k = {value!r}: how many best candidates to re-score, >= 1.")
    return value


def _margin(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"final.margin_se = {value!r}: standard errors a searched recipe must beat the best "
                          f"baseline by, a number >= 0.")
    return float(value)
