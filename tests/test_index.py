"""cachefetch.index: Entry and SQLiteIndex (threads and processes included)."""
from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading

import pytest

from cachefetch.hashing import hash_bytes
from cachefetch.index import Entry, SQLiteIndex

H1 = hash_bytes(b"one")
H2 = hash_bytes(b"two")
WAIT = 30.0


def entry(key="k", variant="", h=H1, size=3, **kw) -> Entry:
    return Entry(key, variant, h, size, **kw)


@pytest.fixture
def index(tmp_path):
    idx = SQLiteIndex(tmp_path / "index.sqlite3")
    yield idx
    idx.close()


# -- Entry -------------------------------------------------------------------

def test_entry_validation():
    with pytest.raises(TypeError):
        Entry(1, "", H1, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Entry("k", None, H1, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Entry("k", "", H1.hex, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Entry("k", "", H1, -1)
    with pytest.raises(ValueError):
        Entry("k", "", H1, 3.0)  # type: ignore[arg-type]
    assert Entry("k", "", H1, 0).size == 0


def test_entry_age_ttl_freshness_with_explicit_now():
    e = entry(stored_at=1000.0, expires_at=1060.0, initial_age=5)
    assert e.age(1000.0) == 5
    assert e.age(1030.9) == 35  # whole seconds
    assert e.age(990.0) == 5  # a clock that went back never makes a negative age
    assert e.ttl(1000.0) == 60.0
    assert e.ttl(1070.0) == -10.0
    assert e.is_fresh(1059.9)
    assert not e.is_fresh(1060.0)
    assert not e.is_fresh(2000.0)


def test_entry_without_expiry_is_fresh_forever():
    e = entry(stored_at=1000.0, expires_at=None)
    assert e.ttl(1e12) is None
    assert e.is_fresh(1e12)


# -- SQLiteIndex -------------------------------------------------------------

def test_index_constructor_validation(tmp_path):
    with pytest.raises(TypeError):
        SQLiteIndex(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SQLiteIndex(tmp_path / "i.sqlite3", busy_timeout=-1)
    with pytest.raises(FileNotFoundError):
        SQLiteIndex(tmp_path / "no" / "such" / "dir" / "i.sqlite3")


def test_put_get_roundtrip(index):
    e = Entry("http://h/a", "v1", H1, 3, status=404,
              headers=(("Content-Type", "text/plain"), ("X-A", "1"), ("X-A", "2")),
              stored_at=1000.5, expires_at=1060.25, vary=("accept", "accept-language"), initial_age=7)
    index.put(e)
    assert index.get("http://h/a") == [e]
    assert index.get("http://h/b") == []
    with pytest.raises(TypeError):
        index.put(("not", "an", "entry"))  # type: ignore[arg-type]


def test_put_replaces_same_key_and_variant_only(index):
    index.put(entry(variant="en", h=H1))
    index.put(entry(variant="de", h=H1))
    index.put(entry(variant="en", h=H2, size=9))
    got = sorted(index.get("k"), key=lambda e: e.variant)
    assert [(e.variant, e.hash, e.size) for e in got] == [("de", H1, 3), ("en", H2, 9)]
    assert len(index) == 2


def test_delete_one_variant_or_all(index):
    for v in ("a", "b", "c"):
        index.put(entry(variant=v))
    index.put(entry(key="other"))
    assert index.delete("k", "b") == 1
    assert index.delete("k", "b") == 0
    assert sorted(e.variant for e in index.get("k")) == ["a", "c"]
    assert index.delete("k") == 2
    assert index.get("k") == []
    assert index.delete("nothing") == 0
    assert len(index) == 1


def test_delete_hash(index):
    index.put(entry(key="a", h=H1))
    index.put(entry(key="b", h=H1, variant="x"))
    index.put(entry(key="c", h=H2))
    assert index.delete_hash(H1) == 2
    assert [e.key for e in index] == ["c"]
    assert index.delete_hash(H1) == 0


def test_touch_updates_last_used(index, tmp_path):
    index.put(entry(key="other"))
    index.put(entry())
    index.touch("k", "", when=12345.0)
    index.touch("missing", "", when=1.0)  # no such entry: nothing happens
    db = sqlite3.connect(index.path)
    try:
        rows = dict(db.execute("SELECT key, last_used FROM entries").fetchall())
    finally:
        db.close()
    assert rows["k"] == 12345.0
    assert rows["other"] != 12345.0


def test_iter_and_len(index):
    assert len(index) == 0
    assert list(index) == []
    entries = {entry(key=f"k{i}", stored_at=float(i)) for i in range(5)}
    for e in entries:
        index.put(e)
    it = iter(index)
    index.delete("k0")  # iteration is a snapshot
    assert set(it) == entries
    assert len(index) == 4


def test_a_rollback_journal_not_wal(index):
    """WAL's -shm is memory-mapped: a store that turns read-only or vanishes
    under it kills the process with SIGBUS. A rollback journal maps nothing."""
    index.put(entry())
    assert index._connect().execute("PRAGMA journal_mode").fetchone()[0].lower() == "truncate"
    assert not os.path.exists(index.path + "-shm") and not os.path.exists(index.path + "-wal")


def test_reopened_index_sees_entries(tmp_path):
    a = SQLiteIndex(tmp_path / "i.sqlite3")
    a.put(entry())
    a.close()
    b = SQLiteIndex(tmp_path / "i.sqlite3")
    try:
        assert [e.hash for e in b.get("k")] == [H1]
    finally:
        b.close()


def test_many_threads_at_once(index):
    n_threads, per_thread = 8, 50
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait(WAIT)
            for i in range(per_thread):
                index.put(entry(key=f"t{t}-{i}", h=H1 if i % 2 else H2))
                got = index.get(f"t{t}-{i}")
                assert len(got) == 1 and got[0].key == f"t{t}-{i}"
                if i % 10 == 0:
                    assert len(index) >= i + 1
            index.touch(f"t{t}-0", "")
            assert index.delete(f"t{t}-0") == 1
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            index.close()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(index) == n_threads * (per_thread - 1)
    assert {e.key for e in index} == {f"t{t}-{i}" for t in range(n_threads) for i in range(1, per_thread)}


def _put_from_process(path: str, worker: int, count: int, barrier) -> None:
    """Child process: open the index (all children at once), put ``count`` entries."""
    barrier.wait(WAIT)
    idx = SQLiteIndex(path)
    try:
        for i in range(count):
            idx.put(Entry(f"p{worker}-{i}", "", hash_bytes(f"{worker}-{i}".encode()), i))
    finally:
        idx.close()


def test_four_processes_at_once(tmp_path):
    path = str(tmp_path / "shared.sqlite3")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_put_from_process, args=(path, w, 200, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    idx = SQLiteIndex(path)
    try:
        assert len(idx) == 800
        got = {e.key: e for e in idx}
        assert set(got) == {f"p{w}-{i}" for w in range(4) for i in range(200)}
        assert got["p3-199"].hash == hash_bytes(b"3-199") and got["p3-199"].size == 199
    finally:
        idx.close()


def _open_fresh_indexes(directory: str, rounds: int, barrier, conn) -> None:
    """Child process: each round, open (create) the same fresh index as the others, at once."""
    failures = []
    for r in range(rounds):
        barrier.wait(WAIT)
        try:
            SQLiteIndex(os.path.join(directory, f"round{r}.sqlite3")).close()
        except Exception as exc:
            failures.append(f"round {r}: {exc!r}")
    conn.send(failures)


def test_processes_creating_a_fresh_index_at_once(tmp_path):
    """gunicorn workers starting together on a new store all open its index:
    none of them may fail with 'database is locked'."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    pipes = [ctx.Pipe(duplex=False) for _ in range(4)]
    procs = [ctx.Process(target=_open_fresh_indexes, args=(str(tmp_path), 50, barrier, w)) for _, w in pipes]
    for p in procs:
        p.start()
    try:
        results = []
        for r, _ in pipes:
            assert r.poll(60)
            results.append(r.recv())
    finally:
        for p in procs:
            p.join(WAIT)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert results == [[], [], [], []]
