"""The study mutex that many workers share.

Why a mutex of evomerge's own: Optuna makes single operations atomic (creating
a trial, taking a WAITING trial), but an exact study-wide budget needs
"count the trials, then start one" to be atomic across workers, and so do
"set the study up once" and "claim the final export". Each shared storage
gets the cheapest mutex that a dead holder cannot keep forever:

* PostgreSQL: a transaction-scoped advisory lock on its own connection. The
  server drops it when the transaction ends, and at once when the worker's
  connection dies (SIGKILL closes the socket); ``idle_in_transaction_session_timeout``
  frees it when a whole node vanishes without closing anything.
* Journal file / SQLite: an ``flock`` on a lock file next to the storage
  (:class:`FileMutex`), which the kernel (on NFS, the server's lock manager)
  releases the moment its holder dies.

The storages themselves are :mod:`evomerge.search.backends`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from evomerge.errors import ConfigError
from evomerge.locks import FileMutex
from evomerge.search.backends import NO_LOCKS, lock_key, mask_url
from evomerge.search.optuna_io import journal_file

LOCK_IDLE_TIMEOUT_S = 300  # a vanished node's advisory lock is freed by the server after this


# ---- the study mutex --------------------------------------------------------------------------
class PgMutex:
    """``pg_advisory_xact_lock`` held by an open transaction on a dedicated connection."""

    def __init__(self, engine: Any, name: str) -> None:
        self.engine, self.key, self.conn = engine, lock_key(name), None

    def __enter__(self) -> "PgMutex":
        import sqlalchemy

        self.conn = self.engine.connect()
        self.conn.execute(sqlalchemy.text(f"SET LOCAL idle_in_transaction_session_timeout = '{LOCK_IDLE_TIMEOUT_S}s'"))
        self.conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": self.key})
        return self

    def __exit__(self, *exc: Any) -> None:
        conn, self.conn = self.conn, None
        try:
            conn.rollback()  # ends the transaction: the lock goes with it
        finally:
            conn.close()


def study_mutex(storage: optuna.storages.BaseStorage, study_name: str) -> PgMutex | FileMutex:
    """The mutex for ``study_name`` in ``storage`` (the storage object ``make_storage`` returned)."""
    url = getattr(storage, "url", None)
    if url is not None:
        url = str(url)
        if url.startswith("postgresql"):
            return PgMutex(storage.engine, study_name)
        if url.startswith("sqlite:///"):
            return FileMutex(Path(url[len("sqlite:///"):] + f".{lock_key(study_name) & 0xFFFFFFFF:08x}"), NO_LOCKS)
        raise ConfigError(f"cluster workers need storage=postgres, journal or sqlite; {mask_url(url)} is none of them.")
    path = journal_file(storage)
    if path is None:
        raise ConfigError("cluster workers need storage=postgres, journal or sqlite.")
    return FileMutex(Path(f"{path}.{lock_key(study_name) & 0xFFFFFFFF:08x}"), NO_LOCKS)
