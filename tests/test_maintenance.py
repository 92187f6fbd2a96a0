"""cachefetch.maintenance: parse_size, collect_garbage, verify_store, SizeLimiter.

Every store is a real CAFS + SQLiteIndex under tmp_path; ages are set with
SQLiteIndex.touch (last use) and os.utime (blob mtime), never waited for.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest

from conftest import add_entry

from harness import wait_until

from cachefetch.index import SQLiteIndex
from cachefetch.maintenance import (SizeLimiter, clear_orphans, collect_garbage, parse_size, store_usage,
                                    verify_store)
from cachefetch.store import CAFS

HOUR = 3600.0


def age_blob(store: CAFS, h, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(store.path(h), (then, then))


def keys(index: SQLiteIndex) -> set[str]:
    return {e.key for e in index}


# -- parse_size -------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("1000", 1000),
    ("0", 0),
    ("500M", 500 << 20),
    ("500m", 500 << 20),
    ("20G", 20 << 30),
    ("20GB", 20 << 30),
    ("64K", 64 << 10),
    ("1.5TiB", int(1.5 * (1 << 40))),
    ("2T", 2 << 40),
    (" 7 MiB ", 7 << 20),
    ("12B", 12),
])
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "junk", "M", "-5", "5X", "1.2.3", "20 G B", "1e3", "inf", "nan", "0x10",
                                  "5MM", "10 20"])
def test_parse_size_rejects_junk(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_parse_size_rejects_non_strings():
    for value in (None, 500, b"500M"):
        with pytest.raises(ValueError):
            parse_size(value)


# -- collect_garbage ----------------------------------------------------------
# The size counts the index's own pages and -wal, which grow by pages as the
# index is written: each limit below is what the index takes now, plus the
# blob bytes the test means to keep, plus half a blob of slack for that.
K = 64 * 1024


def own(index: SQLiteIndex) -> int:
    u = index.usage()
    return u.index_bytes + u.wal_bytes


def limit(store: CAFS, index: SQLiteIndex, keep: int) -> int:
    collect_garbage(store, index, 1 << 50)  # admits what was stored: writes that grow the -wal
    return own(index) + keep + K // 2


def blob_bytes(index: SQLiteIndex) -> int:
    return index.usage().blob_bytes


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_gc_evicts_least_recently_used_first_and_stops_at_the_size(cafs, policy):
    """LRU by last use; S3-FIFO, whose entries here were never used after
    being stored, in the order they came (all four sit in its small queue)."""
    store, index = cafs
    now = time.time()
    # Inserted in one order, used in another: for LRU the order of last use must decide.
    ages = {"c": 4 * HOUR, "a": 3 * HOUR, "d": 2 * HOUR, "b": 1 * HOUR}
    blobs = {}
    for key in "cadb" if policy == "s3fifo" else "abcd":
        blobs[key] = add_entry(store, index, key, key.encode() * K, last_used=now - ages[key]).hash
    if policy == "s3fifo":  # touch() counts a use: these were "stored", not used
        index._connect().execute("UPDATE entries SET freq = 0")
    assert store_usage(store) == (4, 4 * K) and blob_bytes(index) == 4 * K

    report = collect_garbage(store, index, limit(store, index, 3 * K), policy=policy)  # exactly one eviction
    assert (report.evicted_entries, report.removed_blobs, report.policy) == (1, 1, policy)
    assert report.before > report.after >= 3 * K
    assert keys(index) == {"a", "b", "d"} and blob_bytes(index) == 3 * K
    assert not store.exists(blobs["c"])

    report = collect_garbage(store, index, limit(store, index, K + K // 4), policy=policy)  # one eviction is not enough
    assert (report.evicted_entries, report.removed_blobs) == (2, 2)
    assert keys(index) == {"b"}
    assert [store.exists(blobs[k]) for k in "abcd"] == [False, True, False, False]
    assert store_usage(store) == (1, K) and blob_bytes(index) == K


def test_gc_does_nothing_when_under_the_size(cafs):
    store, index = cafs
    add_entry(store, index, "a", b"x" * K, last_used=time.time() - HOUR)
    report = collect_garbage(store, index, limit(store, index, K))
    assert (report.evicted_entries, report.removed_blobs) == (0, 0)
    assert report.before == index.usage().total
    assert keys(index) == {"a"}


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_gc_never_evicts_an_entry_used_in_the_last_minute(cafs, policy):
    store, index = cafs
    now = time.time()
    old = add_entry(store, index, "old", b"o" * K, last_used=now - 61)
    recent = add_entry(store, index, "recent", b"r" * K, last_used=now - 50)
    fresh = add_entry(store, index, "fresh", b"f" * K)  # put() records a use now
    report = collect_garbage(store, index, 0, policy=policy)
    assert keys(index) == {"recent", "fresh"}
    assert not store.exists(old.hash)
    assert store.exists(recent.hash) and store.exists(fresh.hash)
    assert report.evicted_entries == 1 and blob_bytes(index) == 2 * K
    # With a shorter protection window the same entries are fair game.
    collect_garbage(store, index, 0, protect=10, policy=policy)
    assert keys(index) == {"fresh"}
    assert blob_bytes(index) == K


def test_gc_removes_unreferenced_blobs_only_past_the_grace_period(cafs):
    store, index = cafs
    now = time.time()
    entry = add_entry(store, index, "a", b"a" * K, last_used=now - HOUR)
    stale = store.put(b"s" * K).hash    # no entry, written long ago: a leftover
    young = store.put(b"y" * K).hash    # no entry yet: maybe a commit whose entry is coming
    age_blob(store, stale, 601)

    # A pass without a sweep does not walk the store: leftovers wait for one.
    report = collect_garbage(store, index, limit(store, index, K))
    assert store.exists(stale) and report.removed_blobs == 0

    report = collect_garbage(store, index, limit(store, index, K), sweep=True)
    # The old unreferenced blob goes; the entry fits, so it is not evicted.
    assert (report.evicted_entries, report.removed_blobs) == (0, 1)
    assert not store.exists(stale)
    assert store.exists(young) and keys(index) == {"a"}

    report = collect_garbage(store, index, 0, sweep=True)
    # The young blob is spared even though the store stays over the size.
    assert store.exists(young)
    assert not store.exists(entry.hash) and len(index) == 0
    assert (report.evicted_entries, report.removed_blobs) == (1, 1)

    report = collect_garbage(store, index, 0, grace=0.0, sweep=True)
    assert not store.exists(young) and report.removed_blobs == 1


def test_gc_removes_a_replaced_entrys_old_blob_after_the_grace_period(cafs):
    store, index = cafs
    old = add_entry(store, index, "a", b"version 1" * 100)
    new = add_entry(store, index, "a", b"version 2" * 100)  # same key, new body
    assert index.usage().orphan_bytes == 900 and blob_bytes(index) == 900
    collect_garbage(store, index, None)
    assert store.exists(old.hash)  # unreferenced only just now: within the grace period
    report = collect_garbage(store, index, None, grace=0.0)
    assert report.removed_blobs == 1 and not store.exists(old.hash) and store.exists(new.hash)
    assert index.usage().orphan_bytes == 0 and blob_bytes(index) == 900


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_gc_keeps_a_blob_another_entry_still_points_at(cafs, policy):
    store, index = cafs
    now = time.time()
    shared = b"s" * K
    a = add_entry(store, index, "a", shared, last_used=now - 3 * HOUR)
    b = add_entry(store, index, "b", b"b" * K, last_used=now - 2 * HOUR)
    c = add_entry(store, index, "c", shared, last_used=now - HOUR)
    index._connect().execute("UPDATE entries SET freq = 0")
    assert a.hash == c.hash and blob_bytes(index) == 2 * K  # the shared blob counted once
    report = collect_garbage(store, index, limit(store, index, K), policy=policy)
    # Evicting "a" frees nothing ("c" still needs its blob), so "b" goes too.
    assert keys(index) == {"c"}
    assert store.exists(c.hash) and not store.exists(b.hash)
    assert (report.evicted_entries, report.removed_blobs) == (2, 1)
    assert blob_bytes(index) == K


def test_gc_counts_entries_whose_blob_is_already_gone(cafs):
    store, index = cafs
    now = time.time()
    ghost = add_entry(store, index, "ghost", b"g" * K, last_used=now - 2 * HOUR)
    store.delete(ghost.hash)
    add_entry(store, index, "a", b"a" * K, last_used=now - HOUR)
    add_entry(store, index, "b", b"b" * K, last_used=now - 100)
    report = collect_garbage(store, index, limit(store, index, K), policy="lru")
    assert keys(index) == {"b"}
    assert (report.evicted_entries, report.removed_blobs) == (2, 1)


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_gc_never_evicts_a_blob_being_served(cafs, policy):
    store, index = cafs
    now = time.time()
    served = add_entry(store, index, "served", b"being served" * 100, last_used=now - 3 * HOUR)
    other = add_entry(store, index, "other", b"o" * K, last_used=now - 2 * HOUR)
    with store.open(served.hash) as f:  # a response sending it holds it open like this
        report = collect_garbage(store, index, 0, policy=policy)
        assert keys(index) == {"served"} and store.exists(served.hash)
        assert not store.exists(other.hash)
        assert (report.evicted_entries, report.removed_blobs) == (1, 1)
        assert f.read() == b"being served" * 100
    collect_garbage(store, index, 0, policy=policy)  # sent: now it may go
    assert len(index) == 0 and not store.exists(served.hash)


def test_gc_rejects_bad_arguments(cafs):
    store, index = cafs
    with pytest.raises(ValueError):
        collect_garbage(store, index, -1)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        collect_garbage(store, index, 10, policy="mru")
    with pytest.raises(ValueError):
        collect_garbage(store, index, 10, stale_window=-1)


# -- verify_store / clear_orphans ---------------------------------------------

def test_verify_store_reports_progress_for_every_blob(cafs):
    store, index = cafs
    for i in range(3):
        add_entry(store, index, f"k{i}", bytes([i]) * (100 * (i + 1)))
    calls = []
    report = verify_store(store, index, progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)]
    assert calls[-1][2] == 600 == report.bytes_checked
    assert report.blobs_checked == 3 and not report.damaged and report.orphan_files == []


def test_verify_store_repair_removes_the_corrupt_blob_and_every_entry_on_it(cafs):
    store, index = cafs
    bad = add_entry(store, index, "bad1", b"will rot" * 50)
    add_entry(store, index, "bad2", b"will rot" * 50)
    good = add_entry(store, index, "good", b"fine" * 50)
    path = store.path(bad.hash)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"ROT")
    report = verify_store(store, index)
    assert report.corrupt_blobs == [bad.hash] and report.damaged and not report.repaired
    assert store.exists(bad.hash) and keys(index) == {"bad1", "bad2", "good"}
    report = verify_store(store, index, repair=True)
    assert report.corrupt_blobs == [bad.hash] and report.repaired
    assert report.missing_blob_entries == []  # removed with the blob, not reported twice
    assert not store.exists(bad.hash) and keys(index) == {"good"} and store.exists(good.hash)
    assert not verify_store(store, index).damaged


def test_clear_orphans_spares_young_put_temps(cafs):
    store, _ = cafs
    f, young = store.new_temp()
    f.close()
    f, old = store.new_temp()
    f.close()
    then = time.time() - 2 * HOUR
    os.utime(old, (then, then))
    assert clear_orphans(store) == [old]
    assert os.path.exists(young) and not os.path.exists(old)
    assert clear_orphans(store, stale_after=0) == [young]


# -- SizeLimiter -------------------------------------------------------------

def test_size_limiter_shrinks_a_store_in_the_background_and_stop_joins(cafs):
    store, index = cafs
    now = time.time()
    entries = [add_entry(store, index, f"k{i}", bytes([i]) * K, last_used=now - (10 - i) * HOUR) for i in range(6)]
    assert store_usage(store)[1] == 6 * K
    limiter = SizeLimiter(store, index, max_size=limit(store, index, 2 * K), interval=0.01, policy="lru")
    limiter.start()
    try:
        wait_until(lambda: store_usage(store)[1] <= 2 * K, timeout=15, what="the store to shrink")
    finally:
        limiter.stop()
    assert not limiter._thread.is_alive()
    assert keys(index) == {"k4", "k5"}  # the two used most recently
    assert [store.exists(e.hash) for e in entries] == [False] * 4 + [True] * 2
    assert os.path.exists(os.path.join(store.root, "gc.lock"))


def test_size_limiter_stop_does_not_wait_for_the_interval(cafs):
    store, index = cafs
    limiter = SizeLimiter(store, index, max_size=0, interval=3600)
    limiter.start()
    stopper = threading.Thread(target=limiter.stop, daemon=True)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive(), "stop() waited for the interval"
    assert not limiter._thread.is_alive()


def test_size_limiter_defers_to_another_collector_holding_the_lock(cafs):
    store, index = cafs
    now = time.time()
    for i in range(3):
        add_entry(store, index, f"k{i}", bytes([i]) * 1000, last_used=now - HOUR)
    lock_path = os.path.join(store.root, "gc.lock")
    # Another worker's collector holds the lock: this limiter must keep out of the way.
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seen = threading.Event()
        limiter = SizeLimiter(store, index, max_size=0, interval=0.01)
        original = limiter._stop.wait

        def counting_wait(timeout):
            # Each wait after the first follows one pass of the loop body.
            if counting_wait.calls >= 5:
                seen.set()
            counting_wait.calls += 1
            return original(timeout)

        counting_wait.calls = 0
        limiter._stop.wait = counting_wait
        limiter.start()
        try:
            assert seen.wait(15), "the limiter's loop did not run"
            assert store_usage(store) == (3, 3000) and len(index) == 3
        finally:
            limiter.stop()
    # The lock released, the next pass collects.
    limiter = SizeLimiter(store, index, max_size=0, interval=0.01)
    limiter.start()
    try:
        wait_until(lambda: store_usage(store)[0] == 0, timeout=15, what="the store to empty")
    finally:
        limiter.stop()


def test_size_limiter_rejects_bad_settings(cafs):
    store, index = cafs
    with pytest.raises(ValueError):
        SizeLimiter(store, index, max_size=-1)
    with pytest.raises(ValueError):
        SizeLimiter(store, index, max_size=10, interval=0)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        SizeLimiter(store, index, max_size=10, policy="fifo")
