"""The manifest of a cluster sweep's shared folder: which storage and study it belongs to.

Why a file beside the outputs: a shared folder's study may live in a server
(PostgreSQL) or in a journal file elsewhere, and ``evomerge-export`` run on
any machine later needs to find it from the folder alone. The manifest names
the storage kind, the journal path or the password-free URL, and the study;
never a password.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "evomerge-study.json"


def write_manifest(out_dir: Path, study_name: str, storage_cfg: dict[str, Any]) -> Path:
    """``out_dir/evomerge-study.json``: storage kind, journal path or password-free URL, study name."""
    from evomerge.search.backends import password_free, postgres_url

    kind = storage_cfg.get("kind", "sqlite")
    entry: dict[str, Any] = {"kind": kind}
    if kind == "postgres":
        entry["url"] = password_free(postgres_url(storage_cfg))
    else:
        path = Path(storage_cfg.get("path") or ("study.journal" if kind == "journal" else "study.db"))
        entry["path"] = str((path if path.is_absolute() else out_dir / path).resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MANIFEST
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"study_name": study_name, "storage": entry}, indent=2) + "\n")
    tmp.replace(target)
    return target


def manifest(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def manifest_storage(run_dir: Path) -> Any | None:
    """The storage a cluster sweep's shared folder names (``evomerge-export`` uses it), or None.

    PostgreSQL: $EVOMERGE_STORAGE_URL when it names the same database (it may carry the password),
    else the recorded password-free URL (libpq then reads PGPASSWORD or ~/.pgpass).
    """
    from evomerge.search.backends import ENV_URL, password_free
    from evomerge.search.storage import make_storage

    info = manifest(run_dir)
    if info is None:
        return None
    entry = dict(info["storage"])
    if entry["kind"] == "postgres":
        env = os.environ.get(ENV_URL)
        if env and password_free(env.replace("postgres://", "postgresql://", 1)) == entry["url"]:
            entry["url"] = env
    return make_storage({**entry, "heartbeat_interval": None}, Path(run_dir))


def manifest_study(run_dir: Path) -> str | None:
    info = manifest(run_dir)
    return None if info is None else str(info["study_name"])
