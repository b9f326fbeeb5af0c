"""Where the search items go: plain subsampling against looks in steps and fresh samples, at one item budget.

Each variant is an ordinary `evomerge` search (a subprocess, resumable) that spends about the same number
of evaluated search items as the plain run: a run that saves items per trial (pruning) gets more trials.
The budget is met in two passes: the first pass runs the plain run's trial count, then the study is resumed
with as many more trials as the items it has left buy at the rate it spent (rerunning with a larger
`search.n_trials` resumes a study). Every run has select items, so the winner is chosen on items the search
never scored and each gap (search sample, select, test) is measured.

    python experiments/fidelity.py --zoo tiny --seeds 0 1 2         # every variant, then the table
    python experiments/fidelity.py --zoo tiny --table               # rebuild results/fidelity_tiny.md only
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from study import write_keeping_notes  # noqa: E402

SEARCH = ["+search=ties_math", "tasks.select=100", "final.score_cache=null", "final.export_model=false",
          "progress=false"]
VARIANTS = {  # name -> (overrides, what it is)
    "plain": (["search.pruning.enabled=false"], "every trial scores the same first `limit` items"),
    "first_look": ([], "the default: a first look at a quarter, the top 75 % go on"),
    "halving": (["search.pruning.first_look=[0.125,0.25,0.5]", "search.pruning.keep=50"],
                "successive halving: looks at 1/8, 1/4, 1/2, the top half goes on at each"),
    "fresh": (["search.pruning.enabled=false", "search.fresh_items=10"],
              "no pruning, a fresh sample of the search split every 10 trials"),
    "halving_fresh": (["search.pruning.first_look=[0.125,0.25,0.5]", "search.pruning.keep=50",
                       "search.fresh_items=10"], "successive halving over fresh samples"),
    "fresh_paired": (["search.pruning.enabled=false", "search.fresh_items=10", "search.estimator=paired"],
                     "fresh samples, each score a paired estimate against the textbook recipe's per-item results"),
    "halving_fresh_paired": (["search.pruning.first_look=[0.125,0.25,0.5]", "search.pruning.keep=50",
                              "search.fresh_items=10", "search.estimator=paired"],
                             "successive halving over fresh samples, paired estimates"),
    "fresh_irt": (["search.pruning.enabled=false", "search.fresh_items=10", "search.estimator=irt"],
                  "fresh samples, each score a Rasch-model (p-IRT) estimate from the baselines' per-item results"),
    "halving_fresh_irt": (["search.pruning.first_look=[0.125,0.25,0.5]", "search.pruning.keep=50",
                           "search.fresh_items=10", "search.estimator=irt"],
                          "successive halving over fresh samples, p-IRT estimates"),
}


def run(out: Path, overrides: list[str], seed: int, trials: int) -> float:
    cmd = [sys.executable, "-m", "evomerge.run.app", *SEARCH, *overrides, f"seed={seed}",
           f"search.n_trials={trials}", f"study_name=fidelity-{out.parent.name}-{out.name}", f"hydra.run.dir={out}"]
    print("$", " ".join(cmd[3:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def spent(run_dir: Path) -> tuple[int, int, int]:
    """(search items scored, trials finished, baselines) of a run's study. The items an estimator scored once
    per study count too: the paired reference's, and every baseline's for the item calibration."""
    import optuna

    from evomerge.search import record

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{run_dir / 'study.db'}")
    recs = [record.TrialRecord.of(t) for t in study.get_trials(deepcopy=False)]
    done = [r for r in recs if r.items is not None]
    ref, cal = record.reference_of(study), record.calibration_of(study)
    every = lambda per_task: sum(len(next(iter(ms.values()))) for ms in per_task.values())  # noqa: E731
    extra = every(ref.items) if ref else len(cal.labels) * every(cal.difficulty) if cal else 0
    return sum(r.items for r in done) + extra, len(done), sum(r.baseline is not None for r in done)


def run_variant(runs: Path, name: str, seed: int, trials: int) -> None:
    out = runs / name / f"s{seed}"
    overrides = VARIANTS[name][0]
    seconds = run(out, overrides, seed, trials)
    if name != "plain":
        budget, _, _ = spent(runs / "plain" / f"s{seed}")
        items, n, _ = spent(out)
        per_trial = items / n  # what a trial of this variant cost, baselines included
        more = max(0, math.floor((budget - items) / per_trial))
        if more:
            seconds += run(out, overrides, seed, n + more)
    (out / "wall_s.txt").write_text(f"{seconds:.1f}\n")


def _row(run_dir: Path) -> dict | None:
    f = run_dir / "summary.json"
    if not f.is_file():
        return None
    s = json.loads(f.read_text())
    items, n, _ = spent(run_dir)
    w = s["best"]
    searched = [t for t in s["top"] if t.get("baseline") is None]
    best = max(searched, key=lambda t: t["select_fitness"], default=None)
    wall = run_dir / "wall_s.txt"
    return {"items": items, "trials": n, "label": w["label"], "search": w["search_fitness"],
            "search_full": w["search_full_fitness"], "select": w["select_fitness"], "test": w["test_fitness"],
            "best_searched_test": None if best is None else best["test_fitness"],
            "baseline_test": s["best_baseline"]["test_fitness"] if s.get("best_baseline") else None,
            "wall": float(wall.read_text()) if wall.is_file() else None}


def _ms(xs: list[float], digits: int = 3) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def table(runs: Path, zoo: str, out: Path) -> str:
    lines = [f"# Where the search items go, {zoo} zoo: plain subsampling against looks in steps and fresh samples",
             "", f"Generated by `python experiments/fidelity.py --zoo {zoo} --seeds 0 1 2` (this table: `--table`). "
             f"Every run: `evomerge {' '.join(SEARCH[:2])}` (per-layer TIES, CMA-ES, `limit` 0.5 of the 200 "
             "search items left per task after 100 select items), seeds as listed; each variant spends about the "
             "plain run's number of evaluated search items (60 trials). The winner is chosen on the select items; "
             "test is reported only. Gaps are the winner's: search sample minus test, select minus test. "
             "Mean ± standard deviation over seeds.", "",
             "| variant | what | seeds | search items | trials | winner test | best searched test | "
             "winner search − test | winner select − test | searched winners | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    earlier = out / f"fidelity_{zoo}.json"
    kept = json.loads(earlier.read_text()) if earlier.is_file() else {}
    data = {}
    for name, (_, what) in VARIANTS.items():
        rows = [r for r in (_row(d) for d in sorted((runs / name).glob("s*"))) if r] or kept.get(name)
        if not rows:  # a variant not run this time keeps its rows from the last table's JSON
            continue
        data[name] = rows
        lines.append(
            f"| {name} | {what} | {len(rows)} | {_ms([r['items'] for r in rows], 0)} | {_ms([r['trials'] for r in rows], 0)} "
            f"| {_ms([r['test'] for r in rows])} | {_ms([r['best_searched_test'] for r in rows])} "
            f"| {_ms([r['search'] - r['test'] for r in rows])} | {_ms([r['select'] - r['test'] for r in rows])} "
            f"| {sum(not r['label'].startswith(('alone', 'textbook')) for r in rows)} of {len(rows)} "
            f"| {_ms([r['wall'] for r in rows], 0)} |")
    base = [r["baseline_test"] for rows in data.values() for r in rows if r["baseline_test"] is not None]
    if base:
        lines += ["", f"Best baseline chosen on select (test): {_ms(base[:1])} (the same recipes in every run)."]
    text = "\n".join(lines) + "\n"
    (out / f"fidelity_{zoo}.json").write_text(json.dumps(data, indent=1))
    return write_keeping_notes(out / f"fidelity_{zoo}.md", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", choices=["tiny"], default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--trials", type=int, default=60, help="the plain run's trials: the item budget of every variant")
    ap.add_argument("--table", action="store_true", help="only rebuild the table")
    ap.add_argument("--runs", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    runs = args.runs or ROOT / "runs" / f"fidelity-{args.zoo}"
    if not args.table:
        for seed in args.seeds:
            for name in ["plain", *[v for v in args.variants if v != "plain"]]:
                run_variant(runs, name, seed, args.trials)
    print(table(runs, args.zoo, args.out))


if __name__ == "__main__":
    main()
