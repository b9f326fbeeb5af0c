"""``evomerge-export RUN_DIR [--trial N]``: export any trial of a search, any time later."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from evomerge.errors import EvomergeError, user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evomerge-export",
        description="Export a trial of an evomerge search as a mergekit recipe and a merged model directory "
                    "(with a model card stating its search and, when measured, held-out test scores).",
    )
    p.add_argument("run_dir", help="the search's run directory (default runs/<study_name>)")
    p.add_argument("--trial", type=int, default=None, help="trial number (default: the search's winner)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/trials/trial_N)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: the run directory's study.db)")
    p.add_argument("--study", default=None, help="study name (default: the only study in the storage)")
    p.add_argument("--recipe-only", action="store_true", help="write recipe.yaml only, no model directory")
    p.add_argument("--device", default="auto", help="merge device: auto | cpu | cuda (default auto)")
    return p


def _open_storage(run_dir: Path, given: str | None):
    """The run's Optuna storage: --storage, else what its Hydra config says, else RUN_DIR/study.db."""
    if given:
        return given
    from evomerge.search.cluster.manifest import manifest_storage
    from evomerge.search.storage import make_storage

    shared = manifest_storage(run_dir)  # a cluster sweep's shared folder names its storage
    if shared is not None:
        return shared

    cfg: dict = {"kind": "sqlite", "path": "study.db"}
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.is_file():
        import yaml

        cfg = (yaml.safe_load(hydra_cfg.read_text()) or {}).get("storage") or cfg
    rel = Path(cfg.get("path") or "study.db")
    path = rel if rel.is_absolute() else run_dir / rel
    if not path.is_file():
        raise EvomergeError(f"{run_dir} holds no study ({path} is missing); pass the search's run directory, "
                            f"or --storage URL for a study kept elsewhere.")
    return make_storage({**cfg, "heartbeat_interval": None}, run_dir)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with user_errors("evomerge-export"):
        import optuna
        from optuna.trial import TrialState

        from evomerge.export.run import export_trial, genome_from_study
        from evomerge.search import record
        from evomerge.search.winner import candidate

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        run_dir = Path(args.run_dir)
        url = _open_storage(run_dir, args.storage)
        names = [s.study_name for s in optuna.get_all_study_summaries(url)]
        from evomerge.search.cluster.manifest import manifest_study

        name = args.study or manifest_study(run_dir) or (names[0] if len(names) == 1 else None)
        if name is None or name not in names:
            raise EvomergeError(f"pick a study with --study: the storage holds {', '.join(names) or 'none'}.")
        study = optuna.load_study(study_name=name, storage=url)
        genome = genome_from_study(study)
        number = args.trial if args.trial is not None else record.winner_of(study)
        if number is None:
            raise EvomergeError(f"study {name!r} has no winner yet; name a trial with --trial N.")
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        if number not in trials:
            raise EvomergeError(f"study {name!r} has no trial {number} (trials 0 to {max(trials, default=-1)}).")
        trial = trials[number]
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            raise EvomergeError(f"trial {number} is {trial.state.name}; export a COMPLETE (or PRUNED) trial.")
        chosen = candidate(trial, genome.seed).take(record.final_scores(study).get(number))
        info = record.manifest_of(study)
        out = Path(args.out) if args.out else run_dir / "trials" / f"trial_{number}"
        export_trial(genome, trial, out, scores=chosen.as_dict(),
                     title=f"evomerge {info.search.get('name', name)}: {chosen.label}",
                     search_limit=info.limit, model=not args.recipe_only, device=args.device)
        print(f"wrote {out / 'recipe.yaml'}" + ("" if args.recipe_only else f" and {out / 'model'}"))
        if chosen.test is None:
            print("note: this trial was not scored on the held-out test split; its card states the search score only.")


if __name__ == "__main__":
    main()
