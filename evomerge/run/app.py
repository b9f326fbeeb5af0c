"""``evomerge``: the Hydra app that runs a merge search end to end.

Order matters and is deliberate: every check that needs no model (the search
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

from evomerge.errors import ConfigError, EvomergeError, user_errors
from evomerge.run.secrets import mask, mask_log_records, scrub_hydra_files, url_secrets


def _conf_dir() -> str:
    """The configs live in the package (so wheels carry them); the repository's conf/ links there."""
    return str(Path(__file__).resolve().parents[1] / "conf")


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

    from evomerge.search.fitness import parse_tasks
    from evomerge.search.models import check_models
    from evomerge.search.samplers import check_sampler
    from evomerge.search.spec import parse_search
    from evomerge.run.session import SearchSession

    t0 = time.perf_counter()
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    if not raw.get("search"):
        parse_search(None)  # raises the "no search selected" error
    from evomerge.search.dataflow import is_dataflow, parse_dataflow  # layer stacking: its own search keys

    spec = parse_dataflow(raw["search"]) if is_dataflow(raw["search"]) else parse_search(raw["search"])
    tasks = parse_tasks(raw.get("tasks"))
    sampler = check_sampler(raw.get("sampler") or {})
    models = raw.get("models") or {}
    check_models(models)
    from evomerge.methods import get_method

    if get_method(spec.method).needs_base and spec.base_model is None and not models.get("base") and not models.get("zoo"):
        raise ConfigError(
            f"search.method {spec.method!r} needs a base model (the model the specialists were fine-tuned from), and "
            f"models group {models.get('name')!r} names none: set models.base=/path/to/base, or pick a method "
            f"without a base (e.g. +search=slerp_pair)."
        )
    _check_globals(raw)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from evomerge.run.cluster import ClusterSession, is_cluster

    session_cls = ClusterSession if is_cluster(raw) else SearchSession  # a worker of a shared study (docs/cluster.md)
    session = session_cls(raw, run_dir, tasks, multi_objective=sampler == "nsga2", t0=t0)
    return session.run()


def _check_globals(raw: dict[str, Any]) -> None:
    if raw.get("eval_dtype") not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"eval_dtype = {raw.get('eval_dtype')!r}: use float32, bfloat16 or float16.")
    bs = raw.get("batch_size")
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise ConfigError(f"batch_size = {bs!r}: a whole number >= 1 (a fixed size; 'auto' costs minutes per model on CPU).")
    final = raw.get("final") or {}
    if not isinstance(final.get("top_k", 3), int) or final.get("top_k", 3) < 1:
        raise ConfigError(f"final.top_k = {final.get('top_k')!r}: how many best candidates to re-score, >= 1.")


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
