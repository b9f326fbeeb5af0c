"""Seconds per search candidate, split into merge, model forward passes, lm-eval's own work and Optuna.

Usage: python experiments/bench_search.py [--models tiny] [--search ties_math] [--n 20] [--limit 0.5]
       [--eval-dtype float32] [--threads N] [--out results/search_speed.md]

It composes the same Hydra config the app does, builds the session's pieces
(zoo, evaluator, genome, prepared engine, an SQLite study in a temporary run
directory) and runs ``--n`` candidates the way the search loop does (ask,
merge in place, score, tell), timing each part. "Forward" is wall time inside
the model's top-level ``forward`` (a hook), so "lm-eval other" is everything
lm-eval does around it: building requests, tokenising, batching, metrics.
The issue's targets: merge <= 5 % of a candidate on the smol zoo, and
everything outside the merge and the forward passes <= 0.1 s per candidate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the app does (see evomerge/run/app.py)

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny")
    ap.add_argument("--search", default="ties_math")
    ap.add_argument("--tasks", default="math")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--limit", default=None, help="override search.limit")
    ap.add_argument("--eval-dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="append a markdown row to this file")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (e.g. models.base=/m/base)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import optuna

    from evomerge.run.app import _conf_dir, _quiet
    from evomerge.run.session import SearchSession
    from evomerge.search.config import parse_config

    _quiet()
    overrides = [f"+search={args.search}", f"models={args.models}", f"tasks={args.tasks}", f"eval_dtype={args.eval_dtype}",
                 f"batch_size={args.batch_size}", "progress=false"]
    overrides += args.overrides
    if args.limit is not None:
        overrides.append(f"search.limit={args.limit}")
    with initialize_config_dir(config_dir=_conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    raw = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_search_"))
    s = SearchSession(parse_config(raw), run_dir, t0=time.perf_counter())  # type: ignore[arg-type]
    s.multi_objective = False
    t = time.perf_counter()
    s._setup()
    setup_s = time.perf_counter() - t
    s.storage = s.coord.open_storage()
    study = s._open_study()
    t = time.perf_counter()
    engine = s._engine()
    prepare_s = time.perf_counter() - t
    model = engine.model
    fwd = {"s": 0.0, "t": 0.0, "calls": 0}

    def pre(_m, _a):
        fwd["t"] = time.perf_counter()

    def post(_m, _a, _o):
        fwd["s"] += time.perf_counter() - fwd["t"]
        fwd["calls"] += 1

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)
    from evomerge.search.driver import SearchLoop

    s.scorer.score(model, "search", s.spec.limit)  # warm-up: task dicts, first HFLM
    fwd["s"], fwd["calls"] = 0.0, 0
    loop = SearchLoop(study, s.sampler_for, s.pruner, s.genome, engine, s.scorer, n_trials=args.n, limit=s.spec.limit,
                      seed=0, fresh_seeds=False, progress=False)
    stats = loop.run()
    n = len(stats.total_s)
    rows = [{"merge": m, "eval": e, "total": t} for m, e, t in zip(stats.merge_s, stats.eval_s, stats.total_s)]
    forward = fwd["s"] / n
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    med["forward"] = forward
    med["lmeval_other"] = med["eval"] - forward
    med["optuna"] = med["total"] - med["merge"] - med["eval"]
    outside = med["total"] - med["merge"] - med["forward"]
    items = f"limit {s.spec.limit}"
    line = (f"| {args.models} | {args.search} | {args.eval_dtype} | {items} | {torch.get_num_threads()} | "
            f"{med['total']:.3f} | {med['merge']:.3f} ({100 * med['merge'] / med['total']:.1f} %) | {med['forward']:.3f} | "
            f"{med['lmeval_other']:.3f} | {med['optuna']:.3f} | {outside:.3f} |")
    print(f"setup {setup_s:.1f} s (zoo {s.timings.get('zoo_s')}, evaluator {s.timings.get('evaluator_s')}), "
          f"prepare {prepare_s:.1f} s, genes {s.genome.dimension}, forward calls/candidate {fwd['calls'] / n:.1f}, "
          f"candidates {n} (forward time is the mean over them, the other columns medians)")
    print("| models | search | eval dtype | items | threads | total s | merge s | forward s | lm-eval other s | search loop s | outside merge+forward s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(line)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
    optuna.delete_study(study_name=study.study_name, storage=study._storage)  # noqa: SLF001
    return None


if __name__ == "__main__":
    sys.exit(main())
