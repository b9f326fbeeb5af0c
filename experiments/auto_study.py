"""The method-gene study: does `+search=auto_math` beat the best hand-set recipe of any method on held-out data?

Each run is an ordinary `evomerge +search=auto_math` search (resumable: rerunning a row resumes its studies)
whose baselines are every source alone and every method's textbook recipe, chosen on select items the
search never scored. The table pairs each run's exported winner with the best of those baselines *by test*
(the hardest one, picked with hindsight) on the same test items, per seed and over the seeds combined.

    python experiments/auto_study.py --zoo smol --seeds 0 1 2                 # TPE, per-layer-group genes
    python experiments/auto_study.py --zoo smol --table                       # rebuild results/auto_math_smol_study.md

Run directories: runs/auto-<zoo>/<row>/s<seed>, the row named by its sampler, trials, search items and
layer groups (e.g. tpe-t60-l0.5-g6), and by --fresh-items, --sources and --task-group where given. A finished run's summary.json, trials.csv and the per-item test scores
of its re-scored candidates (test_items.json, read from its study) are kept in results/auto_math_<zoo>_runs/,
and the table reads only those: seeds run in several sessions (each on a fresh checkout, without runs/) add
up to one table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import ROOT, _ms, evomerge, write_keeping_notes  # noqa: E402

from evomerge.search.fitness import paired_se  # noqa: E402

# Per zoo: trials, search-time items (a share of the search items left after the select ones), layer groups, select.
DEFAULTS = {"tiny": {"trials": 80, "limit": 0.5, "group": "global", "select": 100},
            "smol": {"trials": 60, "limit": 0.5, "group": 6, "select": 600}}


def row_name(sampler: str, trials: int, limit: float, group: int | str, fresh: int | None = None,
             sources: list[str] | None = None, task_group: str | None = None) -> str:
    """A row's directory and study name: every setting that changes what its seeds measure, so that a run with
    other settings gets a row of its own instead of resuming (and mixing with) another row's study, e.g.
    tpe-t60-l0.5-g6-add.sub.mul.rev-all_ll for the smol zoo's four specialists scored on all four skills."""
    return (f"{sampler}-t{trials}-l{limit:g}-g{group}" + (f"-f{fresh}" if fresh else "")
            + (f"-{'.'.join(sources)}" if sources else "") + (f"-{task_group}" if task_group else ""))


def run_row(runs: Path, keep: Path, zoo: str, sampler: str, trials: int, limit: float, group: int | str,
            select: int, seeds: list[int], eval_dtype: str, fresh: int | None = None,
            sources: list[str] | None = None, task_group: str | None = None) -> None:
    row = row_name(sampler, trials, limit, group, fresh, sources, task_group)
    for seed in seeds:  # seed by seed, each kept when it ends: a session that stops early leaves whole seeds
        evomerge(["+search=auto_math", f"sampler={sampler}", f"search.n_trials={trials}", f"search.limit={limit}",
                  f"search.layers_per_group={group}", f"tasks.select={select}", "final.export_model=false",
                  # the winner is chosen on select and reported on test: re-scoring every search item too
                  # would measure the search/select gap (fidelity.py's question, not this table's) and add
                  # about a third to the final re-scoring
                  "final.rescore_search=false", f"eval_dtype={eval_dtype}",
                  # a sample of the search items drawn by the seed (fresh every N trials) instead of every seed's
                  # same first items, so that seeds average the search sample's luck
                  *([f"search.fresh_items={fresh}"] if fresh else []),
                  # other specialists and tasks than the models group's math set (e.g. the smol zoo's four)
                  *([f"search.sources=[{','.join(sources)}]"] if sources else []),
                  *([f"tasks.group={task_group}"] if task_group else [])],
                 runs / row / f"s{seed}", zoo, seed)
        keep_run(runs / row / f"s{seed}", keep / row / f"s{seed}")


# What is kept of a finished run besides its candidates' per-item test scores: what the table reads, and the
# exported recipe (the winner's method where it is a searched one)
KEPT = ("summary.json", "trials.csv", "best/recipe.yaml")


def keep_run(run: Path, kept: Path) -> None:
    """Copy what the table reads of a finished run (:data:`KEPT`) and write its candidates' per-item test scores
    by trial number, from the study (the pairing over the same test items needs them)."""
    import optuna

    from evomerge.search import record

    summary = json.loads((run / "summary.json").read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    final = record.final_scores(optuna.load_study(study_name=summary["study"], storage=summary["storage"]))
    for name in KEPT:
        if (run / name).is_file():
            (kept / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / name, kept / name)
    items = {str(n): f.test_items for n, f in sorted(final.items()) if f.test_items is not None}
    (kept / "test_items.json").write_text(json.dumps(items, separators=(",", ":")))


def kept_items(run: Path) -> dict[int, dict[str, list[float]]]:
    """A kept run's per-item test scores by trial number ({} where none were kept)."""
    f = run / "test_items.json"
    return {int(n): v for n, v in json.loads(f.read_text()).items()} if f.is_file() else {}


def test_items(final: dict[int, dict[str, list[float]]], trial: int,
               baseline: int) -> tuple[dict[str, list[float]], dict[str, list[float]]] | None:
    """The per-item test scores of ``trial`` and of ``baseline`` (trial numbers), where both kept them."""
    win, ref = final.get(trial), final.get(baseline)
    return (win, ref) if win is not None and ref is not None else None


def combined(pairs: list[tuple[dict[str, list[float]], dict[str, list[float]]]]) -> tuple[float, float]:
    """The seeds' mean winner-minus-baseline difference and its standard error, paired over the same test items:
    each item's scores averaged over the seeds first, so items every seed gets right (or wrong) add no noise
    and the seeds' shared items are not counted as independent evidence (the SE is fitness.paired_se's)."""
    def over_seeds(side: int) -> dict[str, list[float]]:
        return {t: [statistics.mean(p[side][t][i] for p in pairs) for i in range(len(v))] for t, v in pairs[0][0].items()}

    win, base = over_seeds(0), over_seeds(1)
    diff = statistics.mean(statistics.mean(win[t]) - statistics.mean(base[t]) for t in win)
    return diff, paired_se(win, base)


def build_table(kept: Path, zoo: str, out: Path) -> str:
    lines = [f"# `+search=auto_math` on the {zoo} zoo: the method is a gene", "",
             "Each run's baselines are every source alone and every method's textbook recipe; the winner is chosen on "
             "select items the search never scored; **test** is held out. *Best hand-set* is the best baseline by "
             "test (picked with hindsight, so the comparison is conservative); the difference is paired over the same "
             "test items. Regenerate: see experiments/README.md. Table rebuilt "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| row | seed | exported winner | its method | search sample | select | test | best searched recipe (test) "
             "| best other hand-set (test) | winner − best other hand-set | best searched − best hand-set "
             "| search − test (the best other hand-set's) | trials | wall min (zoo build apart) | eval s/cand |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    data: dict = {}
    for row_dir in sorted(d for d in kept.iterdir() if d.is_dir()) if kept.is_dir() else []:
        pairs, searched_pairs, rows = [], [], []
        for run in sorted(row_dir.glob("s*")):
            f = run / "summary.json"
            if not f.is_file():
                continue
            s = json.loads(f.read_text())
            best, held = s["best"], s.get("held_out") or {}
            method = best.get("method") or _params_method(run, best)
            base = s["baselines"].get(held.get("baseline"), {})
            se = held.get("se")
            gap = best["search_fitness"] - best["test_fitness"]
            # the same gap of the best other hand-set recipe, which nothing fitted: what the search sample's
            # luck alone gives a merge of these models (the search's own fitting is the rest)
            base_gap = (base["search_fitness"] - base["test_fitness"]) if base.get("test_fitness") is not None else None
            ev = (s["timings"].get("per_candidate") or {}).get("eval_s", float("nan"))
            wall_s = s["timings"].get("total_s", 0.0) - s["timings"].get("zoo_s", 0.0)  # a first use builds the zoo
            searched = max((t for t in s.get("top", []) if t.get("baseline") is None and t.get("select_fitness") is not None),
                           key=lambda t: t["select_fitness"], default=None)  # the one the winner rule weighed
            hand = " (the winner is hand-set)" if best.get("baseline") else ""
            # the searched recipe the rule weighed, against the best hand-set recipe by test (the winner included)
            top_hand = max(s["baselines"], key=lambda k: s["baselines"][k].get("test_fitness") or -1.0)
            final = kept_items(run) if held else {}
            s_items = test_items(final, searched["trial"], s["baselines"][top_hand]["trial"]) if searched else None
            if s_items is not None:
                searched_pairs.append(s_items)
            s_diff = (f"{searched['test_fitness'] - s['baselines'][top_hand]['test_fitness']:+.3f} ± "
                      f"{paired_se(*s_items):.3f} (vs {top_hand})" if s_items is not None else "–")
            lines.append(f"| {row_dir.name} | {run.name[1:]} | {best['label']} | {method} | {best['search_fitness']:.3f} "
                         f"| {best.get('select_fitness') or float('nan'):.3f} | **{best['test_fitness']:.3f}** "
                         f"| {searched['label'] + ' ' + format(searched['test_fitness'], '.3f') if searched else '–'} "
                         f"| {held.get('baseline', '–')} {base.get('test_fitness', float('nan')):.3f} "
                         f"| {held.get('difference', float('nan')):+.3f} ± {se if se is not None else float('nan'):.3f}{hand} "
                         f"| {s_diff} | {gap:+.3f} ({_signed(base_gap)}) | {s['trials']['finished']} | {wall_s / 60:.1f} | {ev:.2f} |")
            rows.append({"seed": run.name, "winner": best["label"], "method": method, "test": best["test_fitness"],
                         "search": best["search_fitness"], "select": best.get("select_fitness"), "held_out": held,
                         "handset_gap": base_gap, "wall_s": wall_s})
            if held and (items := test_items(final, best["trial"], s["baselines"][held["baseline"]]["trial"])):
                pairs.append(items)
        if not rows:
            continue
        entry: dict = {"runs": rows}
        if pairs:
            diff, se = combined(pairs)
            entry["combined"] = {"seeds": len(pairs), "difference": diff, "se": se}
            gaps = [r["search"] - r["test"] for r in rows]
            base_gaps = [r["handset_gap"] for r in rows if r["handset_gap"] is not None]
            s_text = "–"
            if len(searched_pairs) == len(pairs):
                c_diff, c_se = combined(searched_pairs)
                entry["combined_searched"] = {"seeds": len(pairs), "difference": c_diff, "se": c_se}
                s_text = f"**{c_diff:+.3f} ± {c_se:.3f}** (z = {c_diff / c_se if c_se else float('nan'):.1f})"
            lines.append(f"| **{row_dir.name}, {len(pairs)} seed{'s' * (len(pairs) > 1)} combined** | | | | | | {_ms([r['test'] for r in rows])} | | "
                         f"| **{diff:+.3f} ± {se:.3f}** (z = {diff / se if se else float('nan'):.1f}) | {s_text} "
                         f"| {_ms(gaps)} ({_ms(base_gaps) if base_gaps else '–'}) | | | |")
        data[row_dir.name] = entry
    out.mkdir(parents=True, exist_ok=True)
    (out / f"auto_math_{zoo}_study.json").write_text(json.dumps(data, indent=2))
    return write_keeping_notes(out / f"auto_math_{zoo}_study.md", "\n".join(lines) + "\n")


def _signed(v: float | None) -> str:
    return "–" if v is None else f"{v:+.3f}"


def _params_method(run: Path, best: dict) -> str:
    """The winner's merge method, from its exported recipe (a baseline's label names it already)."""
    recipe = run / "best" / "recipe.yaml"
    if recipe.is_file():
        for line in recipe.read_text().splitlines():
            if line.startswith("merge_method:"):
                return line.split(":", 1)[1].strip()
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", choices=sorted(DEFAULTS), default="smol")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--limit", type=float, default=None, help="search-time share (below 1) or count (above 1) of each task's search items")
    ap.add_argument("--fresh-items", type=int, default=None,
                    help="search.fresh_items: a new sample of the search items, drawn by the seed, every N trials "
                         "(N >= --trials: one sample per seed)")
    ap.add_argument("--sources", nargs="+", default=None,
                    help="the specialists to merge (default: the models group's math set), e.g. add sub mul rev; a row of its own")
    ap.add_argument("--task-group", default=None,
                    help="the zoo's task group that scores them (default: math_ll; all_ll: every skill; a row of its own)")
    ap.add_argument("--group", default=None, help="layers per gene group: an integer or global")
    ap.add_argument("--select", type=int, default=None, help="select items per task, carved out of the search items")
    ap.add_argument("--eval-dtype", default="float32",
                    help="float32 (the default: faster than bfloat16 on a CPU without AMX) or bfloat16")
    ap.add_argument("--table", action="store_true",
                    help="only rebuild the table (keeping first any finished run under --runs not yet kept)")
    ap.add_argument("--runs", type=Path, default=None, help="run directories (default: runs/auto-<zoo>)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="where finished runs are kept and the table reads them (default: results/auto_math_<zoo>_runs)")
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="where the table goes")
    args = ap.parse_args()
    d = DEFAULTS[args.zoo]
    runs = args.runs or ROOT / "runs" / f"auto-{args.zoo}"
    keep = args.keep or ROOT / "results" / f"auto_math_{args.zoo}_runs"
    if args.table:
        for run in sorted(runs.glob("*/s*")):
            if (run / "summary.json").is_file() and not (keep / run.parent.name / run.name / "summary.json").is_file():
                keep_run(run, keep / run.parent.name / run.name)
    else:
        run_row(runs, keep, args.zoo, args.sampler, args.trials or d["trials"], args.limit or d["limit"],
                args.group or d["group"], args.select or d["select"], args.seeds, args.eval_dtype, args.fresh_items,
                args.sources, args.task_group)
    if not any(keep.glob("*/s*/summary.json")):
        raise SystemExit(f"no finished run kept under {keep}: the table is left as it is")
    print(build_table(keep, args.zoo, args.out))


if __name__ == "__main__":
    main()
