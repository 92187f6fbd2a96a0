"""Shared pytest fixtures. Keep this file generic: helpers for one module's
tests belong in that module's test file."""
from __future__ import annotations

import os
import sys

import pytest

#: The repository root (the directory holding the ``cachefetch`` package).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Make ``import cachefetch`` work without an install (and in child processes
# started with PYTHONPATH=REPO_ROOT).
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from cachefetch.index import Entry, SQLiteIndex  # noqa: E402
from cachefetch.store import CAFS  # noqa: E402


@pytest.fixture
def store(tmp_path):
    """A fresh CAFS under the test's ``tmp_path``, with fsync on (the default)."""
    return CAFS(tmp_path / "store")


@pytest.fixture
def cafs(tmp_path):
    """A store and its index, laid out as ``cachefetch serve`` lays them out
    (fsync off); the index is closed afterwards."""
    store = CAFS(tmp_path / "store", fsync=False)
    index = SQLiteIndex(os.path.join(store.root, "index.sqlite3"))
    yield store, index
    index.close()


def add_entry(store: CAFS, index: SQLiteIndex, key: str, data: bytes, last_used: float | None = None) -> Entry:
    """Store ``data`` as the entry ``key``, optionally setting when it was last used."""
    blob = store.put(data)
    entry = Entry(key, "", blob.hash, blob.size)
    index.put(entry)
    if last_used is not None:
        index.touch(key, "", last_used)
    return entry


#: The injected clock's start (epoch seconds) for in-process CacheFetch tests.
T0 = 1_700_000_000.0


@pytest.fixture
def now():
    """The injected wall clock: ``now[0]``, advanced by the test."""
    return [T0]


@pytest.fixture
def make(tmp_path, now):
    """``make(app, **options)``: a CacheFetch on a fresh store with the injected clock
    (closed after the test)."""
    from cachefetch import CacheFetch

    made = []

    def make(app, **kw):
        kw.setdefault("fsync", False)
        kw.setdefault("clock", lambda: now[0])
        mw = CacheFetch(app, kw.pop("store", tmp_path / "store"), **kw)
        made.append(mw)
        return mw

    yield make
    for mw in made:
        mw.close()
