"""Score every zoo model on every zoo task: the table in results/zoo.md.

Why one model object for all rows: the Evaluator wraps a live model once; loading
each zoo member's weights into that same object in place is both the fastest way
to score many models and the exact situation a merge search is in (weights swap
between calls), so the table doubles as an end-to-end check of that path.

The "uniform average" row is the plain mean of the specialists' weights (a model
soup): the reference any merge recipe found by the search should beat.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from evomerge.zoo.build import Zoo


@dataclass
class ZooTable:
    zoo: str
    split: str
    rows: dict[str, dict[str, float]]          # model -> column -> value
    columns: list[str]
    seconds: float
    n_items: dict[str, int] = field(default_factory=dict)

    def markdown(self) -> str:
        head = "| model | " + " | ".join(self.columns) + " |"
        rule = "|---|" + "---:|" * len(self.columns)
        body = []
        for model, row in self.rows.items():
            best = {c: max(r[c] for r in self.rows.values()) for c in self.columns}
            cells = [f"**{row[c]:.3f}**" if row[c] == best[c] else f"{row[c]:.3f}" for c in self.columns]
            body.append(f"| {model} | " + " | ".join(cells) + " |")
        return "\n".join([head, rule, *body])


def _column(task: str, metrics: dict[str, float]) -> tuple[str, float]:
    metric = "acc" if "acc" in metrics else "exact_match" if "exact_match" in metrics else sorted(metrics)[0]
    return f"{task.removeprefix('evomerge_')} ({'ll acc' if metric == 'acc' else 'em' if metric == 'exact_match' else metric})", metrics[metric]


def zoo_table(
    zoo: Zoo,
    *,
    split: str = "test",
    limit: int | float | None = None,
    batch_size: int = 32,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> ZooTable:
    """Evaluate base, each specialist and their uniform average on every zoo task."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation import Evaluator

    t0 = time.perf_counter()
    tasks = zoo.tasks["all"] + zoo.tasks["all_ll"]
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=dtype or torch.float32)
    evaluator = Evaluator(tokenizer, tasks, include_paths=[str(zoo.task_dir)], batch_size=batch_size)

    def weights(path) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(path.glob("*.safetensors")):
            state.update(load_file(shard))
        return state

    members = zoo.models()
    sources = {name: (lambda p=p: weights(p)) for name, p in members.items()}

    def uniform() -> dict[str, torch.Tensor]:
        states = [weights(p) for p in zoo.specialists.values()]
        return {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}

    sources["uniform average"] = uniform
    rows: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    for name, get in tqdm(sources.items(), desc=f"{zoo.name} table", disable=not progress):
        with torch.no_grad():
            missing, unexpected = model.load_state_dict(get(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"{name}: weights do not match the base architecture")
        results = evaluator.evaluate(model, split=split, limit=limit)
        row = dict(_column(t, results[t]) for t in tasks if t in results)
        math_cols = [_column(t, results[t])[0] for t in zoo.tasks.get("math", []) if t in results]
        if math_cols:
            row["math mean (em)"] = sum(row[c] for c in math_cols) / len(math_cols)
        rows[name] = row
        columns = list(row)
    # put the headline column first after the exact-match columns
    if "math mean (em)" in columns:
        columns.remove("math mean (em)")
        n_em = sum(1 for c in columns if c.endswith("(em)"))
        columns.insert(n_em, "math mean (em)")
    n_items = {t: int(len(evaluator.task_dict(split)["tasks"][t].eval_docs)) for t in tasks}
    return ZooTable(zoo.name, split, rows, columns, time.perf_counter() - t0, n_items)
