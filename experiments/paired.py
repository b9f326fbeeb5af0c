"""Paired held-out comparison: does each evolved winner beat a hand-set recipe on the same test items?

The study's table compares test means; two merges of the same models mostly get the same items right,
so the noise in their difference is far smaller than two independent samples' standard errors suggest.
This scores each run's exported model and a baseline run's model on every test item and reports the
mean per-item difference, its paired standard error, and an exact sign test on the items where they
disagree (McNemar's test).

    python experiments/paired.py --baseline runs/study-smol/handset/dare_ties \\
        runs/study-smol/layers-cmaes-t80-l0.5/s* runs/study-smol/layers-tpe-t80-l0.5/s* \\
        --out results/paired_smol.md

A run directory is any finished `evomerge` run (summary.json and best/model). The table shows each
model's recorded test score beside the re-scored one: every model here is scored in one process, with
one thread count, because bfloat16 matrix products on a CPU round differently with the number of threads
(a smol winner scored 0.652 with one thread, as its search ran, and 0.654 with two: 3 of 1,500 items).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` against ``losses`` at even odds."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, float]:
    """Fitness difference a − b (mean over tasks of mean per-item difference), its paired standard error,
    and the sign test over all items where exactly one of the two is right."""
    tasks = sorted(a)
    diff = se2 = 0.0
    wins = losses = 0
    for t in tasks:
        d = [x - y for x, y in zip(a[t], b[t], strict=True)]
        diff += statistics.mean(d) / len(tasks)
        se2 += statistics.variance(d) / len(d) / len(tasks) ** 2
        wins += sum(x > 0 for x in d)
        losses += sum(x < 0 for x in d)
    return {"diff": diff, "se": math.sqrt(se2), "wins": wins, "losses": losses, "p": sign_test_p(wins, losses)}


def score_run(run: Path, tasks: list[str], include: str, dtype: str) -> tuple[dict[str, list[float]], float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.checkpoints import parse_dtype
    from evomerge.evaluation import Evaluator

    model_dir = run / "best" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=parse_dtype(dtype, f"{run}/.hydra/config.yaml: eval_dtype"))
    ev = Evaluator(AutoTokenizer.from_pretrained(model_dir), tasks, include_paths=[include])
    items = ev.item_scores(model, "test")
    return items, sum(statistics.mean(items[t]) for t in tasks) / len(tasks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run directories of the winners")
    ap.add_argument("--baseline", type=Path, required=True, help="run directory whose exported model is the reference")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to write (and a .json beside it)")
    args = ap.parse_args()

    from evomerge.zoo import build_zoo

    cfg = json.loads((args.baseline / "summary.json").read_text())
    tasks = sorted(cfg["best"]["test_metrics"])
    zoo = build_zoo(_hydra(args.baseline)["models"]["zoo"], progress=False)  # its tasks; built already
    print(f"tasks {tasks}, zoo {zoo.root}", flush=True)

    rows, data = [], {}
    ref, ref_fit = score_run(args.baseline, tasks, str(zoo.task_dir), _hydra(args.baseline)["eval_dtype"])
    label_ref = f"{args.baseline.name} ({cfg['best']['label']})"
    for run in args.runs:
        t0 = time.perf_counter()
        summary = json.loads((run / "summary.json").read_text())
        items, fit = score_run(run, tasks, str(zoo.task_dir), _hydra(run)["eval_dtype"])
        r = paired(items, ref)
        name = f"{run.parent.name}/{run.name}"
        recorded = summary["best"]["test_fitness"]
        data[name] = {"test": fit, "recorded_test": recorded, **r}
        rows.append(f"| {name} | {recorded:.3f} | {fit:.3f} | {r['diff']:+.4f} | {r['se']:.4f} | {r['diff'] / r['se']:+.1f} | "
                    f"{r['wins']} / {r['losses']} | {r['p']:.3f} |")
        print(rows[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
    diffs = [d["diff"] for d in data.values()]
    lines = [f"# Paired test-split comparison against {label_ref}", "",
             f"Reference: `{args.baseline}` (test {ref_fit:.3f}, recorded {cfg['best']['test_fitness']:.3f}); "
             f"{torch.get_num_threads()} threads; {sum(len(v) for v in ref.values())} test items "
             f"over {', '.join(tasks)}. Regenerate: `python experiments/paired.py --baseline {args.baseline} "
             f"{' '.join(str(r) for r in args.runs)}`. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "", "| winner | test (recorded) | test (here) | difference | paired SE | z | items won / lost | sign test p |",
             "|---|---|---|---|---|---|---|---|", *rows, "",
             f"Mean difference over the {len(diffs)} winners: {statistics.mean(diffs):+.4f}"
             + (f" (std {statistics.stdev(diffs):.4f} across runs)" if len(diffs) > 1 else "") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"reference": str(args.baseline), "tasks": tasks,
                                                             "reference_test": ref_fit, "runs": data}, indent=2))


def _hydra(run: Path) -> dict:
    """The run's resolved configuration: its zoo, and the precision it scored in (so the re-score matches)."""
    import yaml

    return yaml.safe_load((run / ".hydra" / "config.yaml").read_text())


if __name__ == "__main__":
    main()
