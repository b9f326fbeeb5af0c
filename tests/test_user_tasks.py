"""Any lm-eval task drives a search: named splits, seeded partitions, shots, filters, chat templates.

Real lm-eval tasks (the shipped gsm8k-shaped example and variants of it written to a temporary
directory), real TaskManager, the tiny zoo's tokenizer and models; the end-to-end test runs the
real console app on the tiny zoo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.evaluation import Evaluator
from evomerge.evaluation.splits import Partition, SplitPlan, TaskSplits, doc_digest
from evomerge.search.fitness import parse_tasks

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "gsm8k_local"
APP = [sys.executable, "-m", "evomerge.run.app"]


def _docs(split: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLE / "data" / f"{split}.jsonl").read_text().splitlines()]


def _task_dir(tmp: Path, name: str = "gsm8k_local", *, splits: dict[str, list[dict]] | None = None,
              **changes) -> Path:
    """A copy of the example task, with other data and config keys (None deletes a key)."""
    d = tmp / name
    (d / "data").mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((EXAMPLE / "gsm8k_local.yaml").read_text())
    cfg["task"] = name
    splits = splits or {"train": _docs("train"), "test": _docs("test")}
    for split, docs in splits.items():
        (d / "data" / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    cfg["dataset_kwargs"] = {"data_files": {s: f"data/{s}.jsonl" for s in splits}}
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return d


@pytest.fixture(scope="module")
def tokenizer(tiny_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_zoo.base)


def _evaluator(tokenizer, task_dir: Path, opts: TaskSplits, name: str = "gsm8k_local", **kw) -> Evaluator:
    ev = Evaluator(tokenizer, [name], include_paths=[str(task_dir)], splits=SplitPlan({name: opts}), **kw)
    ev.splits.resolve(ev.task_manager)
    return ev


def _questions(ev: Evaluator, split: str, name: str = "gsm8k_local") -> list[str]:
    return [d["question"] for d in ev.task_dict(split)["tasks"][name].eval_docs]


# ---- where the items come from ----------------------------------------------------------------------
def test_a_named_split_is_the_search_and_the_tasks_own_test_split_is_held_out(tokenizer):
    ev = _evaluator(tokenizer, EXAMPLE, TaskSplits(search_split="train"))
    assert _questions(ev, "search") == [d["question"] for d in _docs("train")]
    assert _questions(ev, "test") == [d["question"] for d in _docs("test")]
    rec = ev.splits.record()["tasks"]["gsm8k_local"]
    assert rec["search"]["split"] == "train" and rec["test"]["split"] == "test"
    assert rec["search"]["ids"] == list(range(40)) and rec["test"]["ids"] == list(range(60))
    assert rec["test"]["sha256_16"] == [doc_digest(d) for d in _docs("test")]
    assert not set(rec["search"]["sha256_16"]) & set(rec["test"]["sha256_16"])


def test_a_search_item_equal_to_a_test_item_is_dropped_from_the_search(tokenizer, tmp_path):
    test = _docs("test")
    d = _task_dir(tmp_path, splits={"train": _docs("train")[:10] + test[:3], "test": test})
    ev = _evaluator(tokenizer, d, TaskSplits(search_split="train"))
    assert set(_questions(ev, "search")) == {x["question"] for x in _docs("train")[:10]}
    assert ev.splits.record()["tasks"]["gsm8k_local"]["dropped_from_search"] == 3


def test_a_partition_is_seeded_disjoint_complete_and_follows_content_not_file_order(tokenizer, tmp_path):
    one = _evaluator(tokenizer, EXAMPLE, TaskSplits(partition=Partition("test", 0.3, 0)))
    search, test = _questions(one, "search"), _questions(one, "test")
    assert len(search) == 18 and len(test) == 42
    assert not set(search) & set(test) and set(search) | set(test) == {d["question"] for d in _docs("test")}
    again = _evaluator(tokenizer, EXAMPLE, TaskSplits(partition=Partition(None, 0.3, 0)))  # null: the task's test split
    assert _questions(again, "search") == search
    other_seed = _evaluator(tokenizer, EXAMPLE, TaskSplits(partition=Partition("test", 0.3, 1)))
    assert set(_questions(other_seed, "search")) != set(search)
    shuffled = _task_dir(tmp_path, splits={"train": _docs("train"), "test": _docs("test")[::-1]})
    reordered = _evaluator(tokenizer, shuffled, TaskSplits(partition=Partition("test", 0.3, 0)))
    assert set(_questions(reordered, "search")) == set(search)
    count = _evaluator(tokenizer, EXAMPLE, TaskSplits(partition=Partition("test", 5, 0)))
    assert len(_questions(count, "search")) == 5
    rec = one.splits.record()["tasks"]["gsm8k_local"]
    assert rec["how"] == "partition" and rec["search"]["split"] == rec["test"]["split"] == "test"
    assert sorted(rec["search"]["ids"] + rec["test"]["ids"]) == list(range(60))


@pytest.mark.parametrize("opts,needle", [
    (TaskSplits(), "has no split 'search' (its data has 'train', 'test')"),
    (TaskSplits(search_split="validation"), "has no split 'validation'"),
    (TaskSplits(search_split="test"), "search_split and test_split are both 'test'"),
    (TaskSplits(search_split="train", test_split="dev"), "has no split 'dev'"),
    (TaskSplits(partition=Partition("test", 60, 0)), "both sides need at least one"),
    (TaskSplits(partition=Partition("test", 0.3, 0), test_split="train"), "partition.split 'test' and test_split 'train'"),
])
def test_split_problems_are_one_paragraph_naming_the_task_and_the_fix(tokenizer, opts, needle):
    ev = Evaluator(tokenizer, ["gsm8k_local"], include_paths=[str(EXAMPLE)], splits=SplitPlan({"gsm8k_local": opts}))
    with pytest.raises(ConfigError) as err:
        ev.splits.resolve(ev.task_manager)
    assert needle in str(err.value) and "gsm8k_local" in str(err.value) and "\n" not in str(err.value)


# ---- few-shot examples --------------------------------------------------------------------------------
def _shots(context: str, n: int) -> list[str]:
    blocks = context.split("\n\n")
    assert len(blocks) == n + 1, context
    return [b.split("\n")[0].removeprefix("Question: ") for b in blocks[:-1]]


def _contexts(ev: Evaluator, split: str, limit: int | None = None) -> dict[str, str]:
    task = ev.task_dict(split)["tasks"]["gsm8k_local"]
    task.build_all_requests(limit=limit)
    return {inst.doc["question"]: inst.args[0] for inst in task._instances}


def test_shots_come_from_the_train_split_never_the_item_and_are_the_same_in_every_process(tokenizer):
    ev = _evaluator(tokenizer, EXAMPLE, TaskSplits(search_split="train", num_fewshot=3))
    train = {d["question"] for d in _docs("train")}
    for split in ("search", "test"):
        for question, ctx in _contexts(ev, split).items():
            shots = _shots(ctx, 3)
            assert set(shots) <= train and question not in shots and ctx.endswith(f"Question: {question}\nAnswer:")
    again = _evaluator(tokenizer, EXAMPLE, TaskSplits(search_split="train", num_fewshot=3))
    assert _contexts(again, "test", limit=10) == {q: c for q, c in list(_contexts(ev, "test").items())[:10]}
    assert ev.splits.record()["tasks"]["gsm8k_local"]["shots"] == {
        "num_fewshot": 3, "pool": 40, "test_items_removed": 0, "from": "train"}


def test_shots_of_a_one_split_task_are_search_items_never_test_items(tokenizer, tmp_path):
    d = _task_dir(tmp_path, splits={"test": _docs("test")}, training_split=None, fewshot_split=None)
    ev = _evaluator(tokenizer, d, TaskSplits(partition=Partition("test", 0.3, 0), num_fewshot=2))
    search, test = set(_questions(ev, "search")), set(_questions(ev, "test"))
    for split in ("search", "test"):
        for question, ctx in _contexts(ev, split).items():
            shots = _shots(ctx, 2)
            assert set(shots) <= search and question not in shots
    assert ev.splits.record()["tasks"]["gsm8k_local"]["shots"]["test_items_removed"] == len(test)
    ev = Evaluator(tokenizer, ["gsm8k_local"], include_paths=[str(d)],
                   splits=SplitPlan({"gsm8k_local": TaskSplits(partition=Partition("test", 2, 0), num_fewshot=2)}))
    with pytest.raises(ConfigError, match="num_fewshot = 2 needs more than 2 examples outside the test items"):
        ev.splits.resolve(ev.task_manager)


# ---- generation, filters, chat templates --------------------------------------------------------------
class _Answers:
    """An lm-eval LM (its documented interface) that answers each question from a table: to see the task's
    regex filter and exact match at work on the items the plan chose."""

    def __new__(cls, answers: dict[str, str]):
        from lm_eval.api.model import LM

        class Table(LM):
            def generate_until(self, requests, disable_tqdm: bool = False):
                out = []
                for r in requests:
                    question = r.args[0].rsplit("Question: ", 1)[1].split("\nAnswer:")[0]
                    out.append(" " + answers.get(question, "I do not know.\n#### -1"))
                return out

            def loglikelihood(self, requests, disable_tqdm: bool = False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                raise NotImplementedError

        return Table()


def test_the_regex_filter_and_exact_match_score_the_plans_items(tokenizer):
    from lm_eval.evaluator import evaluate

    ev = _evaluator(tokenizer, EXAMPLE, TaskSplits(partition=Partition("test", 0.3, 0)))
    test_docs = ev.task_dict("test")["tasks"]["gsm8k_local"].eval_docs
    answers = {d["question"]: d["answer"].replace("#### ", "so the answer is:\n#### ") for d in test_docs[:21]}
    out = evaluate(lm=_Answers(answers), task_dict=ev.task_dict("test"), bootstrap_iters=0)
    assert out["results"]["gsm8k_local"]["exact_match,strict-match"] == pytest.approx(21 / 42)
    out = evaluate(lm=_Answers(answers), task_dict=ev.task_dict("search"), bootstrap_iters=0)
    assert out["results"]["gsm8k_local"]["exact_match,strict-match"] == 0.0  # none of the search items is answered


def test_a_builtin_task_reads_local_data_through_overrides_and_keeps_its_filters(tokenizer):
    """lm-eval's own gsm8k (two filters: strict-match and flexible-extract) on the example's files."""
    from evomerge.search.preflight import check_metrics

    spec = parse_tasks({"tasks": {"gsm8k": {"exact_match": 1.0, "filter": "flexible-extract", "search_split": "train",
                                            "num_fewshot": 2, "overrides": {
                                                "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {
                                                    "data_files": {s: str(EXAMPLE / "data" / f"{s}.jsonl")
                                                                   for s in ("train", "test")}}}}}})
    assert spec.tasks == {"gsm8k": {"exact_match,flexible-extract": 1.0}}
    ev = Evaluator(tokenizer, ["gsm8k"], splits=spec.split_plan())
    ev.splits.resolve(ev.task_manager)
    assert ev.splits.counts() == {"gsm8k": {"search": 40, "test": 60}}
    assert check_metrics(spec, ev.splits.loaded_tasks()) == []
    bad = parse_tasks({"tasks": {"gsm8k": {"exact_match": 1.0, "filter": "no-such-filter"}}})
    (problem,) = check_metrics(bad, ev.splits.loaded_tasks())
    assert "exact_match,strict-match, exact_match,flexible-extract" in problem


def test_apply_chat_template_renders_the_prompt_through_the_tokenizers_template(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(tiny_zoo.base)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    tok.save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ev = _evaluator(tok, EXAMPLE, TaskSplits(search_split="train"), apply_chat_template=True, max_gen_toks=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo.base)
    res = ev.evaluate(model, split="test", limit=2)
    assert set(res["gsm8k_local"]) == {"exact_match"}
    prompt = ev.task_dict("test")["tasks"]["gsm8k_local"]._instances[0].args[0]
    assert prompt.startswith("<user>Question: ") and prompt.endswith("Answer:<assistant>"), prompt


# ---- the tasks config ---------------------------------------------------------------------------------
def test_the_tasks_config_is_typed_once_with_group_defaults_and_per_task_options():
    spec = parse_tasks({"search_split": "train", "num_fewshot": 1, "tasks": {
        "a": {"acc": 1.0},
        "b": {"exact_match": 2.0, "partition": {"split": "test", "search": 0.25, "seed": 3}},
        "c": {"acc": 1.0, "search_split": "validation", "num_fewshot": 0}}})
    assert spec.tasks == {"a": {"acc": 1.0}, "b": {"exact_match": 2.0}, "c": {"acc": 1.0}}
    assert spec.splits["a"] == TaskSplits(search_split="train", num_fewshot=1)
    assert spec.splits["b"].partition == Partition("test", 0.25, 3) and spec.splits["b"].num_fewshot == 1
    assert spec.splits["c"] == TaskSplits(search_split="validation", num_fewshot=0)
    assert parse_tasks({"tasks": {"a": {"acc": 1.0}}}).options_key() == {}  # old studies keep their fingerprints
    assert parse_tasks({"tasks": {"a": {"acc": 1.0}}, "search_split": "train"}).options_key() != {}


@pytest.mark.parametrize("cfg,needle", [
    ({"tasks": {"a": {"acc": "high"}}}, "tasks.tasks.a must map metric names to numeric weights"),
    ({"tasks": {"a": {"acc": 1, "partition": {"search": 1.5}}}}, "tasks.tasks.a.partition.search = 1.5"),
    ({"tasks": {"a": {"acc": 1, "partition": {"share": 0.3}}}}, "tasks.tasks.a.partition = "),
    ({"tasks": {"a": {"acc": 1, "num_fewshot": -1}}}, "tasks.tasks.a.num_fewshot = -1"),
    ({"tasks": {"a": {"acc": 1, "overrides": {"test_split": "x"}}}}, "tasks.tasks.a.overrides.test_split: set by evomerge"),
    ({"tasks": {"a": {"acc": 1, "search_split": "train", "partition": {"search": 0.3}}}}, "keep one"),
    ({"tasks": {"a": {}}, "apply_chat_template": "yes"}, "tasks.apply_chat_template = 'yes'"),
    ({"tasks": None, "group": None}, "'tasks.tasks={my_task: {acc: 1.0}}'"),
])
def test_bad_tasks_configs_name_the_key(cfg, needle):
    with pytest.raises(ConfigError, match=None) as err:
        parse_tasks(cfg)
    assert needle in str(err.value)


# ---- the Hydra command line, through the real app ------------------------------------------------------
def _composed(*overrides: str) -> dict:
    proc = subprocess.run([*APP, "+search=ties_math", *overrides, "--cfg", "job", "--resolve"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return yaml.safe_load(proc.stdout)


def test_command_line_forms_from_the_readme(tmp_path):
    data = EXAMPLE / "data"
    one = _composed("tasks.tasks={gsm8k_local: {exact_match: 1.0}}", "tasks.search_split=train",
                    "models.task_dirs=[examples/gsm8k_local]")
    spec = parse_tasks(one["tasks"])
    assert spec.tasks == {"gsm8k_local": {"exact_match": 1.0}} and spec.splits["gsm8k_local"].search_split == "train"
    assert one["models"]["task_dirs"] == ["examples/gsm8k_local"]
    two = parse_tasks(_composed("tasks.tasks={evomerge_add_ll: {acc: 1.0}, evomerge_sub_ll: {acc: 2.0}}")["tasks"])
    assert two.tasks == {"evomerge_add_ll": {"acc": 1.0}, "evomerge_sub_ll": {"acc": 2.0}}
    assert two.splits["evomerge_add_ll"] == TaskSplits(select=100.0)  # the tiny zoo's select items (models.select)
    user = _composed("tasks=gsm8k_local", "models.task_dirs=[examples/gsm8k_local]", "tasks.num_fewshot=2",
                     "+tasks.tasks.gsm8k_local.partition={split: test, search: 0.3, seed: 0}")
    spec = parse_tasks(user["tasks"])
    assert spec.splits["gsm8k_local"] == TaskSplits(search_split="train", num_fewshot=2,
                                                    partition=Partition("test", 0.3, 0))
    builtin = _composed(f"tasks.tasks={{gsm8k: {{exact_match: 1.0, filter: strict-match, search_split: train, overrides: "
                        f"{{dataset_path: json, dataset_name: null, dataset_kwargs: {{data_files: {{train: '{data}/train.jsonl', "
                        f"test: '{data}/test.jsonl'}}}}}}}}}}")
    spec = parse_tasks(builtin["tasks"])
    assert spec.tasks == {"gsm8k": {"exact_match,strict-match": 1.0}}
    assert spec.splits["gsm8k"].overrides["dataset_kwargs"]["data_files"]["test"] == f"{data}/test.jsonl"
    chosen = parse_tasks(_composed("tasks=user_example", "tasks.tasks={my_task: {acc: 1.0}}")["tasks"])
    assert chosen.tasks == {"my_task": {"acc": 1.0}}  # the example group's tasks are null: the override replaces
    replaced = parse_tasks(_composed("tasks=gsm8k_local", "~tasks.tasks", "+tasks.tasks={other: {acc: 1.0}}")["tasks"])
    assert replaced.tasks == {"other": {"acc": 1.0}}  # a file's tasks: delete, then add


# ---- end to end: a short search on the tiny zoo with the README's example ------------------------------
def _run(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*APP, "+search=ties_math", "tasks=gsm8k_local", "models.task_dirs=[examples/gsm8k_local]",
                           "search.n_trials=4", "search.limit=4", "max_gen_toks=4", "progress=false", "final.top_k=1",
                           "final.rescore_search=false", "final.score_cache=null", *args, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


@pytest.mark.slow
def test_a_failed_start_then_the_corrected_command_searches_the_gsm8k_example(tiny_zoo, tmp_path):
    run_dir = tmp_path / "run"
    bad = _run(run_dir, "tasks.search_split=search")  # the task has no 'search' split
    assert bad.returncode == 2 and "has no split 'search'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (run_dir / "study.db").exists() and not (run_dir / "splits.json").exists()
    good = _run(run_dir)
    assert good.returncode == 0, good.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trials"] == {"finished": 4, "COMPLETE": 4}
    assert set(summary["baselines"]) == {"alone:add", "alone:sub", "textbook"}
    assert all(b["test_fitness"] is not None for b in summary["baselines"].values())
    assert summary["best"]["test_fitness"] is not None and "no split" not in good.stderr
    splits = json.loads((run_dir / "splits.json").read_text())["tasks"]["gsm8k_local"]
    assert (splits["search"]["split"], splits["search"]["n"], splits["test"]["split"], splits["test"]["n"]) == (
        "train", 40, "test", 60)
    assert not set(splits["search"]["sha256_16"]) & set(splits["test"]["sha256_16"])
