"""The data-flow search on the tiny zoo, one run per sampler: does a searched layer stack beat the sources?

    python experiments/dataflow_tiny.py                      # run (or resume) every sampler, then the table
    python experiments/dataflow_tiny.py --table              # rebuild results/dataflow_tiny.md only

Each run is ``evomerge +search=dataflow_math sampler=S search.n_trials=T`` in RUN_ROOT/S (resumable). The
table reads every finished run's summary.json and trials.csv: the winner, the best searched stack (re-scored
on every search item and on test), the baselines, and the per-candidate cost.
"""
from __future__ import annotations

import argparse
import csv
import json
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
    # PS-then-DFS: ties_math (its default 60 trials, CMA-ES), then the data-flow search over add, sub and ps
    "ps-cmaes": ["search.parameter_space=ties_math"],
}


def run(root: Path, row: str, trials: int, seed: int) -> None:
    cmd = [sys.executable, "-m", "evomerge.run.app", "+search=dataflow_math", *ROWS[row],
           f"search.n_trials={trials}", f"seed={seed}", "progress=false", f"hydra.run.dir={root / row}"]
    subprocess.run(cmd, check=True, cwd=ROOT)


def _f(v: object) -> str:
    return "" if v is None else f"{float(v):.3f}"  # type: ignore[arg-type]


def table(root: Path, trials: int, seed: int) -> str:
    lines = ["# Data-flow search on the tiny zoo", "",
             f"One run per row, seed {seed}, {trials} trials (baselines included), `add` and `sub` specialists "
             f"(4 layers each), `repeats: 2` (up to 8 layers), scale of o_proj/down_proj in [0.5, 1.5] unless the "
             f"row says otherwise. "
             f"Fitness: mean log-likelihood accuracy on the math tasks; search = the search-time sample, "
             f"search* = every search item, test = held out.", "",
             f"Command per row: `evomerge +search=dataflow_math OVERRIDES search.n_trials={trials} seed={seed}` (via "
             f"`python experiments/dataflow_tiny.py`); row ps-cmaes runs ties_math's own 60 trials by CMA-ES first, "
             f"then the data-flow search over add, sub and its winner `ps`.", "",
             "| row | overrides | genes | winner | winner test | best searched stack: search / search* / test | its layers "
             "| searched stacks above the best source (search*) | per candidate: stack / eval (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    baselines: dict = {}
    for s, over in ROWS.items():
        path = root / s / "summary.json"
        if not path.is_file():
            continue
        summ = json.loads(path.read_text())
        baselines.update(summ["baselines"])
        best_src = max(b["search_full_fitness"] or b["search_fitness"] for k, b in summ["baselines"].items()
                       if k.startswith("alone:"))
        top = [c for c in summ["top"] if c["search_full_fitness"] is not None]
        bt = max(top, key=lambda c: c["search_full_fitness"]) if top else None
        layers = ""
        with (root / s / "trials.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        genes = sum(k.startswith("p") and ".l" in k for k in rows[0])
        if bt is not None:
            layers = _sequence(next(r for r in rows if int(r["number"]) == bt["trial"]))
        above = sum(c["search_full_fitness"] > best_src for c in top)
        pc = summ["timings"].get("per_candidate") or {}
        win = summ["best"]
        lines.append(f"| {s} | `{' '.join(over)}` | {genes} | {win['label']} | {_f(win['test_fitness'])} | "
                     + ("" if bt is None else f"{_f(bt['search_fitness'])} / {_f(bt['search_full_fitness'])} / "
                                              f"{_f(bt['test_fitness'])}")
                     + f" | {layers} | {above} of {len(top)} re-scored | {pc.get('merge_s', '')} / {pc.get('eval_s', '')} |")
    if baselines:
        lines += ["", "Baselines (each run scores them; the same values in every run):", "",
                  "| baseline | search* | test |", "|---|---|---|"]
        lines += [f"| {k} | {_f(b['search_full_fitness'])} | {_f(b['test_fitness'])} |" for k, b in baselines.items()]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "dataflow-tiny")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", action="store_true", help="rebuild the table from finished runs only")
    a = p.parse_args()
    if not a.table:
        for row in ROWS:
            run(a.root, row, a.trials, a.seed)
    out = ROOT / "results" / "dataflow_tiny.md"
    notes = out.read_text().split(NOTES, 1)[1] if out.is_file() and NOTES in out.read_text() else "\n"
    out.write_text(table(a.root, a.trials, a.seed) + "\n" + NOTES + notes)
    print(out.read_text())


if __name__ == "__main__":
    main()
