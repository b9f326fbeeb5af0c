"""``evomerge``: the Hydra app that runs a merge search end to end.

Order matters and is deliberate: every check that needs no model (each config
group, read once into typed values by evomerge/search/config.py: the search
genome, task weights, sampler, storage, model paths) runs first, so a bad
config fails in a second; then the zoo is built (first use only), the
evaluator is built (an unknown task fails here, before any model is loaded);
then the checks that need the tasks' data, the tokenizers and the genome
(evomerge/search/preflight.py: splits, metrics, tokenizer, sampler options,
budget) run before a study exists; then models are loaded once and the study runs.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from evomerge.errors import EvomergeError, user_errors
from evomerge.run.secrets import mask, mask_log_records, scrub_hydra_files, url_secrets


def _conf_dir() -> str:
    """The configs live in the package (so wheels carry them); the repository's conf/ links there."""
    from evomerge.search.config import CONF_DIR

    return str(CONF_DIR)


def _sigterm_as_interrupt() -> None:
    """A scheduler's SIGTERM (preemption, timeout) stops as cleanly as Ctrl-C."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


def _quiet() -> None:
    import logging
    import warnings

    import optuna

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*Fixed parameter.*out of range.*")
    for name in ("transformers", "datasets", "accelerate", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the search ``cfg`` describes; return the summary written to summary.json."""
    from hydra.core.hydra_config import HydraConfig

    from evomerge.run.cluster import Shared, is_cluster
    from evomerge.run.session import SearchSession
    from evomerge.search.config import parse_config

    t0 = time.perf_counter()
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    config = parse_config(raw)  # every group checked once, typed; nothing loaded yet
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    coord = Shared(config, run_dir) if is_cluster(raw) else None  # a worker of a shared study (docs/cluster.md)
    return SearchSession(config, run_dir, t0=t0, coord=coord).run()


@hydra.main(version_base="1.3", config_path=_conf_dir(), config_name="config")
def _app(cfg: DictConfig) -> None:
    _quiet()
    _sigterm_as_interrupt()
    secrets = _scrub_secrets(cfg)
    with user_errors("evomerge"):
        try:
            summary = run(cfg)
        except EvomergeError:
            _drop_empty_run_dir()
            raise
        except KeyboardInterrupt:
            print("\nevomerge: interrupted before the outputs were written; rerun the same command to "
                  "resume and finish.", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as exc:  # an unexpected error: shown as Hydra would, but never with a password
            if not secrets:
                raise
            import traceback

            print(mask("".join(traceback.format_exception(exc)), secrets), file=sys.stderr)
            raise SystemExit(1) from None
    if summary.get("interrupted"):
        raise SystemExit(130)  # outputs are written, but the budget is not spent: tell scripts so


def _drop_empty_run_dir() -> None:
    """A config error leaves no run directory behind unless the study already lives there."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001
        return
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix in (".log", ".session") for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent
        if parent.name in ("runs", "multirun") and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def _scrub_secrets(cfg: DictConfig) -> list[str]:
    """A password given in ``storage.url`` is masked in the run folder's Hydra records (written before this
    code runs) and in what the process shows; returns it, for masking errors."""
    from hydra.core.hydra_config import HydraConfig

    secrets = url_secrets({"storage": OmegaConf.to_container(cfg.get("storage") or {}, resolve=False)})
    if secrets:
        from hydra.types import RunMode

        hc = HydraConfig.get()
        sweep = Path(str(hc.sweep.dir)) if hc.mode == RunMode.MULTIRUN else None
        scrub_hydra_files(Path(hc.runtime.output_dir), secrets, sweep)
        print("evomerge: warning: storage.url holds a password; it is masked in the run folder, but the shell "
              "history and the process list still show it. Use ~/.pgpass, PGPASSWORD or $EVOMERGE_STORAGE_URL.",
              file=sys.stderr)
    return secrets


def main() -> None:
    """Console entry point (``evomerge``)."""
    mask_log_records()
    _app()


if __name__ == "__main__":
    main()
