"""Write the gsm8k-shaped example data (``data/train.jsonl``, ``data/test.jsonl``).

Each line is a gsm8k document: ``question`` and ``answer``, the answer's worked steps
ending in ``#### N`` as gsm8k's do. The problems are generated from a seed, so rerunning
this script rewrites the same files: ``python examples/gsm8k_local/make_data.py``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade"]
THINGS = ["apples", "books", "coins", "pens", "shells", "stamps"]


def problem(rng: random.Random) -> dict[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(1, 9)
    if rng.random() < 0.5:
        total = a + b - c
        question = (f"{name} has {a} {thing}. {name} gets {b} more and gives {c} away. "
                    f"How many {thing} does {name} have now?")
        answer = f"{name} has {a} + {b} = {a + b} {thing}.\nAfter giving {c} away: {a + b} - {c} = {total}.\n#### {total}"
    else:
        total = a * c + b
        question = (f"{name} buys {c} bags of {a} {thing} and finds {b} more. "
                    f"How many {thing} does {name} have?")
        answer = f"The bags hold {c} * {a} = {a * c} {thing}.\nWith the {b} found: {a * c} + {b} = {total}.\n#### {total}"
    return {"question": question, "answer": answer}


def main() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    docs: list[dict[str, str]] = []
    while len(docs) < 100:
        doc = problem(rng)
        if doc["question"] not in seen:  # a question belongs to one split only
            seen.add(doc["question"])
            docs.append(doc)
    out = Path(__file__).resolve().parent / "data"
    out.mkdir(exist_ok=True)
    for split, rows in (("train", docs[:40]), ("test", docs[40:])):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in rows))


if __name__ == "__main__":
    main()
