"""Per-candidate cost of the in-memory layer stack at the SmolLM2-135M shape (random weights, no zoo needed).

    python experiments/bench_stack.py [--candidates 8]

Two random 30-layer models of SmolLM2-135M's shape are saved to a temporary folder; a StackEngine holds both
and re-wires its live model to random data-flow stacks (two passes, three slots in four kept, half of them
scaled), as a search's candidates would be. Prints the median re-wiring time (StackEngine.apply).
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.engine.stack import StackEngine
from evomerge.search.dataflow import Slot, stack_recipe

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=int, default=8)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_stack_"))
    try:
        dirs = []
        for i in range(2):
            torch.manual_seed(i)
            d = root / f"m{i}"
            LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(d)
            dirs.append(str(d))
        start = time.perf_counter()
        engine = StackEngine(dirs)
        print(f"two residents loaded in {time.perf_counter() - start:.2f} s")
        rng = random.Random(0)
        times, sizes = [], []
        for _ in range(a.candidates):
            seq = [Slot(rng.choice("ab"), l, rng.choice([1.0, round(rng.uniform(0.5, 1.5), 6)]))
                   for _ in range(2) for l in range(SHAPE["num_hidden_layers"]) if rng.random() < 0.75]
            times.append(engine.apply(stack_recipe(seq, {"a": dirs[0], "b": dirs[1]})).seconds)
            sizes.append(len(seq))
        print(f"re-wiring: median {statistics.median(times):.3f} s over {len(times)} candidates "
              f"({min(sizes)}-{max(sizes)} layers; each {', '.join(f'{t:.3f}' for t in times)})")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
