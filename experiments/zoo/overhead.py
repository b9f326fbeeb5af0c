"""Per-call overhead of Evaluator.evaluate outside the model's forward passes.

A search calls evaluate() hundreds of times; everything but the forward passes
(building requests, batching, filters, metrics) is overhead. Measured by timing
every top-level model forward with hooks and subtracting it from the call's wall
time, after a warm-up call (the first call of a split builds its task dict).

    python experiments/zoo/overhead.py tiny [--limit 100] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evomerge.evaluation import Evaluator  # noqa: E402
from evomerge.zoo import load_zoo  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("zoo", choices=["tiny", "smol"])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tasks", default="all,all_ll")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = load_zoo(args.zoo)
    tasks = [t for g in args.tasks.split(",") for t in zoo.tasks[g]]
    tok = AutoTokenizer.from_pretrained(zoo.base)
    model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32)
    t0 = time.perf_counter()
    ev = Evaluator(tok, tasks, include_paths=[str(zoo.task_dir)], batch_size=32)
    print(f"Evaluator() with {len(tasks)} tasks: {time.perf_counter() - t0:.2f} s")
    spent = {"fwd": 0.0, "start": 0.0, "depth": 0}

    def pre(_m, _a):
        spent["start"] = time.perf_counter()

    def post(_m, _a, _o):
        spent["fwd"] += time.perf_counter() - spent["start"]

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)
    t0 = time.perf_counter()
    ev.evaluate(model, "search", limit=args.limit)
    print(f"first call (builds the search task dict and the HFLM wrapper): {time.perf_counter() - t0:.2f} s")
    totals, overheads = [], []
    for _ in range(args.reps):
        spent["fwd"] = 0.0
        t0 = time.perf_counter()
        ev.evaluate(model, "search", limit=args.limit)
        total = time.perf_counter() - t0
        totals.append(total)
        overheads.append(total - spent["fwd"])
    n = len(tasks) * args.limit
    print(f"{len(tasks)} tasks x {args.limit} items, {args.reps} calls: total {statistics.median(totals):.3f} s, "
          f"outside forward passes {statistics.median(overheads):.3f} s per call "
          f"({1000 * statistics.median(overheads) / n:.2f} ms per item)")


if __name__ == "__main__":
    main()
