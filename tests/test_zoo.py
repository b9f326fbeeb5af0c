"""The tiny zoo: real files, real models, and the properties that make merging it meaningful."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evomerge.zoo import build_zoo, config_hash, zoo_dir
from evomerge.zoo import build as zoo_build
from evomerge.zoo.cli import main as zoo_cli

MARGIN = 0.15  # a specialist must beat the base on its own skill by at least this much


def test_layout_and_manifest(tiny_zoo):
    assert set(tiny_zoo.specialists) >= {"add", "sub", "rev"}
    assert tiny_zoo.root == zoo_dir("tiny") and tiny_zoo.base == tiny_zoo.root / "base"
    for path in tiny_zoo.models().values():
        for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
            assert (path / f).is_file(), path / f
    manifest = json.loads((tiny_zoo.root / "manifest.json").read_text())
    assert manifest["config_hash"] == config_hash("tiny")
    assert tiny_zoo.tasks["math"] and set(tiny_zoo.tasks["math"]) < set(tiny_zoo.tasks["all"])
    assert not list(tiny_zoo.root.parent.glob(".tiny.build-*"))


def test_moved_cache_rewrites_its_tasks_with_the_counts_the_zoo_was_built_with(tiny_zoo, tmp_path):
    moved = tmp_path / "zoo" / "tiny"
    shutil.copytree(tiny_zoo.root, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    assert manifest["eval_items"] == {"search": 300, "test": 500}
    manifest["eval_items"] = {"search": 310, "test": 500}  # as a zoo built with other counts records them
    (moved / "manifest.json").write_text(json.dumps(manifest))
    zoo = build_zoo("tiny", cache_dir=tmp_path, progress=False)
    assert zoo.from_cache and zoo.task_dir == moved / "tasks"
    assert str(moved / "tasks" / "data") in (zoo.task_dir / "evomerge_add.yaml").read_text()
    assert len((zoo.task_dir / "data" / "add" / "search.jsonl").read_text().splitlines()) == 310


def test_second_build_is_a_cache_hit(tiny_zoo):
    t0 = time.perf_counter()
    again = build_zoo("tiny", progress=False)
    assert again.from_cache and time.perf_counter() - t0 < 2.0
    assert again.specialists == tiny_zoo.specialists


def test_models_load_offline_and_generate(tiny_zoo):
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "d = sys.argv[1]; tok = AutoTokenizer.from_pretrained(d); m = AutoModelForCausalLM.from_pretrained(d)\n"
        "ids = tok('47+35=', return_tensors='pt', add_special_tokens=False)\n"
        "out = m.generate(**ids, max_new_tokens=4, do_sample=False)\n"
        "print(repr(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)), tok.model_max_length)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(tiny_zoo.specialists["add"])],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    answer, max_len = res.stdout.split()
    assert answer.strip("'").rstrip("\\n").isdigit() and int(max_len) == 64


@pytest.fixture(scope="module")
def scores(tiny_zoo):
    """Test-split exact match of base, specialists and an add+sub task-arithmetic merge."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation import Evaluator

    tok = AutoTokenizer.from_pretrained(tiny_zoo.base)
    ev = Evaluator(tok, tiny_zoo.tasks["all"], include_paths=[str(tiny_zoo.task_dir)], batch_size=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo.base, dtype=torch.float32)
    states = {n: load_file(p / "model.safetensors") for n, p in tiny_zoo.models().items()}
    base = states["base"]
    states["add+sub"] = {k: base[k] + (states["add"][k] - base[k]) + (states["sub"][k] - base[k])
                         for k in base}  # plain task arithmetic, weight 1 each
    out = {}
    for name, state in states.items():
        with torch.no_grad():
            model.load_state_dict(state, strict=False)
        res = ev.evaluate(model, "test")
        out[name] = {t.removeprefix("evomerge_"): m["exact_match"] for t, m in res.items()}
    return out


def test_each_specialist_beats_the_base_on_its_own_skill(scores):
    for skill in ("add", "sub", "rev"):
        assert scores[skill][skill] >= scores["base"][skill] + MARGIN, (skill, scores)


def test_math_mix_needs_a_merge(scores, tiny_zoo):
    def math(name):
        return sum(scores[name][t.removeprefix("evomerge_")] for t in tiny_zoo.tasks["math"]) / len(tiny_zoo.tasks["math"])
    singles = {n: math(n) for n in ("base", "add", "sub", "rev")}
    best_single = max(singles.values())
    # no single model is best at every math skill ...
    for name in singles:
        assert any(scores[o][s] > scores[name][s] for o in singles for s in ("add", "sub")), (name, scores)
    # ... and merging the two math specialists beats every single model on the mix
    assert math("add+sub") > best_single, (math("add+sub"), singles)


def test_training_stops_once_the_skills_are_learnt():
    """``until`` ends training at the first probe that reaches it (0.0: the first probe)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.tokenizer import char_tokenizer
    from evomerge.zoo.train import TrainConfig, train

    tok = char_tokenizer(64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    cfg = TrainConfig(mix={"add": 1.0}, steps=50, lr=1e-3, batch_size=8, until=0.0, check_every=3)
    stats = train(model, tok, cfg, exclude=set(), progress=False)
    assert stats["steps"] == 3 and set(stats["probe"]) == {"add"}
    never = train(model, tok, TrainConfig(mix={"add": 1.0}, steps=4, lr=1e-3, batch_size=8, until=1.01,
                                          check_every=2), exclude=set(), progress=False)
    assert never["steps"] == 4 and never["probe"]["add"] < 1.01


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    from evomerge.zoo import tiny

    def boom(out, *, progress=True, from_scratch=False):
        (out / "base").mkdir()
        (out / "base" / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # a killed build

    monkeypatch.setattr(tiny, "build", boom)
    with pytest.raises(KeyboardInterrupt):
        build_zoo("tiny", cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "zoo" / "tiny").exists()
    assert not list((tmp_path / "zoo").glob(".tiny.build-*"))


def test_a_build_waits_for_the_one_in_progress(tiny_zoo, tmp_path):
    """Workers sharing one cache: the second blocks on the build lock, then takes the first's zoo."""
    from evomerge.locks import FileMutex

    (tmp_path / "zoo").mkdir()
    lock = tmp_path / "zoo" / ".tiny.lock"
    code = "import sys; from evomerge.zoo import build_zoo; print(build_zoo('tiny', cache_dir=sys.argv[1], progress=False).from_cache)"
    with FileMutex(lock):
        waiter = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        inode, deadline = os.stat(lock).st_ino, time.monotonic() + 60
        while not any("->" in ln and f":{inode} " in ln for ln in Path("/proc/locks").read_text().splitlines()):
            assert waiter.poll() is None and time.monotonic() < deadline, "the second build never waited on the lock"
            time.sleep(0.1)
        shutil.copytree(tiny_zoo.root, tmp_path / "zoo" / "tiny")  # the first worker's build lands
    out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0 and out.strip() == "True"  # nothing rebuilt


def test_cli_path_build_and_errors(tiny_zoo, capsys, monkeypatch):
    assert zoo_cli(["path", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_zoo.root)
    assert zoo_cli(["build", "tiny", "--quiet"]) == 0
    assert "cached" in capsys.readouterr().out

    monkeypatch.setattr("evomerge.zoo.smol._package_version", lambda: None)
    with pytest.raises(SystemExit) as exc:
        zoo_cli(["build", "smol"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("evomerge-zoo: error:") and "pip install" in err and "Traceback" not in err

    with pytest.raises(SystemExit) as exc:
        zoo_cli(["table", "tiny", "--split", "nope", "--limit", "5", "--quiet"])
    assert exc.value.code == 2 and "no split 'nope'" in capsys.readouterr().err


def test_cli_table_writes_markdown(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "zoo.md"
    out.write_text("# Zoo\n\nintro\n")
    assert zoo_cli(["table", "tiny", "--limit", "16", "--quiet", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Zoo\n\nintro") and "<!-- zoo-table:tiny:start -->" in text
    for row in ("| base |", "| add |", "| sub |", "| rev |", "| uniform average |"):
        assert row in text
    assert "first 16 of 500 items" in capsys.readouterr().out


def test_table_section_is_replaced_not_appended(tmp_path):
    from evomerge.zoo.cli import _write_section

    out = tmp_path / "zoo.md"
    _write_section(out, "tiny", "first")
    _write_section(out, "smol", "other")
    _write_section(out, "tiny", "second")
    text = out.read_text()
    assert text.count("zoo-table:tiny:start") == 1 and "second" in text and "first" not in text
    assert "other" in text


def test_unknown_zoo_is_a_user_error():
    with pytest.raises(zoo_build.ZooError, match="unknown zoo"):
        build_zoo("huge")


def test_tiny_base_is_the_shipped_one(tiny_zoo):
    """The tiny zoo trains only its specialists: the base is the package's file, bit for bit."""
    import hashlib

    from safetensors.torch import load_file

    from evomerge.zoo import tiny

    assert tiny.SHIPPED_BASE.is_file()
    digest = hashlib.sha256(tiny.SHIPPED_BASE.read_bytes()).hexdigest()
    assert tiny_zoo.manifest["train"]["base"] == {"shipped": tiny.SHIPPED_BASE.name, "sha256": digest}
    assert tiny.spec()["shipped_base"] == digest  # a new file means a new config hash, hence a rebuild
    shipped, built = load_file(str(tiny.SHIPPED_BASE)), load_file(str(Path(tiny_zoo.base) / "model.safetensors"))
    assert shipped.keys() == built.keys() and all(torch.equal(shipped[k], built[k]) for k in shipped)
