"""Upkeep that costs what changed: running totals kept exact by the index (puts,
replacements, deletes, shared blobs, two processes at once), a size check that
never walks the store, junk rows bounded by --max-size, expired rows purged, and
a version 1 index migrated with its counts."""
from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import time

import pytest

from conftest import add_entry

from cachefetch.hashing import hash_bytes
from cachefetch.index import Entry, SQLiteIndex
from cachefetch.maintenance import SizeLimiter, collect_garbage
from cachefetch.store import CAFS

WAIT = 60.0


def recount(index: SQLiteIndex) -> tuple[int, int, int]:
    """(entries, distinct blobs, their bytes) by aggregate queries: what the running totals must equal."""
    db = sqlite3.connect(index.path)
    try:
        entries = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        blobs, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM "
                                 "(SELECT DISTINCT hash, size FROM entries)").fetchone()
    finally:
        db.close()
    return entries, blobs, size


def counted(index: SQLiteIndex) -> tuple[int, int, int]:
    u = index.usage()
    referenced = index._connect().execute("SELECT COUNT(*) FROM blobs WHERE refs > 0").fetchone()[0]
    return u.entries, referenced, u.blob_bytes


def test_totals_stay_exact_across_put_replace_delete_and_shared_blobs(tmp_path):
    index = SQLiteIndex(tmp_path / "i.sqlite3")
    h404, h1, h2 = hash_bytes(b"not found"), hash_bytes(b"one"), hash_bytes(b"two")
    try:
        assert index.totals() == (0, 0) and counted(index) == (0, 0, 0)
        for i in range(50):  # fifty junk paths, one shared 404 body
            index.put(Entry(f"/junk/{i}", "", h404, 9))
        assert index.totals() == (50, 9)
        index.put(Entry("/a", "", h1, 3))
        index.put(Entry("/a", "gzip", h1, 3))  # another variant, same blob
        index.put(Entry("/a", "", h2, 3))      # replaced by another body
        assert counted(index) == recount(index) == (52, 3, 15)
        index.put(Entry("/a", "", h2, 3))      # replaced by the same body
        index.delete("/a", "gzip")
        assert counted(index) == recount(index) == (51, 2, 12)
        assert index.usage().orphan_bytes == 3  # h1: unreferenced, its file not yet removed by gc
        assert index.delete_hash(h404) == 50
        assert counted(index) == recount(index) == (1, 1, 3)
        index.delete("/a")
        assert counted(index) == recount(index) == (0, 0, 0) and len(index) == 0
        assert index.usage().orphan_bytes == 15  # the 404 body, h1 and h2
        for h in (h1, h2, h404):
            index.forget_blob(h)
        u = index.usage()
        assert (u.blobs, u.blob_bytes, u.orphan_bytes) == (0, 0, 0)
    finally:
        index.close()


def _writer(path: str, worker: int, barrier) -> None:
    """Child process: puts, replacements and deletes, some on blobs the other worker shares."""
    barrier.wait(WAIT)
    index = SQLiteIndex(path)
    try:
        for i in range(300):
            shared = hash_bytes(b"shared %d" % (i % 10))
            own = hash_bytes(b"%d-%d" % (worker, i))
            index.put(Entry(f"w{worker}-{i}", "", shared if i % 2 else own, 100 if i % 2 else i))
            if i % 3 == 0:
                index.put(Entry(f"w{worker}-{i}", "", hash_bytes(b"r%d" % i), 7))  # replace
            if i % 5 == 0:
                index.delete(f"w{worker}-{i // 2}")
            if i % 7 == 0:
                index.touch_many({(f"w{worker}-{i}", ""): time.time()})
    finally:
        index.close()


def test_totals_stay_exact_with_two_processes_writing_at_once(tmp_path):
    path = str(tmp_path / "i.sqlite3")
    SQLiteIndex(path).close()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, w, barrier)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(WAIT)
    assert [p.exitcode for p in procs] == [0, 0]
    index = SQLiteIndex(path)
    try:
        entries, blobs, size = recount(index)
        assert entries > 400 and blobs > 100  # both wrote
        assert counted(index) == (entries, blobs, size)
    finally:
        index.close()


def _forbid_walks(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the size check walked a directory")

    monkeypatch.setattr(os, "scandir", refuse)
    monkeypatch.setattr(os, "listdir", refuse)
    monkeypatch.setattr(os, "walk", refuse)


def test_the_size_check_with_nothing_to_evict_does_not_walk_the_store(cafs, monkeypatch):
    store, index = cafs
    for i in range(300):
        add_entry(store, index, f"k{i}", b"%d" % i)
    limiter = SizeLimiter(store, index, max_size=1 << 40, sweep_interval=1e9)
    limiter._last_sweep = time.monotonic()  # the sweep of the first pass is done
    assert limiter.check() is not None  # admits the new entries
    _forbid_walks(monkeypatch)
    report = limiter.check()
    assert (report.evicted_entries, report.removed_blobs, report.admitted_entries) == (0, 0, 0)
    assert report.before == report.after == index.usage().total


def test_the_size_check_over_the_limit_walks_no_store_directory_either(cafs, monkeypatch):
    store, index = cafs
    now = time.time()
    for i in range(50):
        add_entry(store, index, f"k{i}", bytes([i]) * 4096, last_used=now - 3600 + i)
    collect_garbage(store, index, 1 << 50)  # admits them
    own = index.usage().index_bytes + index.usage().wal_bytes
    import cachefetch.maintenance as maintenance
    monkeypatch.setattr(maintenance, "open_blobs", lambda store: set())  # /proc is not the store
    _forbid_walks(monkeypatch)
    report = collect_garbage(store, index, own + 25 * 4096 + 2048, policy="lru")
    # 25, or 24 if the deletes also emptied one of the index's own pages.
    assert report.evicted_entries in (24, 25) and report.removed_blobs == report.evicted_entries
    assert {e.key for e in index} == {f"k{i}" for i in range(report.evicted_entries, 50)}


def test_junk_rows_sharing_one_blob_are_bounded_by_the_size_too(cafs):
    """Issue 8: junk requests whose 404s share one blob must not grow the index
    past --max-size: rows count against it, and each evicted row frees its space."""
    store, index = cafs
    blob = store.put(b"404 Not Found")
    limit = 8 << 20
    db = index._connect()
    for start in range(0, 40000, 2000):
        with index.transaction():
            for i in range(start, start + 2000):
                db.execute("INSERT INTO entries (key, variant, hash, size, status, headers, stored_at, "
                           "expires_at, vary, initial_age, last_used) VALUES (?, '', ?, ?, 404, ?, ?, NULL, "
                           "'[]', 0, ?)", (f"http://h/junk/{i:06d}" + "x" * 60, blob.hash.hex, blob.size,
                                           json.dumps([["X-Junk", "j" * 40]] * 12), time.time(),
                                           time.time() - 3600))
    before = index.usage()
    assert before.entries == 40000 and before.blob_bytes == 13 and before.index_bytes > 4 * limit
    report = collect_garbage(store, index, limit, protect=60)
    after = index.usage()
    assert report.evicted_entries > 30000 and after.entries == 40000 - report.evicted_entries > 0
    # (The -wal, counted as it was when the pass began, grows while it deletes; the
    # next writer after a checkpoint cuts it back to 4 MiB.)
    assert after.blob_bytes + after.index_bytes <= limit
    assert os.path.getsize(index.path) <= limit  # pages given back to the file system, not just marked free
    assert store.exists(blob.hash)


def test_a_pass_without_a_size_admits_nothing_and_evicts_nothing(cafs):
    """Once a store has been full, S3-FIFO turns away objects too big for its small queue:
    with no size there is no small queue, and nothing may be turned away."""
    store, index = cafs
    with index.transaction():
        index.queues().mark_full()
    for i in range(5):
        add_entry(store, index, f"k{i}", b"%d" % i)
    report = collect_garbage(store, index, None)
    assert (report.admitted_entries, report.evicted_entries) == (0, 0) and len(index) == 5


def test_expired_rows_past_the_stale_window_are_purged(cafs):
    store, index = cafs
    now = time.time()
    week = 7 * 86400
    gone = add_entry(store, index, "long-expired", b"old")
    index.put(Entry("long-expired", "", gone.hash, gone.size, expires_at=now - week - 60))
    stale = add_entry(store, index, "stale-but-servable", b"stale")
    index.put(Entry("stale-but-servable", "", stale.hash, stale.size, expires_at=now - 3600))
    add_entry(store, index, "fresh", b"fresh")
    report = collect_garbage(store, index, None, grace=0)
    assert report.expired_entries == 1 and report.removed_blobs == 1
    assert {e.key for e in index} == {"stale-but-servable", "fresh"}
    assert not store.exists(gone.hash) and store.exists(stale.hash)
    report = collect_garbage(store, index, None, grace=0, stale_window=60)  # a shorter window
    assert report.expired_entries == 1 and {e.key for e in index} == {"fresh"}


_V1_SCHEMA = """
CREATE TABLE entries (key TEXT NOT NULL, variant TEXT NOT NULL, hash TEXT NOT NULL, size INTEGER NOT NULL,
    status INTEGER NOT NULL, headers TEXT NOT NULL, stored_at REAL NOT NULL, expires_at REAL,
    vary TEXT NOT NULL, initial_age INTEGER NOT NULL, last_used REAL NOT NULL, PRIMARY KEY (key, variant));
CREATE INDEX entries_hash ON entries(hash);
"""


def test_a_version_1_index_is_migrated_with_its_counts(tmp_path):
    path = tmp_path / "i.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    shared, other = hash_bytes(b"s"), hash_bytes(b"o")
    for key, h, size in (("a", shared, 10), ("b", shared, 10), ("c", other, 5)):
        db.execute("INSERT INTO entries VALUES (?, '', ?, ?, 200, '[]', 1.0, NULL, '[]', 0, 2.0)", (key, h.hex, size))
    db.commit()
    db.close()
    index = SQLiteIndex(path)
    try:
        assert index.totals() == (3, 15) and counted(index) == recount(index)
        index.put(Entry("d", "", other, 5))
        assert index.totals() == (4, 15)
        assert {e.key for e in index.least_recently_used(10)} == {"a", "b", "c", "d"}
        assert index._connect().execute("PRAGMA user_version").fetchone()[0] == 3
        assert index._connect().execute("SELECT 1 FROM sqlite_master WHERE name = 'entries_hash'").fetchone() is None
    finally:
        index.close()
    index = SQLiteIndex(path)  # opened again: nothing to migrate, counts kept
    try:
        assert index.totals() == (4, 15)
    finally:
        index.close()


def test_an_index_from_a_newer_cachefetch_is_refused(tmp_path):
    path = tmp_path / "i.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        SQLiteIndex(path)


def test_least_recently_used_pages_by_keyset(tmp_path):
    index = SQLiteIndex(tmp_path / "i.sqlite3")
    try:
        for i in range(10):
            index.put(Entry(f"k{i}", "", hash_bytes(b"%d" % i), 1))
            index.touch(f"k{i}", "", 100.0 + i % 5)  # ties in last use: key orders them
        first = index.least_recently_used(4)
        last = first[-1]
        rest = index.least_recently_used(100, after=(100.0 + int(last.key[1:]) % 5, last.key, last.variant))
        order = [e.key for e in first + rest]
        assert order == ["k0", "k5", "k1", "k6", "k2", "k7", "k3", "k8", "k4", "k9"]
        assert [e.key for e in index.least_recently_used(100, used_before=101.0)] == ["k0", "k5"]
        plan = " ".join(str(r) for r in index._connect().execute(
            "EXPLAIN QUERY PLAN SELECT key FROM entries WHERE (last_used, key, variant) > (?, ?, ?) "
            "ORDER BY last_used, key, variant LIMIT 5", (0, "", "")))
        assert "entries_last_used" in plan and "TEMP B-TREE" not in plan  # no sort of the table
    finally:
        index.close()
