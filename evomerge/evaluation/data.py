"""The project's own skills: generated, seeded, with disjoint train / search / test items.

Why generate instead of download: evomerge runs offline, and a merge search needs
skills whose specialists differ sharply and whose scores are exact. Every item is a
pure function of (skill, seed), so the zoo's training data, the search split the
optimiser sees and the held-out test split are reproducible anywhere and provably
disjoint: an item is identified by its prompt, and a prompt belongs to one split.

Skills (prompt -> answer):

* ``add``: two-digit addition, ``47+35=`` -> ``82`` (8,100 possible items)
* ``sub``: two-digit subtraction with a non-negative result, ``83-35=`` -> ``48``
  (4,095 possible items)
* ``mul``: three-digit by one-digit multiplication, ``347*6=`` -> ``2082``
  (7,200 possible items)
* ``rev``: reverse a lower-case word of 3-6 letters, ``rev(abcd)=`` -> ``dcba``
  (non-math; more than 300 million possible items)

Each skill has :data:`N_SEARCH` = 300 search items and :data:`N_TEST` = 500 test items
unless a zoo asks for other counts (:class:`ItemCounts`; the smol zoo holds more search
items, so that a select split can tell small gains apart). With 500 paired items a 5-point
gap between two models is about 2.2 standard errors or more (paired binomial, worst case),
which is why the test split is that size. The test items are drawn first, so a zoo with more
search items has the same test items and the same first search items as one with fewer.
Each item also carries three near-miss distractors for the log-likelihood
(multiple-choice) variant of the task.
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

N_SEARCH = 300
N_TEST = 500
SPLITS = ("search", "test")


@dataclass(frozen=True)
class ItemCounts:
    """How many generated items each split of a skill holds. A zoo fixes them before it trains (its
    specialists never see one of them), so other counts mean another zoo, rebuilt."""

    search: int = N_SEARCH
    test: int = N_TEST

    def __post_init__(self) -> None:
        if self.search < 1 or self.test < 1:
            raise ValueError(f"item counts must be positive, got search={self.search}, test={self.test}")

    def as_dict(self) -> dict[str, int]:
        """As the zoo's spec and manifest record them (``ItemCounts(**d)`` reads them back)."""
        return {"search": self.search, "test": self.test}


@dataclass(frozen=True)
class Skill:
    name: str
    kind: str  # "math" or "text"
    sample: Callable[[random.Random], tuple[str, str]]
    distractors: Callable[[random.Random, str, str], list[str]]
    doc: str


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}=", str(a + b)


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", str(a - b)


def _mul(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(2, 9)
    return f"{a}*{b}=", str(a * b)


def _rev(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"rev({word})=", word[::-1]


def _number_distractors(rng: random.Random, prompt: str, answer: str) -> list[str]:
    """Near misses a model that half-knows the skill would produce: off by one digit."""
    n = int(answer)
    cands = {n + d for d in (-1, 1, -2, 2, -10, 10, -100, 100)}
    if len(answer) >= 2:
        cands.add(int(answer[:-2] + answer[-1] + answer[-2]))
    cands = sorted(c for c in cands if c >= 0 and c != n)
    return [str(c) for c in rng.sample(cands, 3)]


def _text_distractors(rng: random.Random, prompt: str, answer: str) -> list[str]:
    """Copy instead of reverse, one adjacent swap, one rotation: the usual failures."""
    word = answer[::-1]
    cands = {word, answer[1:] + answer[0], answer[-1] + answer[:-1]}
    for i in range(len(answer) - 1):
        cands.add(answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :])
    for i in range(len(answer)):  # one wrong letter keeps every word well supplied
        cands.add(answer[:i] + chr((ord(answer[i]) - 97 + 1) % 26 + 97) + answer[i + 1 :])
    cands.discard(answer)
    return rng.sample(sorted(cands), 3)


SKILLS: dict[str, Skill] = {
    "add": Skill("add", "math", _add, _number_distractors, "two-digit addition"),
    "sub": Skill("sub", "math", _sub, _number_distractors, "two-digit subtraction, non-negative result"),
    "mul": Skill("mul", "math", _mul, _number_distractors, "three-digit by one-digit multiplication"),
    "rev": Skill("rev", "text", _rev, _text_distractors, "reverse a 3-6 letter word"),
}


def _add_easy(rng: random.Random) -> tuple[str, str]:
    """Two-digit addition without a carry: digit-wise sums only."""
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if a % 10 + b % 10 < 10 and a // 10 + b // 10 < 10:
            return f"{a}+{b}=", str(a + b)


def _sub_easy(rng: random.Random) -> tuple[str, str]:
    """Two-digit subtraction without a borrow."""
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        a, b = max(a, b), min(a, b)
        if a % 10 >= b % 10:
            return f"{a}-{b}=", str(a - b)


def _digit_facts(rng: random.Random) -> tuple[str, str]:
    """One-digit addition and subtraction facts, the carries and borrows included."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"{a}+{b}=", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", str(a - b)


def _copy(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"cp({word})=", word


def _spelled(skill: str, name: str) -> Callable[[random.Random], tuple[str, str, str]]:
    """The skill's problems written as a function call, ``add(47,35)=`` for ``47+35=``.

    Returns (prompt, answer, key): the key is the task-format prompt, so a problem
    held out of training in one format is held out in every format.
    """
    def sample(rng: random.Random) -> tuple[str, str, str]:
        prompt, answer = SKILLS[skill].sample(rng)
        a, b = prompt[:-1].replace("+", " ").replace("-", " ").replace("*", " ").split()
        return f"{name}({a},{b})=", answer, prompt
    return sample


# Not tasks: the easier material a zoo base is pretrained on, so that it knows the
# format, digit-wise arithmetic and copying, and each specialist only has to learn
# what is specific to its skill (carrying, borrowing, reversing).
CORPUS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add_easy": _add_easy,
    "sub_easy": _sub_easy,
    "digit_facts": _digit_facts,
    "copy": _copy,
    "add_fn": _spelled("add", "add"),
    "sub_fn": _spelled("sub", "sub"),
}


def _rng(seed: int, *parts: str) -> random.Random:
    # str seeds hash deterministically (sha512) across processes, unlike hash().
    return random.Random(f"{seed}/" + "/".join(parts))


def eval_items(skill: str, seed: int = 0, counts: ItemCounts = ItemCounts()) -> dict[str, list[dict]]:
    """The search and test items of a skill: split -> list of documents (``counts`` of each).

    Documents are lm-eval docs: ``prompt``, ``answer``, ``choices`` (answer plus three
    distractors, shuffled) and ``label`` (index of the answer in ``choices``).
    """
    sk = SKILLS[skill]
    rng = _rng(seed, "eval", skill)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in (("test", counts.test), ("search", counts.search)):
        docs: list[dict] = []
        while len(docs) < n:
            prompt, answer = sk.sample(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            choices = [answer, *sk.distractors(rng, prompt, answer)]
            rng.shuffle(choices)
            docs.append({"prompt": prompt, "answer": answer, "choices": choices,
                         "label": choices.index(answer)})
        out[split] = docs
    return out


def held_out_prompts(skills: list[str], seed: int = 0, counts: ItemCounts = ItemCounts()) -> set[str]:
    """Every prompt in any search or test split: training must never see these."""
    return {d["prompt"] for s in skills for docs in eval_items(s, seed, counts).values() for d in docs}


def train_items(skill: str, n: int, seed: int, exclude: set[str]) -> list[tuple[str, str]]:
    """``n`` training pairs of a skill or corpus item kind (repeats allowed), none in ``exclude``."""
    sample = SKILLS[skill].sample if skill in SKILLS else CORPUS[skill]
    rng = _rng(seed, "train", skill)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        prompt, answer, *key = sample(rng)
        if (key[0] if key else prompt) not in exclude:
            out.append((prompt, answer))
    return out


def write_eval_data(out_dir: Path, skills: list[str], seed: int = 0,
                    counts: ItemCounts = ItemCounts()) -> dict[str, dict[str, Path]]:
    """Write ``<out_dir>/<skill>/<split>.jsonl``; returns skill -> split -> absolute path."""
    paths: dict[str, dict[str, Path]] = {}
    for skill in skills:
        paths[skill] = {}
        for split, docs in eval_items(skill, seed, counts).items():
            p = (out_dir / skill / f"{split}.jsonl").resolve()
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps(d) + "\n" for d in docs))
            paths[skill][split] = p
    return paths
