"""The export claim: exactly one final evaluation and export per study, however many workers finish together.

Why a claim in the storage: every worker sees the budget met at about the same
moment, and each could re-score the winners on the held-out split and export.
The first worker to set the study's claim (:class:`~evomerge.search.record.ExportClaim`)
under the study mutex does it; the others exit and say who does. The claim carries
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
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import optuna

from evomerge.search import record
from evomerge.search.record import ExportClaim


def claim(study: optuna.Study, mutex: Any, worker: str, out_dir: Path, *, watch_s: float | None,
          poll_s: float = 1.0) -> tuple[bool, ExportClaim]:
    """(won, the claim). ``watch_s``: how long to watch an unfinished claim's beat before taking it over
    (None: never take over; workers that just searched exit at once, only a rerun watches)."""
    mine = ExportClaim(worker=worker, host=socket.gethostname(), pid=os.getpid(), dir=str(out_dir),
                       since=datetime.datetime.now().isoformat(timespec="seconds"), beat=time.time(), done=False)
    with mutex:
        cur = record.claim_of(study)
        if cur is None:
            record.set_claim(study, mine)
            return True, mine
    if cur.done or watch_s is None:
        return False, cur
    beat, deadline = cur.beat, time.monotonic() + watch_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        now = record.claim_of(study) or ExportClaim(worker=None)
        if now.done or now.beat != beat:
            return False, now
    with mutex:
        now = record.claim_of(study) or ExportClaim(worker=None)
        if now.done or now.beat != beat:
            return False, now
        mine = replace(mine, took_over_from=now.worker)
        record.set_claim(study, mine)
        return True, mine


@contextmanager
def beating(study: optuna.Study, claimed: ExportClaim, interval: float) -> Iterator[None]:
    """Refresh the claim's beat every ``interval`` seconds; on success mark it done."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                record.set_claim(study, replace(claimed, beat=time.time()))
            except Exception:  # noqa: BLE001 - a missed beat only delays a takeover
                pass

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    record.set_claim(study, replace(claimed, beat=time.time(), done=True,
                                    finished=datetime.datetime.now().isoformat(timespec="seconds")))


def describe(claimed: ExportClaim) -> str:
    state = "exported" if claimed.done else "is exporting"
    return f"worker {claimed.worker} {state} the winner to {claimed.dir}"
