"""An index whose file is moved or replaced under an open connection.

SQLite names a rollback journal after the database's *path*. A connection
still open on a database that was moved away (its store directory renamed,
or the file replaced by a rebuilt one) therefore finds, at that path, the
journal of the new database. While another process commits to the new one,
that journal is hot, and the old connection "recovers" the new database's
pages into its own file: its next read returns rows of other keys. (This
was the cause of the rare hit with another URL's body in the store-heals
tests.) Worse, the garbled read looked like damage, and the new, sound
database was moved aside. The index must never answer a read made on a file
the path no longer names, nor judge the path's file by it.
"""
from __future__ import annotations

import glob
import os
import sqlite3

import pytest

from cachefetch.hashing import hash_bytes
from cachefetch.index import Entry, IndexUnavailable, SQLiteIndex

KEYS = [f"http://h/{i}" for i in range(400)]


def entry(key: str, salt: str = "") -> Entry:
    body = (salt + key).encode()
    return Entry(key, "", hash_bytes(body), len(body), headers=(("X-Pad", "p" * 200),), stored_at=1.0)


def new_database_mid_commit(path: str) -> sqlite3.Connection:
    """Another process's view: a new index at ``path`` with other rows, and a
    write to it under way whose journal is hot (its pages already written to
    the database file, as during any commit)."""
    other = SQLiteIndex(path)
    for key in KEYS:
        other.put(entry(key, salt="other "))
    other.close()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA synchronous=OFF")  # the journal's header is written at once: hot from the start
    writer.execute("PRAGMA cache_size=5")    # spill: the database file changes before the commit
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE entries SET headers = headers || ' '")
    assert os.path.getsize(path + "-journal") > 0
    return writer


@pytest.mark.parametrize("how", ["directory renamed", "file replaced"])
def test_a_read_on_a_moved_database_never_answers_with_another_keys_row(tmp_path, how):
    store = tmp_path / "store"
    store.mkdir()
    path = str(store / "index.sqlite3")
    index = SQLiteIndex(path, busy_timeout=0.05)  # the new database is locked by its commit: do not wait
    for key in KEYS:
        index.put(entry(key))
    index.get(KEYS[0])  # this thread's connection is open, and was checked just now
    if how == "directory renamed":
        os.rename(store, tmp_path / "gone")
        store.mkdir()
    else:
        os.rename(path, path + ".damaged-1")
    writer = new_database_mid_commit(path)
    try:
        answers = []
        for key in KEYS[1:20]:
            try:
                answers.append((key, index.get(key)))
            except IndexUnavailable:
                continue
        writer.execute("ROLLBACK")
        # Its commit over, the path's database answers: the new one's rows, not the moved file's.
        answers += [(key, index.get(key)) for key in KEYS[20:25]]
        assert [got for _, got in answers[-5:]] == [[entry(key, salt="other ")] for key in KEYS[20:25]]
    finally:
        writer.close()
        index.close()
    wrong = [(key, [e.key for e in got]) for key, got in answers if any(e.key != key for e in got)]
    assert wrong == []
    # The old file's damage is not the new database's: that one is not moved aside.
    assert glob.glob(path + ".damaged-*") == ([] if how == "directory renamed" else [path + ".damaged-1"])
    # What it answered is the new database's (the path's) or nothing: never the old file's.
    assert all(got in ([], [entry(key, salt="other ")]) for key, got in answers)
