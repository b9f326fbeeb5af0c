"""A search runs end to end on every common architecture and exports a model that loads and generates.

One tiny random family per architecture of ``model_factory.ARCHS`` (a base and two fine-tunes, given as the
user's own models), searched with the README's worked example task (examples/gsm8k_local) on a budget of
the three baselines and one searched candidate. All architectures run in ONE Hydra multirun of the real
app (``-m``, one job per family through an ``arch_root`` interpolation): the imports are paid once, which is
most of a job's time at this size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model_factory import ARCHS, make_family

pytestmark = pytest.mark.slow  # whole searches through the app, as subprocesses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, Path]:
    """arch -> its run directory, after one multirun over every architecture's family."""
    root = tmp_path_factory.mktemp("archs")
    for arch in ARCHS:
        make_family(root / arch, arch, n_models=2, layers=2)
    sweep_dir = root / "sweep"
    cmd = [sys.executable, "-m", "evomerge.run.app", "-m", "+search=ties_math", "models=user_example",
           "+arch_root=" + ",".join(str(root / a) for a in ARCHS),
           "models.base=${arch_root}/base", "models.specialists={add: ${arch_root}/ft0, sub: ${arch_root}/ft1}",
           "tasks=gsm8k_local", "models.task_dirs=[examples/gsm8k_local]", "search.n_trials=4", "search.limit=2",
           "max_gen_toks=2", "progress=false", "device=cpu", "final.top_k=1", "final.rescore_search=false",
           "final.score_cache=null", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {arch: sweep_dir / str(i) for i, arch in enumerate(ARCHS)}  # job numbers follow the sweep's order


@pytest.mark.parametrize("arch", ARCHS)
def test_search_exports_a_model_that_loads_and_generates(sweep, arch, tmp_path):
    run = sweep[arch]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trials"] == {"finished": 4, "COMPLETE": 4}, summary["trials"]  # 3 baselines + 1 searched
    assert summary["best"]["test_fitness"] is not None
    model_dir = run / "best" / "model"
    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.model_type == AutoConfig.from_pretrained(sweep_family(run) / "base").model_type
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("12+3=", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        logits = model(ids).logits
    assert out.shape == (1, ids.shape[1] + 3) and torch.isfinite(logits).all()


def sweep_family(run: Path) -> Path:
    """The family a run searched, read back from the run's own Hydra record."""
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    line = next(x for x in overrides.splitlines() if "arch_root=" in x)
    return Path(line.split("arch_root=", 1)[1].strip())
