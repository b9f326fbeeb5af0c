"""Optuna's private surface, in one place.

evomerge writes to a study below ``Study``'s public methods in three places: the
in-memory mirror copies a trial's parameters into the persistent study in one
transaction, the cluster's budget gate and final claim change trial states and
study system attributes under its own mutex, and heartbeat bookkeeping keys
trials by their storage id. Optuna exposes none of these handles publicly, so
every such access goes through the functions here: an Optuna upgrade that moves
them breaks this file alone, and ``grep optuna_io`` lists every dependent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat  # noqa: F401  (re-exported: the journal's heartbeats)
from optuna.trial import FrozenTrial


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage as Optuna uses it (through its cache layer, so writes stay coherent)."""
    return study._storage  # noqa: SLF001


def study_id(study: optuna.Study) -> int:
    return study._study_id  # noqa: SLF001


def trial_id(trial: FrozenTrial | optuna.trial.Trial) -> int:
    """A trial's id in its storage (what the storage's trial methods take; ``number`` is per study)."""
    return trial._trial_id  # noqa: SLF001


def journal_file(storage: Any) -> Path | None:
    """The file of a journal storage (None for any other storage)."""
    path = getattr(getattr(storage, "_backend", None), "_file_path", None)
    return None if path is None else Path(path)


def study_system_attr(study: optuna.Study, key: str) -> Any:
    return storage_of(study).get_study_system_attrs(study_id(study)).get(key)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    storage_of(study).set_study_system_attr(study_id(study), key, value)
