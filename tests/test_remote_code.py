"""No code from a model directory runs unless the user allows it for that command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from evomerge.checkpoints.tokenizer import load_tokenizer
from evomerge.errors import CheckpointError
from model_factory import make_family


@pytest.fixture()
def trojan(tmp_path):
    """A model family whose base's tokenizer asks for custom code that would leave a marker file."""
    base, fts = make_family(tmp_path / "fam", "llama", n_models=2, layers=2)
    marker = tmp_path / "code-ran"
    (base / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg_path = base / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    cfg_path.write_text(json.dumps(cfg))
    return base, fts, marker


def test_a_tokenizer_asking_for_custom_code_is_refused(trojan):
    base, _, marker = trojan
    with pytest.raises(CheckpointError) as exc:
        load_tokenizer(base, how_to_trust="trust_remote_code=true")
    assert "tokenizer_config.json needs custom code" in str(exc.value) and "trust_remote_code=true" in str(exc.value)
    assert not marker.exists()


def test_the_search_never_runs_model_code_and_says_how_to_allow_it(trojan, tmp_path, tiny_zoo):
    base, fts, marker = trojan
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge.run.app", "+search=ties_math", "models=user_example", f"models.base={base}",
         f"models.specialists={{a: {fts[0]}, b: {fts[1]}}}", f"models.task_dirs=[{tiny_zoo.task_dir}]",
         "tasks.group=null", "tasks.tasks={evomerge_add_ll: {acc: 1.0}}", "progress=false", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs custom code" in proc.stderr and "trust_remote_code=true" in proc.stderr
    assert "--trust-remote-code" not in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (run_dir / "study.db").exists()
