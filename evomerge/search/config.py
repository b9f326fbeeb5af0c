"""The composed config, read once: one typed, frozen schema per config group, checked before any work.

Why one place: the app hands the composed Hydra config to :func:`parse_config` and every later reader
gets typed values (a :class:`RunConfig`), so a key is checked once, where its error names it
(``models.base``, ``final.top_k``), and never again halfway through a search. Defaults live in the
YAML (``conf/``); where a parser here still fills one, the comment says which caller needs it.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

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
