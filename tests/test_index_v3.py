"""Index version 3 (issue 10): no index of entries by hash, and evictions that
keep the running counts in bulk while the per-row triggers stand aside. A
version 2 index, as the previous release made it, is migrated with its
counts, queues and ghost; the bulk flag is never committed; counts stay exact
with blobs shared by victims and survivors; verify looks blobs up in one scan."""
from __future__ import annotations

import sqlite3

import pytest

from conftest import add_entry
from test_eviction_cost import assert_sound

from cachefetch import index as index_module
from cachefetch.eviction import LRU, MAIN, SMALL, S3FIFO
from cachefetch.hashing import hash_bytes
from cachefetch.index import ROW_WEIGHT, Entry, SQLiteIndex, _Bulk
from cachefetch.maintenance import collect_garbage, verify_store
from cachefetch.store import CAFS


def _version_2(path) -> None:
    """An index as version 2 of the schema made it (the entries-by-hash
    index and the per-row triggers without the bulk flag)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("PRAGMA journal_mode=TRUNCATE")
    db.execute("BEGIN")
    index_module._run_script(db, index_module._TABLES)
    db.execute("CREATE INDEX entries_hash ON entries(hash)")
    for column in index_module._QUEUE_COLUMNS:
        db.execute(f"ALTER TABLE entries ADD COLUMN {column}")
    index_module._run_script(db, index_module._V2)
    db.execute("INSERT INTO totals VALUES (0, 0, 0, 0, 0)")
    index_module._run_script(db, index_module._TRIGGERS)
    db.execute("PRAGMA user_version = 2")
    db.execute("COMMIT")
    columns = "key, variant, hash, size, status, headers, stored_at, expires_at, vary, initial_age, last_used"
    shared, gone = hash_bytes(b"shared"), hash_bytes(b"gone")
    rows = [(f"k{i}", "", hash_bytes(b"%d" % i).hex, 10, 1000.0 + i) for i in range(20)]
    rows += [(f"s{i}", "", shared.hex, 7, 2000.0 + i) for i in range(3)] + [("gone", "", gone.hex, 5, 3000.0)]
    db.executemany(f"INSERT INTO entries ({columns}) VALUES (?, ?, ?, ?, 200, '[]', 0, NULL, '[]', 0, ?)", rows)
    db.execute("DELETE FROM entries WHERE key = 'gone'")  # an orphan blob, not yet removed
    db.execute(f"UPDATE entries SET queue = {SMALL}, seq = rowid WHERE key LIKE 'k%'")  # admitted
    db.execute(f"UPDATE entries SET queue = {MAIN}, seq = 100 + rowid, freq = 2 WHERE key LIKE 's%'")
    db.execute("INSERT INTO ghost VALUES (42, 1, 600)")
    db.execute("UPDATE eviction SET next_seq = 200, been_full = 1")
    db.close()


def _counts(path) -> dict:
    db = sqlite3.connect(path)
    try:
        return {"totals": db.execute("SELECT * FROM totals").fetchall(),
                "queues": db.execute("SELECT * FROM queues ORDER BY queue").fetchall(),
                "eviction": db.execute("SELECT next_seq, ghost_bytes, been_full FROM eviction").fetchall(),
                "blobs": db.execute("SELECT hash, size, refs FROM blobs ORDER BY hash").fetchall()}
    finally:
        db.close()


def test_a_version_2_index_is_migrated_with_its_counts_queues_and_ghost(tmp_path):
    path = tmp_path / "i.sqlite3"
    _version_2(path)
    before = _counts(path)
    assert before["totals"] == [(0, 23, 22, 20 * 10 + 7, 5)]
    index = SQLiteIndex(path)
    try:
        db = index._connect()
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries_hash'").fetchone() is None
        assert db.execute("SELECT bulk FROM eviction").fetchone()[0] == 0
        assert _counts(path) == before
        # The triggers go on counting every other writer's changes.
        index.put(Entry("new", "", hash_bytes(b"shared"), 7))
        index.delete("s0")
        assert _counts(path)["totals"] == [(0, 23, 22, 207, 5)]
    finally:
        index.close()


def test_a_migrated_index_evicts_and_stays_sound(tmp_path):
    store = CAFS(tmp_path / "store", fsync=False)
    _version_2(store.layout.index_path)
    for i in range(20):  # the files the rows name
        store.put(b"%d" % i)
    store.put(b"shared")
    index = SQLiteIndex(store.layout.index_path)
    try:
        s3 = S3FIFO(1 << 30)
        queues = index.queues()
        victims = s3.victims(queues)
        with index.transaction():
            gone = [next(victims) for _ in range(5)]
        assert [v.id[0] for v in gone] == [f"k{i}" for i in range(5)]
        db = index._connect()
        assert db.execute("SELECT entries, bytes FROM queues WHERE queue = ?", (SMALL,)).fetchone() == (
            15, 15 * (10 + ROW_WEIGHT))
        assert db.execute("SELECT ghost_bytes FROM eviction").fetchone()[0] == 600 + 5 * (10 + ROW_WEIGHT)
        assert index.usage().orphan_bytes == 5 + 5 * 10  # gone's, and the victims' until forgotten
        assert_sound(store, index)
    finally:
        index.close()


def test_the_bulk_flag_is_never_committed(tmp_path):
    index = SQLiteIndex(tmp_path / "i.sqlite3")
    try:
        index.put(Entry("a", "", hash_bytes(b"a"), 1))
        db = index._connect()
        with pytest.raises(RuntimeError, match="transaction"):
            with _Bulk(db):
                pass
        with pytest.raises(ZeroDivisionError):
            with index.transaction():
                with _Bulk(db):
                    db.execute("DELETE FROM entries")  # uncounted: the triggers stand aside
                    1 / 0
        assert db.execute("SELECT bulk FROM eviction").fetchone()[0] == 0
        assert [e.key for e in index] == ["a"] and index.totals() == (1, 1)
        other = sqlite3.connect(index.path)  # another writer, as any process: triggers count
        other.execute("DELETE FROM entries")
        other.commit()
        other.close()
        assert index.totals() == (0, 0) and index.usage().orphan_bytes == 1
    finally:
        index.close()


@pytest.mark.parametrize("forget_blobs", [False, True], ids=["forgotten-after", "forgotten-at-once"])
def test_victims_sharing_a_blob_with_survivors_leave_it_counted(cafs, forget_blobs):
    store, index = cafs
    shared = store.put(b"every 404").hash
    for i in range(30):
        index.put(Entry(f"junk{i}", "", shared, 9))
        index.touch(f"junk{i}", "", 1000.0 + i)
    for i in range(10):
        add_entry(store, index, f"k{i}", b"body %d" % i, last_used=2000.0 + i)
    collect_garbage(store, index, 1 << 50)  # admits them
    queues, lru = index.queues(), LRU(1 << 30, page=7)  # pages that split the junk unevenly
    victims = lru.victims(queues)
    with index.transaction(forget_blobs=forget_blobs):
        gone = [next(victims) for _ in range(20)]
        assert index.forget_unreferenced({v.blob for v in gone}) == []
    assert_sound(store, index)
    db = index._connect()
    assert db.execute("SELECT refs FROM blobs WHERE hash = ?", (shared.hex,)).fetchone()[0] == 10
    assert index.usage().blob_bytes == 9 + sum(len(b"body %d" % i) for i in range(10))
    with index.transaction(forget_blobs=forget_blobs):
        gone = [next(victims) for _ in range(11)]  # the rest of the junk, and k0
        if forget_blobs:  # the rows went with the entries
            u = index.usage()
            assert (u.blobs, u.orphan_bytes) == (9, 0)
        forgotten = index.forget_unreferenced({v.blob for v in gone})
        assert index.forget_unreferenced({v.blob for v in gone}) == []  # reported once
    assert sorted(h.hex for h in forgotten) == sorted([shared.hex, hash_bytes(b"body 0").hex])
    u = index.usage()
    assert (u.entries, u.blobs, u.orphan_bytes) == (9, 9, 0)
    assert u.blob_bytes == sum(len(b"body %d" % i) for i in range(1, 10))
    for h in forgotten:
        store.delete(h)
    assert_sound(store, index)


def test_lookups_by_hash_are_one_scan_for_many(tmp_path):
    index = SQLiteIndex(tmp_path / "i.sqlite3")
    h1, h2, h3 = hash_bytes(b"1"), hash_bytes(b"2"), hash_bytes(b"3")
    try:
        index.put(Entry("a", "", h1, 1))
        index.put(Entry("a", "gzip", h1, 1))
        index.put(Entry("b", "", h2, 1))
        assert sorted(index.naming([h1, h3])) == [("a", "", h1), ("a", "gzip", h1)]
        assert index.naming([]) == [] and index.keys_for(h2) == [("b", "")]
        assert index.known_among([h1, h2, h3]) == {h1, h2}
        plan = " ".join(str(r) for r in index._connect().execute(
            f"EXPLAIN QUERY PLAN SELECT key FROM entries WHERE hash IN {index_module._HEX_LIST}", ("[]",)))
        assert "SCAN entries" in plan  # once, testing each row against the list
        assert index.delete_hashes([h1, h2, h3]) == 3 and len(index) == 0
    finally:
        index.close()


def test_verify_finds_many_missing_blobs_in_one_scan(cafs, monkeypatch):
    store, index = cafs
    for i in range(50):
        add_entry(store, index, f"k{i}", b"%d" % i)
    for i in range(0, 50, 2):
        store.delete(hash_bytes(b"%d" % i))
    scans = []
    naming = SQLiteIndex.naming
    monkeypatch.setattr(SQLiteIndex, "naming", lambda self, hashes: scans.append(1) or naming(self, hashes))
    report = verify_store(store, index, repair=True)
    assert len(scans) == 1
    assert sorted(k for k, _, _ in report.missing_blob_entries) == sorted(f"k{i}" for i in range(0, 50, 2))
    assert sorted(e.key for e in index) == sorted(f"k{i}" for i in range(1, 50, 2))
    assert_sound(store, index)
    assert index.usage().blobs == 25


def test_forgetting_blobs_outside_a_transaction_commits_rows_and_counts_together(tmp_path):
    index = SQLiteIndex(tmp_path / "i.sqlite3")
    h1, h2 = hash_bytes(b"1"), hash_bytes(b"2")
    try:
        index.put(Entry("a", "", h1, 3))
        index.put(Entry("b", "", h2, 4))
        index.delete("a")
        assert index.forget_unreferenced([h1, h2]) == [h1]  # h2 is still named
        db = index._connect()
        assert not db.in_transaction and db.execute("SELECT bulk FROM eviction").fetchone()[0] == 0
        u = index.usage()
        assert (u.blobs, u.blob_bytes, u.orphan_bytes) == (1, 4, 0)
    finally:
        index.close()
