"""Run the ``evomerge`` app with a SIGKILL planted at one stage: ``python fault_runner.py STAGE -- ARGS``.

A real kill, at a chosen moment: the named function kills its own process (SIGKILL: no handler, no
cleanup) when it is entered for the ``N``-th time. Stages: ``prepare`` (the merge engine is being built),
``trial`` (the N-th searched candidate's first look; baselines are scored whole), ``final`` (the N-th held-out re-score), ``export`` (the
winner's complete model folder is about to be put in place).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable


def _kill_on_call(owner: Any, name: str, nth: int, when: Callable[..., bool] = lambda *a, **k: True) -> None:
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def plant(stage: str, nth: int) -> None:
    if stage == "prepare":
        from evomerge.engine import prepared

        _kill_on_call(prepared.PreparedMerge, "__init__", nth)
    elif stage == "trial":
        from evomerge.search.fitness import Scorer

        _kill_on_call(Scorer, "extend", nth)
    elif stage == "final":
        from evomerge.search.fitness import Scorer

        # the test split is scored item by item (the held-out report pairs it), where its metrics are means
        _kill_on_call(Scorer, "score_per_item", nth, when=lambda self, model, split: split == "test")
    elif stage == "export":
        from evomerge.checkpoints import outdir, writer

        _kill_on_call(outdir, "publish", nth)
        writer.publish = outdir.publish  # the writer imported it by name
    else:
        raise SystemExit(f"unknown stage {stage!r}")


if __name__ == "__main__":
    stage, nth = sys.argv[1], int(sys.argv[2])
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    plant(stage, nth)
    from evomerge.run.app import main

    main()
