"""The ties_math study: does an evolved merge beat every source model and every hand-set recipe on held-out data?

One command per row; each row runs real `evomerge` searches (subprocesses, resumable: rerunning
a row resumes its studies) and the table is rebuilt from every finished run's summary.json.

    python experiments/study.py --zoo tiny --row handset            # sources alone + hand-set recipes
    python experiments/study.py --zoo tiny --row global-cmaes --seeds 0 1 2
    python experiments/study.py --zoo tiny --table                  # rebuild results/ties_math_tiny.md

Rows: handset, {global,layers}-{cmaes,tpe,random}. Run directories: runs/study-<zoo>/<row>/s<seed>.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Per zoo: trial budget, search-time items, layer-group size of the per-layer-group genome, extra overrides.
ZOOS = {
    "tiny": {"trials": 40, "group": 1, "extra": []},
    "smol": {"trials": 30, "group": 6, "extra": ["eval_dtype=bfloat16"]},
}
SAMPLERS = ("cmaes", "tpe", "random")
NOTES = "<!-- notes: written by hand, kept when the table is rebuilt -->"
GENOMES = {"global": "global", "layers": None}  # None: the zoo's group size


def search_rows(zoo: str, trials: int | None = None) -> dict[str, list[str]]:
    rows = {}
    for genome, lpg in GENOMES.items():
        for sampler in SAMPLERS:
            group = lpg or ZOOS[zoo]["group"]
            rows[f"{genome}-{sampler}"] = [f"search.layers_per_group={group}", f"sampler={sampler}",
                                           f"search.n_trials={trials or ZOOS[zoo]['trials']}"]
    return rows


def handset_runs(n_sources: int) -> dict[str, list[str]]:
    """Baseline-only searches (n_trials = the baselines): each source alone and the textbook recipes."""
    only = n_sources + 1
    return {
        "ties": ["+search=ties_math", f"search.n_trials={only}"],
        "dare_ties": ["+search=dare_ties_math", f"search.n_trials={only}"],
        "task_arithmetic": ["+search=task_arithmetic_math", f"search.n_trials={only}", "search.textbook.weight=1.0"],
        "average": ["+search=task_arithmetic_math", f"search.n_trials={only}",
                    f"search.textbook.weight={1.0 / n_sources:.6f}"],
    }


def evomerge(overrides: list[str], out: Path, zoo: str, seed: int) -> None:
    cmd = [sys.executable, "-m", "evomerge.run.app", f"models={zoo}", f"seed={seed}",
           f"study_name=study-{zoo}-{out.parent.name}-{out.name}", f"hydra.run.dir={out}",
           *ZOOS[zoo]["extra"], *overrides]
    print("$", " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  done in {time.perf_counter() - start:.0f}s", flush=True)


def row_dir(zoo: str, row: str, trials: int | None, limit: float | None) -> str:
    """A row run at a non-default budget gets a directory of its own, so its table line stands beside the
    default one instead of resuming (and mixing with) it: layers-cmaes-t80-l0.5."""
    trials = None if trials == ZOOS[zoo]["trials"] else trials
    return row + (f"-t{trials}" if trials else "") + (f"-l{limit:g}" if limit else "")


def run_row(runs: Path, zoo: str, row: str, seeds: list[int], n_sources: int, trials: int | None,
            limit: float | None = None) -> None:
    if row == "handset":
        for name, ov in handset_runs(n_sources).items():
            evomerge(ov, runs / "handset" / name, zoo, 0)
        return
    rows = search_rows(zoo, trials)
    if row not in rows:
        raise SystemExit(f"unknown row {row!r}; rows: handset, {', '.join(rows)}")
    extra = [f"models.limit={limit}"] if limit else []
    for seed in seeds:
        evomerge(["+search=ties_math", *rows[row], *extra], runs / row_dir(zoo, row, trials, limit) / f"s{seed}", zoo, seed)


def _load(path: Path) -> dict | None:
    f = path / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _ms(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _items(limit: float | int | None) -> str:
    """lm-eval's limit: a fraction of each task's search split, or a count of items."""
    return "all" if limit is None else f"{limit:g} of each task" if limit < 1 else f"{limit:g} per task"


def _best_merge(summary: dict) -> dict | None:
    """The searched recipe the final step ranked first on the full search split (the winner unless a
    baseline beat it): what the search found, even where the final choice kept a source model."""
    top = [t for t in summary.get("top", []) if t.get("baseline") is None]
    return max(top, key=lambda t: t.get("search_full_fitness", t["search_fitness"]), default=None)


def _best_so_far(run_dir: Path) -> list[float]:
    """Best search fitness after each finished trial (baselines included: they are where every search
    starts), from the run's trials.csv. Completed trials only: a pruned trial's score is a first look on
    a quarter of the items, too noisy to stand beside whole looks (it would draw the curve up by luck)."""
    f = run_dir / "trials.csv"
    if not f.is_file():
        return []
    best, out = float("-inf"), []
    for t in sorted(csv.DictReader(f.open()), key=lambda t: int(t["number"])):
        if t["state"] not in ("COMPLETE", "PRUNED"):
            continue
        if t["state"] == "COMPLETE" and t["fitness"]:
            best = max(best, float(t["fitness"]))
        out.append(best)
    return out


def plot_convergence(curves: dict[str, list[list[float]]], path: Path) -> None:
    """Which sampler gets there in fewest trials: best-so-far search fitness by trial, one line per
    seed, each row's mean in bold. Rows at different search-time limits score on different samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (row, runs) in enumerate(curves.items()):
        color = f"C{i % 10}"
        for c in runs:
            ax.plot(range(1, len(c) + 1), c, color=color, alpha=0.25, lw=0.8)
        n = min(len(c) for c in runs)
        ax.plot(range(1, n + 1), [statistics.mean(c[k] for c in runs) for k in range(n)], color=color, lw=2,
                label=f"{row} ({len(runs)} seeds)")
    ax.set(xlabel="trial", ylabel="best search fitness so far", title="Search history, mean over seeds in bold")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_table(runs: Path, zoo: str, out: Path) -> str:
    """Markdown table of everything finished under ``runs``, plus ``out``/ties_math_<zoo>.json."""
    base = runs
    handset: dict[str, tuple[float, float]] = {}
    for name in handset_runs(1):
        s = _load(base / "handset" / name)
        if not s:
            continue
        for label, b in s["baselines"].items():
            key = label if label.startswith("alone:") else f"{name} (textbook)"
            if name == "average" and label == "textbook":
                key = "uniform average"
            handset[key] = (b["search_fitness"], b["test_fitness"])
    best_hand = max((v[1] for v in handset.values()), default=float("nan"))
    lines = [f"# ties_math study on the {zoo} zoo", "",
             "Fitness = mean accuracy over the math tasks; **test** is the held-out split the search never sees.",
             f"Regenerate: see experiments/README.md. Table rebuilt {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "", "## Sources and hand-set recipes", "", "| recipe | search | test |", "|---|---|---|"]
    for k, (sf, tf) in sorted(handset.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {k} | {sf:.3f} | {tf:.3f} |")
    lines += ["", "## Evolved (TIES, winner re-scored on test; mean ± std over seeds)", "",
              "| genome-sampler | seeds | trials | search items | winner search | winner test | search − test | winner is a merge "
              "| best merge's test | beats best hand-set on test | trial of winner | wall s | merge s/cand | eval s/cand |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    data: dict = {"handset": handset, "search": {}}
    curves: dict[str, list[list[float]]] = {}
    order = list(search_rows(zoo))

    def rank(name: str) -> tuple[int, str]:  # default rows in their usual order, each budget after its row
        row = re.sub(r"(-t\d+)?(-l[\d.]+)?$", "", name)
        return (order.index(row) if row in order else len(order), name)

    dirs = sorted((d.name for d in base.iterdir() if d.is_dir() and d.name != "handset"), key=rank) if base.is_dir() else []
    for row in dirs:
        done = [d for d in sorted((base / row).glob("s*")) if (d / "summary.json").is_file()]
        runs = [_load(d) for d in done]
        if not runs:
            continue
        st = [r["best"]["search_fitness"] for r in runs]
        te = [r["best"]["test_fitness"] for r in runs]
        wins = sum(t > best_hand for t in te)
        merged = sum(r["best"].get("baseline") is None for r in runs)  # else the final choice kept a baseline
        best_merge = [b["test_fitness"] for r in runs if (b := _best_merge(r))]
        when = [r["best"]["trial"] for r in runs]
        wall = [r["timings"].get("total_s", float("nan")) for r in runs]
        per = [r["timings"].get("per_candidate", {}) for r in runs]
        merge = [p.get("merge_s", float("nan")) for p in per]
        ev = [p.get("eval_s", float("nan")) for p in per]
        lines.append(f"| {row} | {len(runs)} | {runs[0]['trials']['finished']} | {_items(runs[0]['limit'])} | {_ms(st)} | {_ms(te)} | "
                     f"{_ms([a - b for a, b in zip(st, te)])} | {merged}/{len(runs)} | {_ms(best_merge)} | {wins}/{len(runs)} | {_ms(when)} | "
                     f"{statistics.mean(wall):.0f} | {statistics.median(merge):.3f} | {statistics.median(ev):.3f} |")
        curves[row] = [c for d in done if (c := _best_so_far(d))]
        data["search"][row] = {"search": st, "test": te, "trial_of_winner": when, "wall_s": wall,
                               "best_merge_test": best_merge}
    out.mkdir(parents=True, exist_ok=True)
    if any(curves.values()):
        plot_convergence({k: v for k, v in curves.items() if v}, out / f"ties_math_{zoo}.png")
        lines += ["", f"![search history by row](ties_math_{zoo}.png)"]
    lines.append("")
    (out / f"ties_math_{zoo}.json").write_text(json.dumps(data, indent=2))
    return write_keeping_notes(out / f"ties_math_{zoo}.md", "\n".join(lines))


def write_keeping_notes(md: Path, text: str) -> str:
    """Write a generated results page; the hand-written analysis below the NOTES marker survives a rebuild."""
    old = md.read_text() if md.is_file() else ""
    text += "\n" + (old[old.index(NOTES):] if NOTES in old else NOTES + "\n")
    md.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", choices=sorted(ZOOS), default="tiny")
    ap.add_argument("--row", help="handset, or genome-sampler (e.g. global-cmaes)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sources", type=int, default=None, help="number of source models (default: the zoo's math set)")
    ap.add_argument("--table", action="store_true", help="only rebuild the table")
    ap.add_argument("--trials", type=int, default=None, help="trial budget per search (default: the zoo's)")
    ap.add_argument("--limit", type=float, default=None,
                    help="search-time items per task (models.limit; default: the zoo's); the row gets its own directory")
    ap.add_argument("--runs", type=Path, default=None, help="run directories (default: runs/study-<zoo>)")
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="where the table goes")
    args = ap.parse_args()
    runs = args.runs or ROOT / "runs" / f"study-{args.zoo}"
    if args.row and not args.table:
        n = args.sources or {"tiny": 2, "smol": 3}[args.zoo]
        run_row(runs, args.zoo, args.row, args.seeds, n, args.trials, args.limit)
    print(build_table(runs, args.zoo, args.out))


if __name__ == "__main__":
    main()
