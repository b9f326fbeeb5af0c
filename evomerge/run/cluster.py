"""One worker of a cluster sweep: the single-machine session, sharing its study with other workers.

What differs from :class:`~evomerge.run.session.SearchSession`, and why:

* the study lives in a shared storage (PostgreSQL, or a journal / SQLite file
  in the shared folder), with heartbeats on, so dead workers are detected;
* setting the study up (search-space check, baselines) happens under the study
  mutex, so eight workers starting together enqueue each baseline once;
* every trial passes the budget gate (:mod:`.budget`): the budget counts
  trials across all workers, exactly;
* one worker wins the final claim (:mod:`.final`) and does the held-out
  re-scoring and the export, into the shared folder; the others say who.

The merge engine is prepared once per worker and reused for every trial.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.search import driver
from evomerge.search.cluster import export_claim
from evomerge.search.cluster.budget import ClusterLoop, tally
from evomerge.search.cluster.manifest import write_manifest
from evomerge.search.backends import postgres_url
from evomerge.search.cluster.storage import study_mutex
from evomerge.search.config import RunConfig
from evomerge.search.storage import heartbeat_enabled, make_storage, session_lock, storage_url
from evomerge.run.session import SearchSession, _print_summary, is_cluster  # noqa: F401  (is_cluster: the app asks here)

SHARED_KINDS = ("postgres", "journal", "sqlite")


def worker_label(raw: dict[str, Any]) -> str:
    """``<worker>@<host>:<pid>`` (plus the SLURM job), shown in trials and messages."""
    label = f"{raw.get('worker') if raw.get('worker') is not None else 0}@{socket.gethostname()}:{os.getpid()}"
    job = os.environ.get("SLURM_JOB_ID")
    return f"{label}/slurm:{job}" if job else label


def sampler_seed(raw: dict[str, Any], label: str) -> int:
    """A sampler seed of this worker's own: with one shared seed every worker would propose the same
    candidates (the merge's DARE/DELLA mask seed stays the study's ``seed``)."""
    import hashlib

    base, w = int(raw.get("seed", 0)), raw.get("worker")
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


class ClusterSession(SearchSession):
    def __init__(self, config: RunConfig, run_dir: Path, *, t0: float) -> None:
        raw = config.raw
        check_cluster(raw)
        self.job_dir = run_dir
        super().__init__(config, shared_dir(raw, run_dir), t0=t0)
        self.worker = worker_label(raw)
        self._shared: Any = None

    def _make_storage(self) -> Any:
        """The study's storage, opened once per worker (the mutex needs it before the study exists)."""
        if self._shared is None:
            self._shared = make_storage(storage_cfg(self.raw), self.run_dir, driver.retry_trial)
            if not heartbeat_enabled(self._shared):
                raise ConfigError("the shared storage has no heartbeats; set storage.heartbeat_interval.")
        return self._shared

    def _pick_device(self) -> None:
        """``device=auto`` with several visible GPUs: worker N takes GPU N mod count (submitit_local shows all)."""
        if self.config.device != "auto":
            return
        import torch

        n = torch.cuda.device_count()
        if n > 1:
            try:
                index = int(self.raw.get("worker") or 0)
            except ValueError:
                index = 0
            self.config = replace(self.config, device=f"cuda:{index % n}")

    def run(self) -> dict[str, Any]:
        """The worker's share of the search, holding the study's session lock shared (with the other workers;
        a single-process search on the same study file is refused, and refuses them)."""
        with session_lock(storage_cfg(self.raw), self.run_dir, str(self.raw["study_name"]), shared=True):
            return self._run()

    def _run(self) -> dict[str, Any]:
        self._pick_device()
        self._setup()
        # each worker's sampler gets a seed of its own, or every worker would propose the same candidates;
        # the genome (DARE/DELLA masks) was built above with the study's seed and keeps it
        self.config = replace(self.config, seed=sampler_seed(self.raw, self.worker))
        name = str(self.raw["study_name"])
        mutex = study_mutex(self._make_storage(), name)
        with mutex:  # one worker at a time checks the search space and enqueues the baselines
            study = self._open_study()
            self._enqueue_baselines(study)
            write_manifest(self.run_dir, name, storage_cfg(self.raw))
        n_trials = self.spec.n_trials
        start_tally = tally(study.get_trials(deepcopy=False))
        print(f"evomerge: worker {self.worker} joined study {name!r} in {storage_url(self.storage)}: "
              f"{min(start_tally.finished, n_trials)} of {n_trials} trials finished, {start_tally.running} running.")
        get_engine = driver.lazy(self._engine, lambda start: self._timed("prepare_s", start))

        stats, ran, taken_over = driver.LoopStats(), [], []
        start = time.perf_counter()
        if start_tally.finished < n_trials:
            loop = ClusterLoop(study, self.sampler_for, self.pruner, self.genome, get_engine(), self.scorer,
                               n_trials=n_trials, limit=self.spec.limit, first_limit=self.first, prune=self.prune,
                               seed=self.genome.seed, fresh_seeds=self.spec.random_mode == "fresh",
                               progress=self.progress, mutex=mutex, worker=self.worker,
                               poll_s=self.config.cluster.poll_s)
            stats = loop.run()
            ran, taken_over = loop.gate.ran, loop.taken_over
        self.timings["search_s"] = round(time.perf_counter() - start - self.timings.get("prepare_s", 0.0), 3)
        self.timings["per_candidate"] = stats.per_candidate()
        record: dict[str, Any] = {"worker": self.worker, "study": name, "storage": storage_url(self.storage),
                                  "trials_run": ran, "trials_taken_over": taken_over, "interrupted": stats.interrupted,
                                  "exported": False, "timings": self.timings}
        if stats.interrupted:
            t = tally(study.get_trials(deepcopy=False))
            print(f"\nevomerge: worker {self.worker} interrupted; its trial is retried by another worker. "
                  f"{t.finished} of {n_trials} trials finished. Start a worker again (same command) to rejoin.")
            return self._worker_record(record)
        watch = None if ran else float(storage_cfg(self.raw).get("grace_period") or 0) + 2 * self._interval()
        won, claim = export_claim.claim(study, mutex, self.worker, self.run_dir, watch_s=watch,
                                       poll_s=min(1.0, self._interval()))
        record["final"] = claim
        if not won:
            print(f"evomerge: study {name!r}: {n_trials} of {n_trials} trials finished; worker {self.worker} ran "
                  f"{len(ran)}. {export_claim.describe(claim)}.")
            return self._worker_record(record)
        print(f"evomerge: study {name!r}: {n_trials} of {n_trials} trials finished; worker {self.worker} does the "
              f"held-out evaluation and export into {self.run_dir}.")
        start, prep = time.perf_counter(), self.timings.get("prepare_s", 0.0)
        with export_claim.beating(study, claim, self._interval()):
            final = self._rescore(study, get_engine)
            self.timings["final_s"] = round(time.perf_counter() - start - (self.timings.get("prepare_s", 0.0) - prep), 3)
            summary = self._outputs(study, final, False)
        summary["cluster"] = {"exported_by": self.worker, "workers": _workers(study)}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        _print_summary(summary, self.run_dir)
        record["exported"] = True
        self._worker_record(record)
        return summary

    def _interval(self) -> float:
        return float(storage_cfg(self.raw).get("heartbeat_interval") or 1)

    def _worker_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """``worker-<N>.json`` in this worker's run folder (workers started by hand share one): what it ran,
        whether it exported."""
        self.job_dir.mkdir(parents=True, exist_ok=True)
        name = f"worker-{self.raw.get('worker') if self.raw.get('worker') is not None else 0}.json"
        (self.job_dir / name).write_text(json.dumps(record, indent=2, default=str) + "\n")
        return record


def _workers(study: Any) -> dict[str, int]:
    """Trials per worker (from each trial's ``worker`` attribute)."""
    from evomerge.search.cluster.budget import WORKER_ATTR

    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        w = t.user_attrs.get(WORKER_ATTR)
        if w is not None:
            counts[w] = counts.get(w, 0) + 1
    return counts

