"""Keep a database password given on the command line out of files and messages.

The documented ways to give one are ``~/.pgpass``, ``PGPASSWORD`` and
``$EVOMERGE_STORAGE_URL``, which Hydra never sees. A password written into
``storage.url=postgresql://user:PASSWORD@host/db`` is still handled: Hydra has by
then written the overrides into the run folder's ``.hydra/`` (config, hydra and
overrides files), and its launcher logs each job's overrides. So, before any other
work, those files are rewritten with the password masked, every log record of the
process is masked, and an unexpected error's message is masked before it is shown.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterable

# user:password@ in any URL with a scheme (the password may not hold '@' or whitespace)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s/]+)@", re.IGNORECASE)


def mask(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with the password of every URL in it, and each of ``secrets``, replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def url_secrets(raw: dict[str, Any]) -> list[str]:
    """The passwords in the config's storage URL (none when the URL comes from the environment)."""
    url = str((raw.get("storage") or {}).get("url") or "")
    m = _URL_PASSWORD.search(url)
    return [m.group(2)] if m else []


def scrub_hydra_files(run_dir: Path, secrets: list[str], sweep_dir: Path | None = None) -> list[Path]:
    """Rewrite the run folder's Hydra records (and a multirun's ``multirun.yaml``) with ``secrets`` masked;
    return the files changed."""
    changed = []
    files = sorted((run_dir / ".hydra").glob("*.yaml")) + ([sweep_dir / "multirun.yaml"] if sweep_dir else [])
    for path in (p for p in files if p.is_file()):
        text = path.read_text()
        clean = mask(text, secrets)
        if clean != text:
            path.write_text(clean)
            changed.append(path)
    return changed


def mask_log_records() -> None:
    """Mask URL passwords in every log record made from now on in this process (Hydra's launcher logs each
    job's overrides before evomerge's code runs; a record factory, unlike a filter, survives the logging
    set-up Hydra applies)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_evomerge_masks", False):
        return

    def masked(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report, not ours
            return record
        if "://" in message:
            record.msg, record.args = mask(message), ()
        return record

    masked._evomerge_masks = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(masked)
