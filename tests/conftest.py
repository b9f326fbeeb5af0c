"""Shared pytest fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_zoo():
    """The tiny zoo, built once per machine: it lives in the normal evomerge cache
    ($EVOMERGE_CACHE or ~/.cache/evomerge), so only the first session pays the ~1.5 min
    build and every later one gets a cache hit."""
    from evomerge.zoo import load_zoo

    return load_zoo("tiny", progress=False)
