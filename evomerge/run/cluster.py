"""One worker of a cluster sweep: the search session with the shared coordination (:class:`Shared`).

What a worker does differently from a single process (run/coordination.py names each point), and why:

* the study lives in a shared storage (PostgreSQL, or a journal / SQLite file
  in the shared folder), with heartbeats on, so dead workers are detected;
* setting the study up (search-space check, baselines) happens under the study
  mutex, so eight workers starting together enqueue each baseline once;
* each worker's sampler has a seed of its own, or every worker would propose the
  same candidates (the DARE/DELLA mask seed stays the study's);
* every trial passes the budget gate (search/cluster/budget.py): the budget counts
  trials across all workers, exactly;
* one worker wins the export claim (search/cluster/export_claim.py) and does the
  held-out re-scoring and the export, into the shared folder; the others say who.
  Every worker writes ``worker-<N>.json`` (what it ran, whether it exported).

The merge engine is prepared once per worker and reused for every trial.
"""
from __future__ import annotations

import json
import os
import socket
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterator

import optuna

from evomerge.errors import ConfigError
from evomerge.run.coordination import Outcome
from evomerge.run.session import is_cluster  # noqa: F401  (the app asks here)
from evomerge.search import driver
from evomerge.search.backends import postgres_url
from evomerge.search.cluster import export_claim
from evomerge.search.cluster.budget import Gate, tally
from evomerge.search.cluster.manifest import write_manifest
from evomerge.search.cluster.storage import study_mutex
from evomerge.search.config import RunConfig
from evomerge.search.record import ExportClaim, worker_of
from evomerge.search.storage import heartbeat_enabled, make_storage, session_lock, storage_url

SHARED_KINDS = ("postgres", "journal", "sqlite")


def worker_label(raw: dict[str, Any]) -> str:
    """``<worker>@<host>:<pid>`` (plus the SLURM job), shown in trials and messages."""
    label = f"{raw.get('worker') if raw.get('worker') is not None else 0}@{socket.gethostname()}:{os.getpid()}"
    job = os.environ.get("SLURM_JOB_ID")
    return f"{label}/slurm:{job}" if job else label


def sampler_seed(base: int, w: Any, label: str) -> int:
    """A sampler seed of this worker's own (``w``: its ``worker`` index): with one shared seed every worker
    would propose the same candidates (the merge's DARE/DELLA mask seed stays the study's ``seed``)."""
    import hashlib

    try:
        return base + 7919 * (int(w) + 1)
    except (TypeError, ValueError):  # no (numeric) worker index: the host and pid tell workers apart
        return base + int(hashlib.sha256(label.encode()).hexdigest()[:7], 16)


def storage_cfg(raw: dict[str, Any]) -> dict[str, Any]:
    """The storage config with ``cluster.*`` heartbeat defaults where the storage sets none."""
    cfg = dict(raw.get("storage") or {})
    cluster = raw.get("cluster") or {}
    for key in ("heartbeat_interval", "grace_period"):
        if not cfg.get(key):
            cfg[key] = cluster.get(key)
    return cfg


def shared_dir(raw: dict[str, Any], run_dir: Path) -> Path:
    """Where the final export and relative storage paths go: ``cluster.dir``, else the sweep folder
    (``multirun/<study_name>``, shared by every worker of a ``-m`` sweep), else the run folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    given = (raw.get("cluster") or {}).get("dir")
    try:
        hc = HydraConfig.get()
    except ValueError:  # not under Hydra (tests calling the session directly)
        return Path(given).expanduser().resolve() if given else run_dir
    cwd = Path(hc.runtime.cwd)
    if given:
        p = Path(given).expanduser()
        return p if p.is_absolute() else cwd / p
    if hc.mode == RunMode.MULTIRUN:
        try:
            sweep = Path(str(hc.sweep.dir))
        except Exception:  # noqa: BLE001 - an unresolvable interpolation: the job folder's parent is the sweep
            return run_dir.parent
        return sweep if sweep.is_absolute() else cwd / sweep
    return run_dir


def check_cluster(raw: dict[str, Any]) -> None:
    """Config errors a worker can report before loading any model."""
    cfg = storage_cfg(raw)
    kind = cfg.get("kind", "sqlite")
    if kind not in SHARED_KINDS:
        raise ConfigError(f"storage.kind = {kind!r} cannot be shared by workers; use storage=postgres (many machines) "
                          f"or storage=journal (a shared filesystem).")
    if not cfg.get("heartbeat_interval"):
        raise ConfigError("cluster workers need heartbeats to detect dead workers: set storage.heartbeat_interval "
                          "(seconds) or cluster.heartbeat_interval.")
    if kind == "postgres":
        postgres_url(cfg)


class Shared:
    """The coordination of a worker whose study other workers share (run/coordination.py says what each
    method is for): the session lock held shared with the other workers, the study mutex as the setup lock,
    the study-wide budget gate, the export claim, a sampler seed and (``device=auto``) a GPU of its own."""

    def __init__(self, config: RunConfig, job_dir: Path) -> None:
        raw = config.raw
        check_cluster(raw)
        self.index, self.worker = raw.get("worker"), worker_label(raw)
        self.job_dir, self.out_dir = job_dir, shared_dir(raw, job_dir)
        self.storage_cfg = storage_cfg(raw)
        self.interval = float(self.storage_cfg.get("heartbeat_interval") or 1)
        self.poll_s = config.cluster.poll_s
        self.storage: optuna.storages.BaseStorage | None = None
        self.mutex: Any = None
        self.claim: ExportClaim | None = None

    def session_lock(self, study_name: str) -> AbstractContextManager[object]:
        """Shared with the other workers: a single-process search on the same study file is refused, and refuses them."""
        return session_lock(self.storage_cfg, self.out_dir, study_name, shared=True)

    def open_storage(self) -> optuna.storages.BaseStorage:
        self.storage = make_storage(self.storage_cfg, self.out_dir, driver.retry_trial)
        if not heartbeat_enabled(self.storage):
            raise ConfigError("the shared storage has no heartbeats; set storage.heartbeat_interval.")
        return self.storage

    def setup_lock(self, storage: optuna.storages.BaseStorage, study_name: str) -> AbstractContextManager[object]:
        """The study mutex (search/cluster/storage.py), kept for the budget gate and the export claim."""
        self.mutex = study_mutex(storage, study_name)
        return self.mutex

    def device(self, name: str) -> str:
        """``device=auto`` with several visible GPUs: worker N takes GPU N mod count (submitit_local shows all)."""
        if name != "auto":
            return name
        import torch

        n = torch.cuda.device_count()
        if n <= 1:
            return name
        try:
            index = int(self.index or 0)
        except ValueError:
            index = 0
        return f"cuda:{index % n}"

    def sampler_seed(self, seed: int) -> int:
        return sampler_seed(seed, self.index, self.worker)

    def begin(self, study: optuna.Study, n_trials: int) -> None:
        """Dead workers' trials are the gate's to find (by heartbeat); here the shared folder's manifest."""
        write_manifest(self.out_dir, study.study_name, self.storage_cfg)
        t = tally(study.get_trials(deepcopy=False))
        print(f"evomerge: worker {self.worker} joined study {study.study_name!r} in {storage_url(self.storage)}: "
              f"{min(t.finished, n_trials)} of {n_trials} trials finished, {t.running} running.")

    def budget(self, study: optuna.Study, n_trials: int) -> Gate:
        return Gate(study, self.mutex, n_trials, self.worker, self.poll_s)

    @contextmanager
    def export(self, study: optuna.Study, outcome: Outcome, n_trials: int) -> Iterator[bool]:
        """An interrupted worker leaves the export to the others (its trial is retried by one of them). A worker
        that ran no trial of this study (a rerun) watches an unfinished claim for a grace period and takes it
        over from a dead exporter; the others never wait for it."""
        name = study.study_name
        if outcome.interrupted:
            t = tally(study.get_trials(deepcopy=False))
            print(f"\nevomerge: worker {self.worker} interrupted; its trial is retried by another worker. "
                  f"{t.finished} of {n_trials} trials finished. Start a worker again (same command) to rejoin.")
            yield False
            return
        watch = None if outcome.ran else float(self.storage_cfg.get("grace_period") or 0) + 2 * self.interval
        won, self.claim = export_claim.claim(study, self.mutex, self.worker, self.out_dir, watch_s=watch,
                                             poll_s=min(1.0, self.interval))
        if not won:
            print(f"evomerge: study {name!r}: {n_trials} of {n_trials} trials finished; worker {self.worker} ran "
                  f"{len(outcome.ran)}. {export_claim.describe(self.claim)}.")
            yield False
            return
        print(f"evomerge: study {name!r}: {n_trials} of {n_trials} trials finished; worker {self.worker} does the "
              f"held-out evaluation and export into {self.out_dir}.")
        with export_claim.beating(study, self.claim, self.interval):
            yield True

    def summary_keys(self, study: optuna.Study) -> dict[str, Any]:
        return {"cluster": {"exported_by": self.worker, "workers": _workers(study)}}

    def finish(self, study: optuna.Study, summary: dict[str, Any] | None, outcome: Outcome,
               timings: dict[str, Any]) -> dict[str, Any]:
        """``worker-<N>.json`` in this worker's run folder (workers started by hand share one): what it ran,
        whether it exported. The session returns the summary if this worker exported, else this record."""
        record: dict[str, Any] = {"worker": self.worker, "study": study.study_name, "storage": storage_url(self.storage),
                                  "trials_run": outcome.ran, "trials_taken_over": outcome.taken_over,
                                  "interrupted": outcome.interrupted, "exported": outcome.exported, "timings": timings}
        if self.claim is not None:
            record["final"] = self.claim.as_dict()
        self.job_dir.mkdir(parents=True, exist_ok=True)
        name = f"worker-{self.index if self.index is not None else 0}.json"
        (self.job_dir / name).write_text(json.dumps(record, indent=2, default=str) + "\n")
        return summary if summary is not None else record


def _workers(study: optuna.Study) -> dict[str, int]:
    """Trials per worker (from each trial's ``worker`` attribute)."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        w = worker_of(t)
        if w is not None:
            counts[w] = counts.get(w, 0) + 1
    return counts
