"""Bad input to ``evomerge-merge``: one clear paragraph, non-zero exit, no traceback, no output left."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from model_factory import make_family

pytestmark = pytest.mark.slow  # each case runs evomerge-merge as a subprocess


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("errfam")
    base, fts = make_family(root, "llama", n_models=2)
    wide = root / "wide"
    cfg = LlamaConfig.from_pretrained(base)
    cfg.intermediate_size = 48
    AutoModelForCausalLM.from_config(cfg).save_pretrained(wide)
    other_vocab = root / "other_vocab"
    shutil.copytree(fts[1], other_vocab)
    tj = (other_vocab / "tokenizer.json").read_text().replace('"a":', '"A":', 1)
    (other_vocab / "tokenizer.json").write_text(tj)
    return {"base": base, "a": fts[0], "b": fts[1], "wide": wide, "other_vocab": other_vocab}


def _run(tmp_path: Path, recipe_text: str) -> tuple[subprocess.CompletedProcess, Path]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "evomerge.engine.cli", str(recipe), str(out), "--no-progress"],
                          capture_output=True, text=True)
    return proc, out


def _assert_clean_failure(proc, out: Path, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr
    assert not out.exists()
    assert not list(out.parent.glob(".out.tmp-*"))


def _ties(base, a, b, da=0.5, db=0.5) -> str:
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: 0.5, density: {da}}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5, density: {db}}}\n")


def test_mismatched_shapes_name_tensor_and_both_files(fam, tmp_path):
    proc, out = _run(tmp_path, _ties(fam["base"], fam["a"], fam["wide"]))
    _assert_clean_failure(proc, out, "intermediate_size", str(fam["wide"]), str(fam["base"]))


def test_different_vocabularies(fam, tmp_path):
    proc, out = _run(tmp_path, _ties(fam["base"], fam["a"], fam["other_vocab"]))
    _assert_clean_failure(proc, out, "vocabularies differ", "tokenizer.json")


def test_missing_base(fam, tmp_path):
    text = f"merge_method: ties\nmodels:\n  - model: {fam['a']}\n    parameters: {{weight: 1, density: 0.5}}\n"
    proc, out = _run(tmp_path, text)
    _assert_clean_failure(proc, out, "needs a base_model")


def test_missing_model_directory(fam, tmp_path):
    proc, out = _run(tmp_path, _ties(fam["base"], fam["a"], tmp_path / "nope"))
    _assert_clean_failure(proc, out, "does not exist", "nope")


def test_missing_and_corrupt_shard(fam, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fam["b"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    proc, out = _run(tmp_path, _ties(fam["base"], fam["a"], broken))
    _assert_clean_failure(proc, out, str(broken / "model.safetensors"), "corrupt")
    (broken / "model.safetensors").unlink()
    proc, out = _run(tmp_path, _ties(fam["base"], fam["a"], broken))
    _assert_clean_failure(proc, out, "no weights found", str(broken))


def test_unknown_method(fam, tmp_path):
    proc, out = _run(tmp_path, f"merge_method: tiez\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['a']}\n")
    _assert_clean_failure(proc, out, "unknown merge_method 'tiez'", "ties")


def test_density_out_of_range(fam, tmp_path):
    proc, out = _run(tmp_path, _ties(fam["base"], fam["a"], fam["b"], db=1.7))
    _assert_clean_failure(proc, out, "density", "1.7", str(fam["b"]))


def test_negative_t(fam, tmp_path):
    text = (f"merge_method: slerp\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['base']}\n  - model: {fam['a']}\n"
            f"parameters:\n  t: -0.2\n")
    proc, out = _run(tmp_path, text)
    _assert_clean_failure(proc, out, "'t'", "-0.2")


def test_invalid_yaml(fam, tmp_path):
    proc, out = _run(tmp_path, "merge_method: ties\nmodels: [\n  - model: x\n")
    _assert_clean_failure(proc, out, "not valid YAML", "line")


def test_failed_merge_keeps_existing_output(fam, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    proc, _ = _run(tmp_path, _ties(fam["base"], fam["a"], fam["b"], db=1.7))
    assert proc.returncode != 0
    assert (out / "keep.txt").read_text() == "previous result"
