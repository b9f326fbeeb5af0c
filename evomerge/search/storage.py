"""Where a study lives: the ``storage`` config group turned into an Optuna storage.

SQLite in the run directory is the default; a journal file is the cheap
alternative. Every storage kind is one entry in :data:`_BUILDERS`, so
PostgreSQL (many workers sharing one study) is an addition, not a rewrite.

Why the SQLite pragmas: Optuna writes each suggested parameter in its own
transaction, and SQLite's default journal fsyncs every commit, once per gene.
Write-ahead logging with ``synchronous=NORMAL`` makes that a write to the log
(results/search_speed.md has the figures). It stays safe against a killed
process (the WAL is replayed on the next open); only an operating-system crash
can lose the last commits, which resume then redoes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy

from evomerge.errors import ConfigError
from evomerge.search.optuna_io import journal_file

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
        from evomerge.search.backends import stale_callback_kwarg

        kwargs = {"heartbeat_interval": int(hb), "grace_period": cfg.get("grace_period"),
                  stale_callback_kwarg(): failed_trial_callback}
    try:
        storage = optuna.storages.RDBStorage(url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy / driver errors vary by backend
        raise ConfigError(f"storage: cannot open {url!r}: {exc}. Check storage.path (or storage.url) and permissions.") from None
    if url.startswith("sqlite"):
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # reconnect so the pragmas apply to every pooled connection
    return storage


_DEFAULT_FILES = {"sqlite": "study.db", "journal": "study.journal"}


def study_file(cfg: dict[str, Any], run_dir: Path) -> Path | None:
    """The file a file storage keeps the study in (relative paths are inside the run directory); None for a
    server."""
    default = _DEFAULT_FILES.get(cfg.get("kind", "sqlite"))
    if default is None:
        return None
    path = Path(cfg.get("path") or default).expanduser()
    return (path if path.is_absolute() else run_dir / path).resolve()


def session_lock(cfg: dict[str, Any], run_dir: Path, study_name: str, *, shared: bool) -> Any:
    """The lock every process of a study on a file storage holds while it runs (see :class:`SessionLock`);
    a no-op context for PostgreSQL, whose workers coordinate through the server."""
    from contextlib import nullcontext

    from evomerge.locks import SessionLock

    path = study_file(cfg, run_dir)
    if path is None:
        return nullcontext()
    path.parent.mkdir(parents=True, exist_ok=True)
    return SessionLock(path.with_name(f"{path.name}.session"), shared=shared,
                       what=f"study {study_name!r} in {path}")


def _check_sqlite_file(path: Path) -> None:
    """An existing study file that is not SQLite is an error, never a fresh start over it. (An empty file is
    how SQLite starts a database; where a study was expected, the session refuses it: ``expect_study``.)"""
    if not path.exists():
        return
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ConfigError(f"storage: cannot read {path}: {exc.strerror}; check its permissions.") from None
    if head and head != b"SQLite format 3\x00":
        raise ConfigError(
            f"storage: {path} is not an SQLite database, so the study it held cannot be read; evomerge will not "
            f"start a new study over "
            f"it. Restore the file from a backup, or move it away to start afresh (or set storage.path / "
            f"hydra.run.dir for a new study elsewhere).")


def expect_study(storage: optuna.storages.BaseStorage, study_name: str, run_dir: Path) -> None:
    """Refuse to start ``study_name`` afresh where the run directory holds its results (``summary.json``) but
    the storage has no such study: the study file was emptied, replaced or lost, and a new study would
    overwrite ``best/`` and ``summary.json`` with a search that knows nothing of the finished trials."""
    import json

    summary = run_dir / "summary.json"
    try:
        recorded = json.loads(summary.read_text()).get("study")
    except (OSError, ValueError, AttributeError):
        return
    if recorded != study_name or study_name in optuna.get_all_study_names(storage):
        return
    raise ConfigError(
        f"{summary} records a finished search of study {study_name!r}, but its storage ({storage_url(storage)}) "
        f"holds no such study: the study file was emptied, replaced or lost, and starting anew would overwrite that "
        f"search's best/ and summary.json. Restore the study file, or start a new study elsewhere "
        f"(hydra.run.dir=... or study_name=...).")


def _sqlite(cfg: dict[str, Any], run_dir: Path, cb: Any) -> optuna.storages.BaseStorage:
    path = study_file({**cfg, "kind": "sqlite"}, run_dir)
    assert path is not None
    _check_sqlite_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _rdb(f"sqlite:///{path}", cfg, cb)


def _journal(cfg: dict[str, Any], run_dir: Path, cb: Any) -> optuna.storages.BaseStorage:
    """An append-only journal file: cheaper per trial than SQLite (measured in results/search_speed.md)."""
    from optuna.storages import JournalStorage

    from evomerge.search.backends import journal_backend, journal_storage

    path = study_file({**cfg, "kind": "journal"}, run_dir)
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.get("heartbeat_interval"):  # workers share the file: dead ones are found by heartbeat (docs/cluster.md)
        return journal_storage(path, cfg, cb)
    return JournalStorage(journal_backend(path))


def _postgres(cfg: dict[str, Any], run_dir: Path, cb: Any) -> optuna.storages.BaseStorage:
    """A PostgreSQL database many workers share (URL from storage.url or $EVOMERGE_STORAGE_URL)."""
    from evomerge.search.backends import postgres_storage

    return postgres_storage(cfg, cb)


_BUILDERS: dict[str, Builder] = {"sqlite": _sqlite, "journal": _journal, "postgres": _postgres}
STORAGE_KINDS = tuple(_BUILDERS)


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
        from evomerge.search.backends import mask_url

        return mask_url(str(url))  # never a password in summaries and logs
    path = journal_file(storage)
    return None if path is None else str(path)


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    """Whether dead workers are detected by heartbeat (else: by taking over RUNNING trials at start-up)."""
    get = getattr(storage, "get_heartbeat_interval", None)  # also through Optuna's cache wrapper (optuna_io.storage_of)
    return get is not None and get() is not None
