"""Shared pytest fixtures, and the two tiers of the suite.

``python -m pytest`` runs the fast tier: everything that needs neither the tiny zoo
(a 1.5-minute build) nor a whole search in a subprocess, in a minute or two, for the
inner loop. ``python -m pytest --full`` (the README's test command, and CI) runs every
test. A test is in the slow tier when it is marked ``slow`` or ``cluster``, or asks for
the ``tiny_zoo`` fixture.

Every test writes into a cache of its own, never the user's ``~/.cache/evomerge``:
a fresh temporary one per session, or ``$EVOMERGE_TEST_CACHE`` when set (keep the
tiny zoo between runs of the slow tier: ``EVOMERGE_TEST_CACHE=~/.cache/evomerge-tests``).
Set here, at import, so that the subprocesses tests start inherit it too.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_OWN_CACHE = os.environ.get("EVOMERGE_TEST_CACHE")
_CACHE = os.path.expanduser(_OWN_CACHE) if _OWN_CACHE else tempfile.mkdtemp(prefix="evomerge-test-cache-")
os.environ["EVOMERGE_CACHE"] = _CACHE

SLOW_MARKS = ("slow", "cluster")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run the whole suite (default: the fast tier only)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = [i for i in items if any(i.get_closest_marker(m) for m in SLOW_MARKS) or "tiny_zoo" in i.fixturenames]
    for item in slow:
        item.add_marker(pytest.mark.slow)
    if config.getoption("--full"):
        return
    config.hook.pytest_deselected(items=slow)
    keep = set(map(id, slow))
    items[:] = [i for i in items if id(i) not in keep]


def pytest_report_header(config: pytest.Config) -> str:
    tier = "full suite" if config.getoption("--full") else "fast tier (add --full for the whole suite)"
    return f"evomerge: {tier}; test cache {_CACHE}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _OWN_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_zoo():
    """The tiny zoo, built once per session in the test cache (a hit when ``$EVOMERGE_TEST_CACHE`` holds it)."""
    from evomerge.zoo import load_zoo

    return load_zoo("tiny", progress=False)
