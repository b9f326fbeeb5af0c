"""The data-flow search, one row per sampler (and PS-then-DFS): does a searched layer stack beat the sources?

    python experiments/dataflow_study.py                                  # tiny zoo, every row, seed 0
    python experiments/dataflow_study.py --zoo smol --seeds 0 1 2         # the smol zoo's rows (tpe, tpe-r1, tpe-r1-noscale, ps-tpe)
    python experiments/dataflow_study.py --zoo smol --table               # rebuild results/dataflow_smol.md only

Each run is ``evomerge +search=dataflow_math models=ZOO OVERRIDES search.n_trials=T seed=S`` in
runs/dataflow-<zoo>/<row>/s<seed> (resumable). A finished run's summary.json and trials.csv are kept in
results/dataflow_<zoo>_runs/<row>/s<seed>, so that seeds run in different sessions (each on a fresh
checkout, without runs/) add up to one table. The table reads every kept run: the winner, the best
searched stack (re-scored on every search item and on test), the baselines, and the per-candidate cost.
(results/dataflow_tiny.md was made by this script's first version, whose run directories had no seed level.)
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTES = "<!-- notes: written by hand, kept when the table is rebuilt -->"
ROWS = {  # row -> overrides of `evomerge +search=dataflow_math`
    "cmaes": ["sampler=cmaes"],
    "tpe": ["sampler=tpe"],
    "random": ["sampler=random"],
    "tpe-noscale": ["sampler=tpe", "search.scale=null"],  # no scale genes: every slot's scale is 1
    "tpe-r1": ["sampler=tpe", "search.repeats=1"],  # one pass: each depth's layer from one source (or skipped)
    "tpe-r1-noscale": ["sampler=tpe", "search.repeats=1", "search.scale=null"],  # ... and no scale genes
    # PS-then-DFS: ties_math (its default 60 trials, CMA-ES), then the data-flow search over add, sub and ps
    "ps-cmaes": ["search.parameter_space=ties_math"],
    "ps-tpe": ["sampler=tpe", "search.parameter_space={search: ties_math, n_trials: 40}"],  # TPE for both
}


# Per zoo: the rows run by default, trials per data-flow search, and overrides every run takes.
ZOOS = {
    "tiny": {"rows": list(ROWS), "trials": 40, "extra": []},
    # ps-tpe: ties_math's per-layer-group TIES by TPE (40 trials), then the data-flow search over its winner too
    "smol": {"rows": ["tpe", "tpe-r1", "tpe-r1-noscale", "ps-tpe"], "trials": 40, "extra": ["eval_dtype=float32", "final.export_model=false"]},
}


# What is kept of a run: what the table reads, and a PS-then-DFS row's parameter-space summary (its own baselines)
KEPT = ("summary.json", "trials.csv", "parameter_space/summary.json")


def run(root: Path, keep: Path, zoo: str, row: str, trials: int, seed: int) -> None:
    out = root / row / f"s{seed}"
    cmd = [sys.executable, "-m", "evomerge.run.app", "+search=dataflow_math", f"models={zoo}", *ROWS[row],
           *ZOOS[zoo]["extra"], f"search.n_trials={trials}", f"seed={seed}", "progress=false",
           f"study_name=dataflow-{zoo}-{row}-s{seed}", f"hydra.run.dir={out}"]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    for name in KEPT:
        if (out / name).is_file():
            (keep / row / out.name / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out / name, keep / row / out.name / name)


def _f(v: object) -> str:
    return "" if v is None else f"{float(v):.3f}"  # type: ignore[arg-type]


def table(kept: Path, zoo: str, trials: int) -> str:
    extra = " ".join(ZOOS[zoo]["extra"])
    lines = [f"# Data-flow search on the {zoo} zoo", "",
             f"One run per row and seed, {trials} trials (baselines included), the zoo's math specialists, "
             f"`repeats: 2` (up to twice the source layer count), scale of o_proj/down_proj in [0.5, 1.5] unless the "
             f"row says otherwise. "
             f"Fitness: mean log-likelihood accuracy on the math tasks; search = the search-time sample, "
             f"search* = every search item, test = held out.", "",
             f"Command per row: `evomerge +search=dataflow_math models={zoo} OVERRIDES {extra} "
             f"search.n_trials={trials} seed=SEED` (via `python experiments/dataflow_study.py --zoo {zoo}`); the ps- rows "
             f"run the parameter-space search first, then the data-flow search over the sources and its winner `ps`.", "",
             "| row | seed | overrides | genes | winner | winner test | best searched stack: search / search* / test | its layers "
             "| searched stacks above the best source (search*) | per candidate: stack / eval (s) | wall min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    baselines: dict = {}
    for row, over in ROWS.items():
        for run_dir in sorted((kept / row).glob("s*")):
            path = run_dir / "summary.json"
            if path.is_file():
                summ = json.loads(path.read_text())
                baselines.update(summ["baselines"])
                lines.append(_line(row, run_dir.name[1:], over, summ, run_dir / "trials.csv"))
    if baselines:
        lines += ["", "Baselines (each run scores them; the same values in every run):", "",
                  "| baseline | search* | test |", "|---|---|---|"]
        lines += [f"| {k} | {_f(b['search_full_fitness'])} | {_f(b['test_fitness'])} |" for k, b in baselines.items()]
    return "\n".join(lines) + "\n"


def _line(row: str, seed: str, over: list[str], summ: dict, trials_csv: Path) -> str:
    best_src = max(b["search_full_fitness"] or b["search_fitness"] for k, b in summ["baselines"].items()
                   if k.startswith("alone:"))
    top = [c for c in summ["top"] if c["search_full_fitness"] is not None]
    bt = max(top, key=lambda c: c["search_full_fitness"]) if top else None
    with trials_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    genes = sum(k.startswith("p") and ".l" in k for k in rows[0])
    layers = _sequence(next(r for r in rows if int(r["number"]) == bt["trial"])) if bt is not None else ""
    above = sum(c["search_full_fitness"] > best_src for c in top)
    pc = summ["timings"].get("per_candidate") or {}
    win = summ["best"]
    stack = "" if bt is None else f"{_f(bt['search_fitness'])} / {_f(bt['search_full_fitness'])} / {_f(bt['test_fitness'])}"
    return (f"| {row} | {seed} | `{' '.join(over)}` | {genes} | {win['label']} | {_f(win['test_fitness'])} | {stack} "
            f"| {layers} | {above} of {len(top)} re-scored | {pc.get('merge_s', '')} / {pc.get('eval_s', '')} "
            f"| {summ['timings'].get('total_s', 0) / 60:.0f} |")


def _sequence(row: dict[str, str]) -> str:
    """The decoded stack of a trials.csv row, as `add0 add1 sub1x0.80 ...` (decoding rule of search/dataflow.py)."""
    from evomerge.search.dataflow import DataflowGenome, parse_dataflow
    from evomerge.search.genome import Layout

    params = {k: float(v) for k, v in row.items() if k.startswith("p") and "." in k and v != ""}
    sources = sorted({k.split(".")[2] for k in params if not k.endswith(".scale")})
    n = 1 + max(int(k.split(".")[1][1:]) for k in params)
    spec = parse_dataflow({"space": "dataflow", "repeats": 1 + max(int(k.split(".")[0][1:]) for k in params)})
    genome = DataflowGenome(spec, {s: s for s in sources}, Layout(n, (), (), ()))
    return " ".join(f"{x.source}{x.layer}" + ("" if x.scale == 1.0 else f"x{x.scale:.2f}") for x in genome.decode(params))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", choices=sorted(ZOOS), default="tiny")
    p.add_argument("--rows", nargs="+", default=None, help=f"rows to run (default: the zoo's); all: {', '.join(ROWS)}")
    p.add_argument("--root", type=Path, default=None, help="run directories (default: runs/dataflow-<zoo>)")
    p.add_argument("--keep", type=Path, default=None,
                   help="where finished runs' summary.json and trials.csv are kept and the table reads them "
                        "(default: results/dataflow_<zoo>_runs)")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--table", action="store_true", help="rebuild the table from finished runs only")
    p.add_argument("--out", type=Path, default=None, help="the table (default: results/dataflow_<zoo>.md)")
    a = p.parse_args()
    z = ZOOS[a.zoo]
    root, trials = a.root or ROOT / "runs" / f"dataflow-{a.zoo}", a.trials or z["trials"]
    keep = a.keep or ROOT / "results" / f"dataflow_{a.zoo}_runs"
    unknown = set(a.rows or []) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {', '.join(ROWS)}")
    if not a.table:
        for seed in a.seeds:  # seed by seed: a session that stops early leaves whole seeds
            for row in a.rows or z["rows"]:
                run(root, keep, a.zoo, row, trials, seed)
    out = a.out or ROOT / "results" / f"dataflow_{a.zoo}.md"
    if not any(any((keep / row).glob("s*/summary.json")) for row in ROWS):
        raise SystemExit(f"no finished run kept under {keep}: {out} left as it is")
    notes = out.read_text().split(NOTES, 1)[1] if out.is_file() and NOTES in out.read_text() else "\n"
    out.write_text(table(keep, a.zoo, trials) + "\n" + NOTES + notes)
    print(out.read_text())


if __name__ == "__main__":
    main()
