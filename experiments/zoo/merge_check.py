"""Is merging the zoo worth it? Task arithmetic of the math specialists vs each of them.

The proof of purpose behind the zoo recipes: a plain weighted sum of the math
specialists' task vectors (base + sum_i w * (specialist_i - base)), scored with the
real Evaluator on the held-out test split, must beat every single zoo model on the
math mix. Deliberately independent of evomerge/engine (a few lines of torch).

    python experiments/zoo/merge_check.py tiny [--weights 0.5 0.7 1.0] [--out results/zoo.md]
    python experiments/zoo/merge_check.py smol --group math_ll --pairs --weights 0.5 1.0 --bf16

``--pairs`` adds each pair of math specialists (does one task vector keep the other's skill?);
``--group math_ll`` scores 4-way multiple choice by log-likelihood (the search's fitness) instead of
generated answers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evomerge.evaluation import Evaluator  # noqa: E402
from evomerge.zoo import load_zoo  # noqa: E402
from evomerge.zoo.cli import _write_section  # noqa: E402


def state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(shard).items()})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("zoo", choices=["tiny", "smol"])
    p.add_argument("--weights", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--group", default="math", choices=["math", "math_ll"], help="task group (metric: em or ll acc)")
    p.add_argument("--pairs", action="store_true", help="also merge each pair of math specialists")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    zoo = load_zoo(args.zoo)
    math_tasks = zoo.tasks[args.group]
    metric = "acc" if args.group.endswith("_ll") else "exact_match"
    skills = [t.removeprefix("evomerge_").removesuffix("_ll") for t in math_tasks]
    math_specs = [s for s in skills if s in zoo.specialists]
    tok = AutoTokenizer.from_pretrained(zoo.base)
    model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    ev = Evaluator(tok, math_tasks, include_paths=[str(zoo.task_dir)], batch_size=32)
    base = state(zoo.base)
    specs = {s: state(p) for s, p in zoo.specialists.items()}
    rows: dict[str, dict[str, float]] = {}
    candidates = {"base": lambda: base, **{s: (lambda s=s: specs[s]) for s in specs}}
    groups = [math_specs]
    if args.pairs:
        groups += [[a, b] for i, a in enumerate(math_specs) for b in math_specs[i + 1:]]
    for group in groups:
        for w in args.weights:
            candidates[f"TA {'+'.join(group)}, w={w:g}"] = (
                lambda w=w, group=group: {k: base[k] + sum(w * (specs[s][k] - base[k]) for s in group) for k in base})
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    for name, get in candidates.items():
        with torch.no_grad():
            model.load_state_dict(get(), strict=False)
        res = ev.evaluate(model, args.split, limit=limit)
        row = {s: res[t][metric] for s, t in zip(skills, math_tasks)}
        row["math mean"] = sum(row.values()) / len(row)
        rows[name] = row
        print(f"{name:30s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    cols = [*skills, "math mean"]
    best_single = max(rows[n]["math mean"] for n in ["base", *specs])
    lines = [
        f"Merge check ({args.zoo}, split `{args.split}`" + (f", {limit} items per task" if limit else "")
        + f", {'exact match' if metric == 'exact_match' else '4-way log-likelihood accuracy'}; "
        f"{time.perf_counter() - t0:.0f} s). Regenerate: `python experiments/zoo/merge_check.py {args.zoo}"
        + (f" --group {args.group}" if args.group != "math" else "") + (" --pairs" if args.pairs else "")
        + (f" --limit {args.limit:g}" if args.limit else "") + f" --weights {' '.join(f'{w:g}' for w in args.weights)}"
        + (" --bf16" if args.bf16 else "") + (f" --out {args.out}" if args.out else "") + "`",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        *[f"| {n} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for n, r in rows.items()],
        "",
        f"Best single model on the math mean: {best_single:.3f}; best merge: "
        f"{max(r['math mean'] for n, r in rows.items() if n.startswith('TA')):.3f}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        _write_section(args.out, f"{args.zoo}-merge" + ("-ll" if metric == "acc" else ""), text)


if __name__ == "__main__":
    main()
