"""The export claim: exactly one final evaluation and export per study, however many workers finish together.

Why a claim in the storage: every worker sees the budget met at about the same
moment, and each could re-score the winners on the held-out split and export.
The first worker to set the study's ``evomerge:final`` system attribute under
the study mutex does it; the others exit and say who does. The claim carries
a ``beat`` the exporter refreshes while it works, so a rerun can tell an
exporter that died (beat frozen for a grace period) from one still working,
and take over; the held-out scores already stored in the study are reused.
"""
from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import optuna

from evomerge.search.optuna_io import set_study_system_attr, study_system_attr

FINAL_ATTR = "evomerge:final"


def _get(study: optuna.Study) -> dict[str, Any] | None:
    return study_system_attr(study, FINAL_ATTR)


def _set(study: optuna.Study, record: dict[str, Any]) -> None:
    set_study_system_attr(study, FINAL_ATTR, record)


def claim(study: optuna.Study, mutex: Any, worker: str, out_dir: Path, *, watch_s: float | None,
          poll_s: float = 1.0) -> tuple[bool, dict[str, Any]]:
    """(won, claim record). ``watch_s``: how long to watch an unfinished claim's beat before taking it over
    (None: never take over; workers that just searched exit at once, only a rerun watches)."""
    mine = {"worker": worker, "host": socket.gethostname(), "pid": os.getpid(), "dir": str(out_dir),
            "since": datetime.datetime.now().isoformat(timespec="seconds"), "beat": time.time(), "done": False}
    with mutex:
        cur = _get(study)
        if cur is None:
            _set(study, mine)
            return True, mine
    if cur.get("done") or watch_s is None:
        return False, cur
    beat, deadline = cur.get("beat"), time.monotonic() + watch_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        now = _get(study) or {}
        if now.get("done") or now.get("beat") != beat:
            return False, now
    with mutex:
        now = _get(study) or {}
        if now.get("done") or now.get("beat") != beat:
            return False, now
        mine["took_over_from"] = now.get("worker")
        _set(study, mine)
        return True, mine


@contextmanager
def beating(study: optuna.Study, record: dict[str, Any], interval: float) -> Iterator[None]:
    """Refresh the claim's beat every ``interval`` seconds; on success mark it done."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                _set(study, {**record, "beat": time.time()})
            except Exception:  # noqa: BLE001 - a missed beat only delays a takeover
                pass

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    _set(study, {**record, "beat": time.time(), "done": True,
                 "finished": datetime.datetime.now().isoformat(timespec="seconds")})


def describe(record: dict[str, Any]) -> str:
    state = "exported" if record.get("done") else "is exporting"
    return f"worker {record.get('worker')} {state} the winner to {record.get('dir')}"
