"""The select split: items that choose the winner, never optimised, disjoint from search and test.

Real lm-eval tasks (the shipped gsm8k-shaped example and variants written to a temporary directory),
the tiny zoo's tokenizer; the end-to-end test runs the real console app on the tiny zoo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_user_tasks import EXAMPLE, _docs, _evaluator, _questions, _task_dir

from evomerge.errors import ConfigError
from evomerge.evaluation import Evaluator
from evomerge.evaluation.splits import Partition, SplitPlan, TaskSplits
from evomerge.search.winner import Candidate, choose
from evomerge.search.fitness import TaskSpec, parse_tasks

APP = [sys.executable, "-m", "evomerge.run.app"]


@pytest.fixture(scope="module")
def tokenizer(tiny_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_zoo.base)


def _sets(ev: Evaluator) -> dict[str, set[str]]:
    rec = ev.splits.record()["tasks"]["gsm8k_local"]
    return {s: set(rec[s]["sha256_16"]) for s in ("search", "select", "test")}


def _disjoint(sets: dict[str, set[str]]) -> None:
    assert all(sets.values())
    assert not sets["search"] & sets["select"] and not sets["search"] & sets["test"] and not sets["select"] & sets["test"]


def test_a_partition_gives_three_disjoint_seeded_shares_of_one_split(tokenizer):
    ev = _evaluator(tokenizer, EXAMPLE, TaskSplits(partition=Partition("test", 0.3, 0, select=0.2)))
    search, select, test = (_questions(ev, s) for s in ("search", "select", "test"))
    assert (len(search), len(select), len(test)) == (18, 12, 30)
    assert set(search) | set(select) | set(test) == {d["question"] for d in _docs("test")}
    _disjoint(_sets(ev))
    plain = _evaluator(tokenizer, EXAMPLE, TaskSplits(partition=Partition("test", 0.3, 0)))
    assert _questions(plain, "search") == search  # a select share leaves the search's items as they were
    assert not plain.splits.has("select") and ev.splits.has("select")
    with pytest.raises(ConfigError, match="no task select items"):
        plain.task_dict("select")


def test_select_items_carved_from_the_search_split_leave_the_search(tokenizer):
    ev = _evaluator(tokenizer, EXAMPLE, TaskSplits(search_split="train", select=10))
    train = {d["question"] for d in _docs("train")}
    search, select = set(_questions(ev, "search")), set(_questions(ev, "select"))
    assert len(select) == 10 and len(search) == 30 and search | select == train
    _disjoint(_sets(ev))
    rec = ev.splits.record()["tasks"]["gsm8k_local"]
    assert rec["select"]["split"] == "train" and rec["select"]["n"] == 10 and rec["select"]["ids"]
    again = _evaluator(tokenizer, EXAMPLE, TaskSplits(search_split="train", select=10))
    assert set(_questions(again, "select")) == select  # content-seeded: the same items in every process


def test_a_named_select_split_drops_its_test_items_and_the_search_drops_select_items(tokenizer, tmp_path):
    train, test = _docs("train"), _docs("test")
    d = _task_dir(tmp_path, splits={"train": train, "validation": train[:5] + test[:4] + test[40:50], "test": test})
    ev = _evaluator(tokenizer, d, TaskSplits(search_split="train", select_split="validation"))
    assert set(_questions(ev, "select")) == {x["question"] for x in train[:5] + test[40:50]} - {x["question"] for x in test}
    assert set(_questions(ev, "search")) == {x["question"] for x in train[5:]}
    _disjoint(_sets(ev))


def test_select_items_are_never_few_shot_examples(tokenizer):
    ev = _evaluator(tokenizer, EXAMPLE, TaskSplits(search_split="train", select=10, num_fewshot=3))
    select = set(_questions(ev, "select"))
    task = ev.task_dict("search")["tasks"]["gsm8k_local"]
    for doc in task.eval_docs[:10]:
        context = task.fewshot_context(doc, num_fewshot=3)
        assert not any(q in context for q in select)


@pytest.mark.parametrize("opts,needle", [
    (TaskSplits(search_split="train", select_split="test"), "select_split 'test' is also its test split"),
    (TaskSplits(search_split="train", select_split="dev"), "has no split 'dev'"),
    (TaskSplits(search_split="train", select=40), "select = 40.0 carves 40 of the search split's 40"),
    (TaskSplits(partition=Partition("test", 0.5, 0, select=0.5)), "search, select and test each need at least one"),
    (TaskSplits(partition=Partition("test", 0.3, 0, select=0.2), select=3), "partition.select and select"),
])
def test_select_problems_name_the_task_and_the_fix(tokenizer, opts, needle):
    ev = Evaluator(tokenizer, ["gsm8k_local"], include_paths=[str(EXAMPLE)], splits=SplitPlan({"gsm8k_local": opts}))
    with pytest.raises(ConfigError, match="gsm8k_local") as err:
        ev.splits.resolve(ev.task_manager)
    assert needle in str(err.value)


def test_every_task_has_select_items_or_none(tokenizer, tmp_path):
    other = _task_dir(tmp_path, "gsm8k_other")
    plan = SplitPlan({"gsm8k_local": TaskSplits(search_split="train", select=5),
                      "gsm8k_other": TaskSplits(search_split="train")})
    ev = Evaluator(tokenizer, ["gsm8k_local", "gsm8k_other"], include_paths=[str(EXAMPLE), str(other)], splits=plan)
    with pytest.raises(ConfigError, match="select items and gsm8k_other none"):
        ev.splits.resolve(ev.task_manager)


def test_the_tasks_config_reads_select_and_old_keys_hold():
    spec = parse_tasks({"group": "math_ll", "metric": "acc", "select": 0.3})
    assert spec.default_splits.select == 0.3 and spec.default_splits.select_split is None
    named = parse_tasks({"tasks": {"t": {"acc": 1.0, "search_split": "train", "select_split": "validation"}}})
    assert named.splits["t"].select_split == "validation" and named.tasks["t"] == {"acc": 1.0}
    part = parse_tasks({"tasks": {"t": {"acc": 1.0, "partition": {"split": "test", "search": 0.3, "select": 0.2}}}})
    assert part.splits["t"].partition == Partition("test", 0.3, 0, select=0.2)
    for bad, needle in (({"select": 1.5}, "tasks.select = 1.5"), ({"select": True}, "tasks.select = True"),
                        ({"partition": {"search": 0.3, "select": -1}}, "tasks.partition.select = -1")):
        with pytest.raises(ConfigError, match="tasks"):
            parse_tasks({"group": "math_ll", **bad})
        try:
            parse_tasks({"group": "math_ll", **bad})
        except ConfigError as exc:
            assert needle in str(exc)
    # a study's fitness key from before select existed: the same options give the same key
    old = TaskSpec("x", {"t": {"acc": 1.0}}, splits={"t": TaskSplits(search_split="train", partition=None)})
    assert old.options_key() == {"splits": {"t": {"search_split": "train", "test_split": None, "partition": None,
                                                  "num_fewshot": None, "overrides": {}}}}
    with_part = TaskSpec("x", {"t": {}}, splits={"t": TaskSplits(partition=Partition("test", 0.3, 0))})
    assert with_part.options_key()["splits"]["t"]["partition"] == {"split": "test", "search": 0.3, "seed": 0}


def _cand(n: int, *, search: float, full: float, select: float | None, baseline: str | None = None) -> Candidate:
    return Candidate(number=n, label=baseline or f"trial {n}", baseline=baseline, params={}, seed=0, search=search,
                     values=[search], search_full=full, se=0.001, test=0.5, select=select)


def test_the_winner_is_chosen_on_select_when_there_is_one():
    top = [_cand(3, search=0.9, full=0.9, select=0.70), _cand(4, search=0.8, full=0.8, select=0.75)]
    base = [_cand(0, search=0.7, full=0.7, select=0.72, baseline="textbook")]
    assert choose(top, base, margin_se=1.0).number == 4  # best on select, not on search
    assert top[1].chosen_on == "select" and top[1].as_dict()["select_fitness"] == 0.75
    top[1].select = 0.7205  # within the noise of the baseline on select: the baseline is kept
    assert choose(top, base, margin_se=1.0).number == 0
    no_select = [_cand(3, search=0.9, full=0.9, select=None), _cand(4, search=0.8, full=0.8, select=None)]
    assert choose(no_select, [_cand(0, search=0.7, full=0.7, select=None, baseline="textbook")], 1.0).number == 3
    assert no_select[0].chosen_on == "search_full"


@pytest.mark.slow
def test_a_search_with_select_items_chooses_there_and_says_so(tiny_zoo, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([*APP, "+search=ties_math", "search.n_trials=4", "search.limit=20", "progress=false",
                           "final.top_k=1", "tasks.select=40", f"final.score_cache={tmp_path / 'scores'}",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["split_roles"] == {"search": "optimised", "select": "chose the winner", "test": "reported only"}
    assert "select-split fitness" in summary["winner_rule"]
    everyone = [summary["best"], *summary["baselines"].values(), *summary["top"]]
    assert all(c["select_fitness"] is not None and c["chosen_on"] == "select" for c in everyone)
    best = summary["best"]
    others = [c for c in everyone if c["trial"] != best["trial"]]
    assert best["select_fitness"] >= max(c["select_fitness"] for c in others if c["baseline"]) or best["baseline"]
    splits = json.loads((run_dir / "splits.json").read_text())["tasks"]
    for rec in splits.values():
        sets = {s: set(rec[s]["sha256_16"]) for s in ("search", "select", "test")}
        _disjoint(sets)
        assert rec["select"]["n"] == 40 and rec["select"]["split"] == "search"
    report = (run_dir / "report.md").read_text()
    assert "select: chose the winner" in report and "select (chose)" in report
    card = (run_dir / "best/model/README.md").read_text()
    assert "select (never optimised; chose the winner)" in card and f"{best['select_fitness']:.4f}" in card
    assert "select: never optimised, chose the winner" in proc.stdout
    import csv

    rows = {int(r["number"]): r for r in csv.DictReader((run_dir / "trials.csv").open())}
    assert all(float(rows[c["trial"]]["select_fitness"]) == pytest.approx(c["select_fitness"]) for c in everyone)
    # the select split was scored item by item: the winner rule weighed a paired difference, and says so
    comp = summary["comparison"]
    assert comp["paired"] is True and comp["on"] == "select" and comp["se"] > 0 and "paired" in summary["winner_rule"]
    import optuna

    from evomerge.search import record

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{run_dir / 'study.db'}")
    final = record.final_scores(study)[best["trial"]]
    assert {t: len(v) for t, v in final.chosen_items.items()} == {t: 40 for t in splits}
    assert sum(sum(v) / len(v) for v in final.chosen_items.values()) / len(splits) == pytest.approx(best["select_fitness"])
    # the test split too, item by item: the held-out report pairs the winner with the best other hand-set recipe
    assert sum(sum(v) / len(v) for v in final.test_items.values()) / len(splits) == pytest.approx(best["test_fitness"])
    held = summary["held_out"]
    others = {k: v["test_fitness"] for k, v in summary["baselines"].items() if v["trial"] != best["trial"]}
    assert held["winner"] == best["label"] and held["baseline"] == max(others, key=others.get)
    assert held["difference"] == pytest.approx(best["test_fitness"] - max(others.values())) and held["paired"] is True
    assert "held out:" in proc.stdout and "Held out:" in report


def test_the_margin_is_paired_over_the_same_items_where_both_kept_them():
    """Two recipes that differ on 6 of 200 items, always the candidate's way: an unpaired margin (each one's own
    binomial noise) calls a 0.03 gain noise; paired over the same items its standard error is 0.012."""
    from evomerge.search.fitness import paired_se
    from evomerge.search.winner import comparison, margin_of

    base_items = [1.0] * 150 + [0.0] * 50
    cand_items = [1.0] * 156 + [0.0] * 44  # the baseline's right answers, and 6 more
    base = _cand(0, search=0.75, full=0.75, select=0.75, baseline="textbook")
    cand = _cand(5, search=0.78, full=0.78, select=0.78)
    base.se = cand.se = (0.75 * 0.25 / 200) ** 0.5  # about 0.031 each: unpaired, the difference's SE is 0.043
    assert choose([cand], [base], margin_se=1.0).number == 0
    base.items, cand.items = {"t": base_items}, {"t": cand_items}
    d = [c - b for c, b in zip(cand_items, base_items)]
    mean = sum(d) / 200
    assert paired_se(cand.items, base.items) == pytest.approx((sum((x - mean) ** 2 for x in d) / 199 / 200) ** 0.5)
    assert margin_of(cand, base) == (pytest.approx(0.0121, abs=1e-4), True)
    assert choose([cand], [base], margin_se=1.0).number == 5
    assert comparison([cand], [base]) == {"searched": "trial 5", "baseline": "textbook", "on": "select",
                                          "difference": pytest.approx(0.03), "se": pytest.approx(0.0121, abs=1e-4),
                                          "paired": True}
    base.items = {"t": base_items[:100]}  # items that do not line up: the unpaired margin again
    assert paired_se(cand.items, base.items) is None and choose([cand], [base], margin_se=1.0).number == 0
    assert comparison([cand], [base])["paired"] is False


def test_the_held_out_report_pairs_the_winner_with_the_best_other_baseline_on_test():
    """Reported after the choice, never used for it: the hardest baseline is the best by test, the winner itself
    excluded when it is a baseline; paired where both kept their test items."""
    from evomerge.search.fitness import paired_se
    from evomerge.search.winner import held_out

    win = _cand(5, search=0.8, full=0.8, select=0.8)
    a = _cand(0, search=0.7, full=0.7, select=0.7, baseline="alone:add")
    b = _cand(1, search=0.7, full=0.7, select=0.7, baseline="textbook:ties")
    win.test, a.test, b.test = 0.78, 0.70, 0.75
    assert held_out(win, [a, b]) == {"winner": "trial 5", "baseline": "textbook:ties", "difference": pytest.approx(0.03),
                                     "se": None, "paired": False}
    win.test_items, b.test_items = {"t": [1.0] * 78 + [0.0] * 22}, {"t": [1.0] * 75 + [0.0] * 25}
    got = held_out(win, [a, b])
    assert got["paired"] is True and got["se"] == pytest.approx(paired_se(win.test_items, b.test_items))
    assert held_out(b, [a, b])["baseline"] == "alone:add"  # a baseline that won is weighed against the others
    assert held_out(None, [a, b]) is None and held_out(win, []) is None
