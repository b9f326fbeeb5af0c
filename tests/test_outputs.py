"""Writers never destroy what they did not write (evomerge-merge, the search's export).

Each test sets up what a user might have on disk, runs the real CLI or writer, and checks that every
file the user had is still there, byte for byte, unless evomerge wrote it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from evomerge.checkpoints.outdir import MANIFEST, remove_stale_staging
from evomerge.engine import cli
from model_factory import make_family



@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam"), "llama", n_models=2, layers=2)


def _recipe(path: Path, family, weight: float = 0.5) -> Path:
    base, fts = family
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                    f"  - model: {fts[0]}\n    parameters: {{weight: {weight}}}\n"
                    f"  - model: {fts[1]}\n    parameters: {{weight: {weight}}}\n")
    return path


def _merge(capsys, *argv: str) -> tuple[int, str]:
    try:
        cli.main([*map(str, argv), "--no-progress"])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_folder_with_other_files_is_refused_and_left_alone(tmp_path, family, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{\"mine\": true}")
    before = _snapshot(out)
    code, err = _merge(capsys, _recipe(tmp_path / "r.yaml", family), out)
    assert code == 2 and "evomerge did not write" in err and "--force" in err and str(out) in err
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(".out*"))  # refused before any work: no staging folder either


def test_force_replaces_only_what_a_merge_writes(tmp_path, family, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{\"mine\": true}")
    code, err = _merge(capsys, _recipe(tmp_path / "r.yaml", family), out, "--force")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # not evomerge's: kept
    assert "mine" not in (out / "config.json").read_text()  # a file a merge writes: replaced
    assert load_file(str(out / "model.safetensors"))
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    assert "notes.txt" not in listed and {"config.json", "model.safetensors", "README.md"} <= listed


@pytest.mark.parametrize("where", ["input", "cwd"])
def test_an_input_is_never_the_output(tmp_path, family, capsys, monkeypatch, where):
    base, fts = family
    recipe = _recipe(tmp_path / "r.yaml", family)
    target = fts[0] if where == "input" else tmp_path
    if where == "cwd":
        monkeypatch.chdir(tmp_path)  # `evomerge-merge r.yaml .`: the recipe lives here
    before = _snapshot(target)
    code, err = _merge(capsys, recipe, target if where == "input" else ".", "--force")
    assert code == 2 and "an input of this merge" in err
    assert _snapshot(target) == before


def test_an_earlier_output_is_swapped_whole(tmp_path, family, capsys):
    out = tmp_path / "out"
    assert _merge(capsys, _recipe(tmp_path / "a.yaml", family, 0.5), out)[0] == 0
    first = load_file(str(out / "model.safetensors"))
    (out / "my-eval.json").write_text("{}")  # a user's file beside an earlier output: kept
    code, err = _merge(capsys, _recipe(tmp_path / "b.yaml", family, 0.9), out, "--shard-size", "20KB")
    assert code == 0, err
    assert (out / "my-eval.json").read_text() == "{}"
    assert not (out / "model.safetensors").exists()  # the old single shard went with the old model
    second = {}
    for f in out.glob("model-*.safetensors"):
        second.update(load_file(str(f)))
    assert set(second) == set(first) and any(not (second[k] == first[k]).all() for k in first)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging folder left


def test_an_earlier_output_alone_is_exchanged_atomically(tmp_path, family, capsys):
    out = tmp_path / "out"
    assert _merge(capsys, _recipe(tmp_path / "a.yaml", family, 0.5), out)[0] == 0
    inode = out.stat().st_ino
    assert _merge(capsys, _recipe(tmp_path / "b.yaml", family, 0.9), out)[0] == 0
    assert out.stat().st_ino != inode  # a new folder took the old one's name in one step
    assert "0.9" in (out / "mergekit_config.yml").read_text()


def test_staging_folders_of_killed_writers_are_removed(tmp_path, family, capsys):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.evomerge-tmp-{socket.gethostname()}-{pid}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.evomerge-tmp-{socket.gethostname()}-{os.getpid()}-def456"
    live.mkdir()
    assert remove_stale_staging(out) == [stale]
    assert live.exists()
    live.rmdir()
    stale.mkdir()
    assert _merge(capsys, _recipe(tmp_path / "a.yaml", family), out)[0] == 0
    assert not stale.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_follow_the_umask(tmp_path, family, capsys, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        assert _merge(capsys, _recipe(tmp_path / "r.yaml", family), out)[0] == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_a_symlink_out_of_the_model_folder_is_refused_before_work(tmp_path, capsys):
    base, fts = make_family(tmp_path / "fam", "llama", n_models=2, layers=2)
    secret = tmp_path / "secret.txt"
    secret.write_text("api key")
    (base / "added_tokens.json").symlink_to(secret)
    code, err = _merge(capsys, _recipe(tmp_path / "r.yaml", (base, fts)), tmp_path / "out")
    assert code == 2 and "outside its model folder" in err and "added_tokens.json" in err
    assert not (tmp_path / "out").exists()


def test_a_symlink_inside_the_folder_or_into_the_hub_cache_is_copied_as_a_file(tmp_path, capsys):
    root = tmp_path / "models--org--base"
    snap = root / "snapshots" / "abc"
    base, fts = make_family(tmp_path / "fam", "llama", n_models=2, layers=2)
    snap.parent.mkdir(parents=True)
    base.rename(snap)
    blobs = root / "blobs"
    blobs.mkdir()
    blob = blobs / "sha256"
    (snap / "tokenizer.json").rename(blob)
    (snap / "tokenizer.json").symlink_to(Path("../../blobs/sha256"))
    code, err = _merge(capsys, _recipe(tmp_path / "r.yaml", (snap, fts)), tmp_path / "out")
    assert code == 0, err
    copied = tmp_path / "out" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_bytes() == blob.read_bytes()
