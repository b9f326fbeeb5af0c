"""User-facing errors.

Every error a user can cause (a bad recipe, a missing shard, mismatched models, a
bad search config) is an :class:`EvomergeError` whose message is one paragraph
naming the file, tensor or key at fault and how to fix it. Command-line entry
points catch it, print the message and exit non-zero, never a traceback.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class EvomergeError(Exception):
    """Base class: the message is shown to the user as is."""


class CheckpointError(EvomergeError):
    """A model directory, shard, adapter or tokenizer is missing, corrupt or incompatible."""


class RecipeError(EvomergeError):
    """A recipe (mergekit YAML) is malformed or names something that does not exist."""


class MergeError(EvomergeError):
    """A merge method was given parameters or tensors it cannot merge."""


class ConfigError(EvomergeError):
    """A search / Hydra configuration value is invalid."""


class ZooError(EvomergeError):
    """A zoo cannot be built or loaded (unknown name, missing optional dependency...)."""


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn an EvomergeError into ``prog: error: <message>`` on stderr and exit status 2."""
    try:
        yield
    except EvomergeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
