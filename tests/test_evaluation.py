"""Tasks and the in-memory Evaluator: real lm-eval on the real tiny zoo."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.evaluation import N_SEARCH, N_TEST, SKILLS, Evaluator, eval_items, materialise_tasks
from evomerge.evaluation.data import ItemCounts, held_out_prompts, train_items
from evomerge.evaluation.taskdir import task_groups


@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_splits_are_disjoint_sized_and_deterministic(skill):
    items = eval_items(skill, seed=0)
    search = {d["prompt"] for d in items["search"]}
    test = {d["prompt"] for d in items["test"]}
    assert len(search) == N_SEARCH and len(test) == N_TEST
    assert not search & test
    assert eval_items(skill, seed=0) == items  # same seed, same items
    assert {d["prompt"] for d in eval_items(skill, seed=1)["test"]} != test
    for d in items["test"][:50]:
        assert d["choices"][d["label"]] == d["answer"] and len(set(d["choices"])) == 4
    held = held_out_prompts([skill])
    assert not {p for p, _ in train_items(skill, 2000, seed=0, exclude=held)} & held


def test_a_zoo_with_more_search_items_keeps_the_test_items_and_the_first_search_items():
    default, more = eval_items("sub"), eval_items("sub", counts=ItemCounts(search=450, test=N_TEST))
    assert more["test"] == default["test"] and more["search"][:N_SEARCH] == default["search"]
    assert len(more["search"]) == 450 and not {d["prompt"] for d in more["search"]} & {d["prompt"] for d in more["test"]}
    held = held_out_prompts(["sub"], counts=ItemCounts(search=450, test=N_TEST))
    assert held > held_out_prompts(["sub"]) and len(held) == 450 + N_TEST
    with pytest.raises(ValueError, match="positive"):
        ItemCounts(search=0)
    assert ItemCounts(**ItemCounts(7, 9).as_dict()) == ItemCounts(7, 9)


def test_materialised_tasks_use_absolute_existing_paths(tmp_path):
    task_dir = materialise_tasks(tmp_path / "tasks", ["add", "rev"])
    names = sorted(p.stem for p in task_dir.glob("evomerge_*.yaml"))
    assert names == ["evomerge_add", "evomerge_add_ll", "evomerge_rev", "evomerge_rev_ll"]
    text = (task_dir / "evomerge_add.yaml").read_text()
    assert "${DATA_DIR}" not in text
    for split in ("search", "test"):
        path = task_dir / "data" / "add" / f"{split}.jsonl"
        assert f"{split}: {path}" in text and path.is_absolute()
        assert len(path.read_text().splitlines()) == (N_SEARCH if split == "search" else N_TEST)
    assert task_groups(["add", "sub", "rev"])["math"] == ["evomerge_add", "evomerge_sub"]
    task_dir = materialise_tasks(tmp_path / "more", ["add"], counts=ItemCounts(search=320, test=40))
    assert [len((task_dir / "data" / "add" / f"{split}.jsonl").read_text().splitlines())
            for split in ("search", "test")] == [320, 40]


def test_tasks_load_in_lm_eval_and_splits_select_the_data(tiny_zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zoo.base)
    ev = Evaluator(tok, ["evomerge_add", "evomerge_add_ll"], include_paths=[str(tiny_zoo.task_dir)])
    for split, n, items in (("search", N_SEARCH, "search"), ("test", N_TEST, "test")):
        tasks = ev.task_dict(split)["tasks"]
        assert set(tasks) == {"evomerge_add", "evomerge_add_ll"}
        docs = tasks["evomerge_add"].eval_docs
        assert len(docs) == n
        assert docs[0]["prompt"] == eval_items("add")[items][0]["prompt"]
    assert ev.task_dict("search") is ev.task_dict("search")  # built once, reused


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_scores_follow_weights_changed_in_place(tiny_zoo):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zoo.base)
    tasks = ["evomerge_add", "evomerge_add_ll"]
    ev = Evaluator(tok, tasks, include_paths=[str(tiny_zoo.task_dir)])
    model = _load(tiny_zoo.base)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    r_base = ev.evaluate(model, "search", limit=100)
    assert set(r_base) == set(tasks)
    assert set(r_base["evomerge_add"]) == {"exact_match"} and set(r_base["evomerge_add_ll"]) == {"acc"}

    with torch.no_grad():
        model.load_state_dict(load_file(tiny_zoo.specialists["add"] / "model.safetensors"), strict=False)
    r_add = ev.evaluate(model, "search", limit=100)
    assert ev.last_timing["setup_s"] < 0.05  # task dict and HFLM wrapper were reused
    fresh = Evaluator(tok, tasks, include_paths=[str(tiny_zoo.task_dir)]).evaluate(
        _load(tiny_zoo.specialists["add"]), "search", limit=100)
    assert r_add == fresh  # in-place weights score exactly like a freshly loaded model
    # ...and its pairs were tokenised once (100 items x 4 choices), the second call reusing them
    assert len(ev.lm(model).__dict__["_evomerge_pairs"]) == 400
    assert r_add["evomerge_add"]["exact_match"] > r_base["evomerge_add"]["exact_match"]

    with torch.no_grad():
        model.load_state_dict(base_state)
    assert ev.evaluate(model, "search", limit=100) == r_base  # restoring restores the scores
    # item indices instead of a limit: the same items, the same scores, through requests built apart
    assert ev.evaluate(model, "search", samples={t: list(range(100)) for t in tasks}) == r_base
    part = ev.evaluate(model, "search", samples={"evomerge_add_ll": list(range(50, 100))})
    assert set(part) == {"evomerge_add_ll"}  # tasks not named are skipped


def test_item_scores_are_per_item_and_average_to_the_task_score(tiny_zoo):
    from transformers import AutoTokenizer

    tasks = ["evomerge_add_ll", "evomerge_sub_ll"]
    ev = Evaluator(AutoTokenizer.from_pretrained(tiny_zoo.base), tasks, include_paths=[str(tiny_zoo.task_dir)])
    model = _load(tiny_zoo.specialists["add"])
    items = ev.item_scores(model, "test")
    whole = ev.evaluate(model, "test")
    for t in tasks:
        assert len(items[t]) == N_TEST and set(items[t]) <= {0.0, 1.0}
        assert sum(items[t]) / len(items[t]) == pytest.approx(whole[t]["acc"], abs=1e-12)
    first = ev.evaluate(model, "test", samples={"evomerge_add_ll": [0, 1, 2, 3]})  # item order is doc order
    assert sum(items["evomerge_add_ll"][:4]) / 4 == pytest.approx(first["evomerge_add_ll"]["acc"])


def test_user_task_directory_and_missing_split(tiny_zoo, tmp_path):
    from transformers import AutoTokenizer

    data = tmp_path / "copy.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}+0=", "a": str(i)}) + "\n" for i in range(10, 30)))
    (tmp_path / "my_copy.yaml").write_text(
        "task: my_copy\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: generate_until\nvalidation_split: validation\n"
        "doc_to_text: q\ndoc_to_target: a\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    tok = AutoTokenizer.from_pretrained(tiny_zoo.base)
    ev = Evaluator(tok, ["my_copy", "evomerge_sub"], include_paths=[str(tmp_path), str(tiny_zoo.task_dir)],
                   batch_size=8, max_gen_toks=4)
    res = ev.evaluate(_load(tiny_zoo.base), "test", limit=5)
    assert set(res) == {"my_copy", "evomerge_sub"} and 0.0 <= res["my_copy"]["exact_match"] <= 1.0
    with pytest.raises(ConfigError, match="no split 'search'"):
        ev.evaluate(_load(tiny_zoo.base), "search", limit=5)


def test_bad_arguments_are_user_errors(tiny_zoo):
    with pytest.raises(ConfigError, match="batch_size"):
        Evaluator(None, ["evomerge_add"], include_paths=[str(tiny_zoo.task_dir)], batch_size="auto")
    with pytest.raises(ConfigError, match="no tasks"):
        Evaluator(None, [], include_paths=[str(tiny_zoo.task_dir)])


@pytest.mark.slow
def test_unknown_task_names_suggest_close_matches(tiny_zoo):
    # Unknown names make the Evaluator index lm-eval's built-in tasks (about 15 s) before failing.
    with pytest.raises(ConfigError, match="did you mean evomerge_add"):
        Evaluator(None, ["evomerge_adx"], include_paths=[str(tiny_zoo.task_dir)])


def test_task_yaml_templates_ship_with_the_package():
    from importlib import resources

    names = {p.name for p in (resources.files("evomerge.evaluation") / "tasks").iterdir()}
    for skill in SKILLS:
        assert {f"evomerge_{skill}.yaml", f"evomerge_{skill}_ll.yaml"} <= names
    assert Path(str(resources.files("evomerge.evaluation") / "tasks" / "_evomerge_gen.yaml")).is_file()
