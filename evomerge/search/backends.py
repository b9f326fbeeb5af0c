"""Storages that many workers share: PostgreSQL (its URL never shown with a password), a journal file with
heartbeats.

Why the journal storage is subclassed: Optuna's journal storage has no
heartbeats, so a dead worker's trial would stay RUNNING forever. Heartbeats
are written as a trial system attribute; a trial is stale when *this* process
has seen the same heartbeat value for longer than ``grace_period`` (no clock
is compared across machines, so clock skew between nodes cannot fail a live
trial).
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.storages import JournalStorage
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import ConfigError
from evomerge.locks import FileMutex
from evomerge.search import record
from evomerge.search.optuna_io import BaseHeartbeat, trial_id

NO_LOCKS = "put the study in PostgreSQL instead (storage=postgres)"

ENV_URL = "EVOMERGE_STORAGE_URL"

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


# ---- passwords -------------------------------------------------------------------------------
def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (what every log, message and summary shows)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is still masked
        return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


def _scrub(text: str, url: str) -> str:
    """An error message with the URL's password removed wherever a driver echoed it."""
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:  # noqa: BLE001
        password = None
    text = text.replace(url, mask_url(url))
    return text.replace(str(password), "***") if password else text


def postgres_url(cfg: dict[str, Any]) -> str:
    """``storage.url``, else $EVOMERGE_STORAGE_URL; ``postgres://`` is accepted as ``postgresql://``."""
    url = cfg.get("url") or os.environ.get(ENV_URL)
    if not url:
        raise ConfigError(f"storage=postgres needs a database URL: export {ENV_URL}=postgresql://USER@HOST:5432/DB "
                          f"(password in ~/.pgpass or PGPASSWORD, or in the URL), or set storage.url. "
                          f"See docs/cluster.md.")
    url = str(url)
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if not url.startswith("postgresql"):
        raise ConfigError(f"storage.url = {mask_url(url)!r} is not a PostgreSQL URL (postgresql://USER@HOST:PORT/DB).")
    if url.startswith("postgresql://"):
        url = "postgresql+" + _installed_driver() + url[len("postgresql"):]
    return url


def _installed_driver() -> str:
    """The driver a plain ``postgresql://`` URL means here: SQLAlchemy 2.1 takes it for psycopg 3, while the
    ``[cluster]`` extra installs psycopg2; whichever is installed serves (psycopg 3 first)."""
    import importlib.util

    return "psycopg" if importlib.util.find_spec("psycopg") is not None else "psycopg2"


def password_free(url: str) -> str:
    """The URL without its password (libpq then reads PGPASSWORD or ~/.pgpass): safe to write to disk."""
    from sqlalchemy.engine import URL, make_url

    u = make_url(url)
    return URL.create(u.drivername, u.username, None, u.host, u.port, u.database, u.query).render_as_string(
        hide_password=False)


# ---- PostgreSQL ------------------------------------------------------------------------------
def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(f"evomerge:{name}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def _session_lock(url: str, name: str) -> Iterator[None]:
    """A session advisory lock on a throw-away connection (serialises first-time schema creation)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": lock_key(name)})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key(name)})
                conn.commit()
    finally:
        engine.dispose()


def postgres_storage(cfg: dict[str, Any], failed_trial_callback: StaleCallback | None) -> optuna.storages.RDBStorage:
    """An RDBStorage on PostgreSQL with heartbeats; errors never show the password."""
    url = postgres_url(cfg)
    hb = cfg.get("heartbeat_interval")
    kwargs: dict[str, Any] = {"engine_kwargs": {"pool_pre_ping": True}}  # reconnect after a DB restart mid-sweep
    if hb:
        kwargs.update(heartbeat_interval=int(hb), grace_period=_int_or_none(cfg.get("grace_period")))
        kwargs[stale_callback_kwarg()] = failed_trial_callback
    import importlib.util

    from sqlalchemy.engine import make_url

    driver = make_url(url).get_driver_name()
    if importlib.util.find_spec(driver) is None:
        raise ConfigError(f"storage=postgres: the URL names the driver {driver!r}, which is not installed: "
                          f"pip install 'evomerge[cluster]' (psycopg2-binary), or write the URL as "
                          f"postgresql://USER@HOST:PORT/DB to use whichever driver is installed.")
    try:
        with _session_lock(url, "schema"):  # concurrent first-time CREATE TABLEs race in PostgreSQL
            return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - driver errors vary; the message must not carry the password
        raise ConfigError(f"storage: cannot open {mask_url(url)}: {_scrub(str(exc).strip(), url)}. Check the URL "
                          f"(${ENV_URL} or storage.url), that the server accepts connections from this host, and the "
                          f"password (~/.pgpass or PGPASSWORD).") from None


def stale_callback_kwarg() -> str:
    """Optuna 4.9 renamed ``failed_trial_callback`` (now deprecated) to ``heartbeat_stale_trial_callback``."""
    import inspect

    params = inspect.signature(optuna.storages.RDBStorage).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


# ---- journal with heartbeats ------------------------------------------------------------------
class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage plus heartbeats, so dead workers' trials are failed and retried."""

    def __init__(self, backend: Any, heartbeat_interval: int, grace_period: int | None,
                 failed_trial_callback: StaleCallback | None) -> None:
        super().__init__(backend)
        self.heartbeat_interval = int(heartbeat_interval)
        self.grace_period = int(grace_period) if grace_period else 2 * self.heartbeat_interval
        self._stale_callback = failed_trial_callback
        self._seen: dict[int, tuple[Any, float]] = {}

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, record.HEARTBEAT, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # the trial finished between two beats

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.monotonic()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = record.heartbeat_of(t)
            if beat is None:
                continue  # not started yet by its worker (see cluster.Gate for trials that never beat)
            seen = self._seen.get(trial_id(t))
            if seen is None or seen[0] != beat:
                self._seen[trial_id(t)] = (beat, now)
            elif now - seen[1] > self.grace_period:
                stale.append(trial_id(t))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self._stale_callback

    def get_failed_trial_callback(self) -> StaleCallback | None:  # the name before Optuna 4.9
        return self._stale_callback


def journal_storage(path: Path, cfg: dict[str, Any], failed_trial_callback: StaleCallback | None) -> JournalStorage:
    backend = journal_backend(path)
    hb = cfg.get("heartbeat_interval")
    if not hb:
        return JournalStorage(backend)
    return HeartbeatJournalStorage(backend, int(hb), _int_or_none(cfg.get("grace_period")), failed_trial_callback)


def journal_backend(path: Path) -> Any:
    """Optuna's journal file, its appends serialised by a :class:`FileMutex` (a writer killed mid-append
    would otherwise stall every other writer for Optuna's 30 s lock grace period). Not named like
    Optuna's own ``.lock``: a tool using Optuna's lock would wait on it, then delete it."""
    from optuna.storages.journal import JournalFileBackend

    return JournalFileBackend(str(path), lock_obj=FileMutex(Path(f"{path}.flock"), NO_LOCKS))
