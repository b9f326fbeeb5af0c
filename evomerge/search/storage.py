"""Where a study lives: the ``storage`` config group turned into an Optuna storage.

SQLite in the run directory is the default; a journal file is the cheap
alternative. Every storage kind is one entry in :data:`_BUILDERS`, so
PostgreSQL (many workers sharing one study) is an addition, not a rewrite.

Why the SQLite pragmas: Optuna writes each suggested parameter in its own
transaction, and SQLite's default journal fsyncs every commit: 24 genes cost
0.4 s per trial on this machine's disk. Write-ahead logging with
``synchronous=NORMAL`` brings that to 0.03 s. It stays safe against a killed
process (the WAL is replayed on the next open); only an operating-system crash
can lose the last commits, which resume then redoes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy

from evomerge.errors import ConfigError

Builder = Callable[[dict[str, Any], Path, Any], optuna.storages.BaseStorage]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _rdb(url: str, cfg: dict[str, Any], failed_trial_callback: Any) -> optuna.storages.RDBStorage:
    hb = cfg.get("heartbeat_interval")
    kwargs: dict[str, Any] = {}
    if hb:
        import inspect

        # Optuna 4.9 renamed failed_trial_callback (now deprecated) to heartbeat_stale_trial_callback.
        params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
        kwargs = {"heartbeat_interval": int(hb), "grace_period": cfg.get("grace_period"), name: failed_trial_callback}
    try:
        storage = optuna.storages.RDBStorage(url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy / driver errors vary by backend
        raise ConfigError(f"storage: cannot open {url!r}: {exc}. Check storage.path (or storage.url) and permissions.") from None
    if url.startswith("sqlite"):
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # reconnect so the pragmas apply to every pooled connection
    return storage


def _sqlite(cfg: dict[str, Any], run_dir: Path, cb: Any) -> optuna.storages.BaseStorage:
    path = Path(cfg.get("path") or "study.db")
    if not path.is_absolute():
        path = run_dir / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return _rdb(f"sqlite:///{path.resolve()}", cfg, cb)


def _journal(cfg: dict[str, Any], run_dir: Path, cb: Any) -> optuna.storages.BaseStorage:
    """An append-only journal file: about 4x cheaper per trial than SQLite (see results/search_speed.md)."""
    from optuna.storages import JournalStorage

    from evomerge.search.cluster.storage import journal_backend, journal_storage

    path = Path(cfg.get("path") or "study.journal")
    if not path.is_absolute():
        path = run_dir / path
    path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.get("heartbeat_interval"):  # workers share the file: dead ones are found by heartbeat (README, cluster)
        return journal_storage(path.resolve(), cfg, cb)
    return JournalStorage(journal_backend(path.resolve()))


def _postgres(cfg: dict[str, Any], run_dir: Path, cb: Any) -> optuna.storages.BaseStorage:
    """A PostgreSQL database many workers share (URL from storage.url or $EVOMERGE_STORAGE_URL)."""
    from evomerge.search.cluster.storage import postgres_storage

    return postgres_storage(cfg, cb)


_BUILDERS: dict[str, Builder] = {"sqlite": _sqlite, "journal": _journal, "postgres": _postgres}


def make_storage(cfg: dict[str, Any], run_dir: Path, failed_trial_callback: Any = None) -> optuna.storages.BaseStorage:
    """The Optuna storage a ``storage`` config describes (relative paths are inside the run directory)."""
    kind = cfg.get("kind", "sqlite")
    if kind not in _BUILDERS:
        raise ConfigError(f"storage.kind = {kind!r} is not supported; use one of {', '.join(sorted(_BUILDERS))} "
                          f"(e.g. `storage=sqlite`).")
    return _BUILDERS[kind](cfg, run_dir, failed_trial_callback)


def storage_url(storage: optuna.storages.BaseStorage) -> str | None:
    """What ``optuna-dashboard`` opens: the RDB URL, or the journal file's path."""
    url = getattr(storage, "url", None)
    if url is not None:
        from evomerge.search.cluster.storage import mask_url

        return mask_url(str(url))  # never a password in summaries and logs
    backend = getattr(storage, "_backend", None)
    path = getattr(backend, "_file_path", None)
    return None if path is None else str(path)


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    """Whether dead workers are detected by heartbeat (else: by taking over RUNNING trials at start-up)."""
    get = getattr(storage, "get_heartbeat_interval", None)  # also through Optuna's cache wrapper (study._storage)
    return get is not None and get() is not None
