"""The index's generation file, read through a mapping (or with pread where a
file cannot be mapped): a change through one SQLiteIndex is seen by the very
next get of another on the same file (as two workers' are)."""
from __future__ import annotations

import mmap
import os

import pytest

from cachefetch import index as index_module
from cachefetch.hashing import Hash
from cachefetch.index import Entry, SQLiteIndex


def entry(n: int) -> Entry:
    return Entry("k", "", Hash.from_hex(f"{n:02x}" * 32), n, stored_at=1000.0 + n)


def remembering_reader(tmp_path):
    """``(store, reader)``: a store directory whose index holds ``entry(1)``
    (put by another index, since closed), and a reader whose memo holds it."""
    store = tmp_path / "store"
    store.mkdir()
    reader, old = SQLiteIndex(store / "index.sqlite3"), SQLiteIndex(store / "index.sqlite3")
    old.put(entry(1))
    old.close()
    assert reader.get("k") == [entry(1)]
    return store, reader


def replace_store(store, tmp_path) -> SQLiteIndex:
    """Move ``store`` aside and make an empty one in its place; an index of the new one."""
    os.rename(store, tmp_path / "moved")
    store.mkdir()
    return SQLiteIndex(store / "index.sqlite3")


def injected_monotonic(monkeypatch) -> list[float]:
    """Make the index module's ``time.monotonic()`` read ``clock[0]`` (1000.0
    at first; the test moves it); returns ``clock``."""
    import time

    clock = [1000.0]

    class Clock:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def monotonic():
            return clock[0]

    monkeypatch.setattr(index_module, "time", Clock())
    return clock


@pytest.mark.parametrize("mapped", [True, False])
def test_a_change_through_one_index_is_seen_by_the_next_get_of_another(tmp_path, monkeypatch, mapped):
    if not mapped:
        def cannot_map(*args, **kw):
            raise OSError("no mmap here")

        monkeypatch.setattr(mmap, "mmap", cannot_map)
    path = tmp_path / "index.sqlite3"
    writer, reader = SQLiteIndex(path), SQLiteIndex(path)
    try:
        assert reader.get("k") == []
        writer.put(entry(1))
        assert reader.get("k") == [entry(1)]
        assert reader.get("k") is reader.get("k")  # the memo, while nothing changes
        writer.put(entry(2))
        assert reader.get("k") == [entry(2)]
        writer.delete("k")
        assert reader.get("k") == []
        view = reader._gen.view
        assert isinstance(view, mmap.mmap) if mapped else isinstance(view, index_module._PreadView)
    finally:
        writer.close()
        reader.close()


def test_a_memo_hit_asks_the_kernel_nothing(tmp_path, monkeypatch):
    """Every hit reads the index: while its memo answers, a ``get`` reads the
    mapped generation file and nothing else (no ``getpid``, no ``stat``:
    under gunicorn's threads each system call costs a hit several times its
    own time)."""
    index = SQLiteIndex(tmp_path / "index.sqlite3")
    try:
        index.put(entry(1))
        assert index.get("k") == [entry(1)]  # the memo is filled
        calls = []
        for name in ("getpid", "stat", "fstat", "pread"):
            real = getattr(index_module.os, name)
            monkeypatch.setattr(index_module.os, name,
                                lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
        for _ in range(100):
            assert index.get("k") == [entry(1)]
        assert calls == []
    finally:
        monkeypatch.undo()
        index.close()


def test_a_forked_child_reads_the_index_it_inherited_and_sees_later_changes(tmp_path):
    """The memo and the mapping survive a fork (gunicorn forks workers); the
    child's first SQL read opens its own connection."""
    path = tmp_path / "index.sqlite3"
    index = SQLiteIndex(path)
    writer = SQLiteIndex(path)
    go_read, go_write = os.pipe()
    done_read, done_write = os.pipe()
    writer.put(entry(1))
    assert index.get("k") == [entry(1)]  # memo and mapping made before the fork
    pid = os.fork()
    if pid == 0:  # the child: exit codes only, never back into pytest
        code = 1
        try:
            os.close(go_write)
            os.close(done_read)
            if index.get("k") == [entry(1)]:
                os.write(done_write, b"1")
                os.read(go_read, 1)  # the parent has changed the index (or is gone: EOF)
                code = 0 if index.get("k") == [entry(2)] and index._local.pid == os.getpid() else 2
        finally:
            os._exit(code)
    # Only the child holds these ends now, so a child that dies shows as EOF, not a hang.
    os.close(go_read)
    os.close(done_write)
    try:
        assert os.read(done_read, 1) == b"1"
        writer.put(entry(2))
        os.write(go_write, b"1")
    finally:
        os.close(go_write)  # a child still waiting sees EOF
        os.close(done_read)
        _, status = os.waitpid(pid, 0)
        writer.close()
        index.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_memo_hits_see_a_replaced_store_within_a_second(tmp_path, monkeypatch):
    """A thread that only ever hits the memo still notices, within a second
    (of ``time.monotonic``, injected here), a store directory replaced by
    another: its next get answers from the new database."""
    clock = injected_monotonic(monkeypatch)
    store, reader = remembering_reader(tmp_path)
    new = replace_store(store, tmp_path)
    try:
        new.put(entry(2))
        clock[0] += 0.5
        assert reader.get("k") == [entry(1)]  # the memo's, for up to a second
        clock[0] += 0.5
        assert reader.get("k") == [entry(2)]
        assert reader.get("k") is reader.get("k")  # and the memo serves the new store's
    finally:
        new.close()
        reader.close()


def test_a_renewal_that_loses_a_race_never_brings_back_a_replaced_stores_view(tmp_path, monkeypatch):
    """Thread A renews the view (the store is as it was when A looked); before
    A is done, the store is replaced and the main thread puts the new file's
    view in place. A finishing must not bring the old view back: a change to
    the new store is then seen by the very next get. The interleaving is
    forced by holding A inside its check of the path (``_identity``)."""
    import threading

    clock = injected_monotonic(monkeypatch)
    real_identity = index_module._identity
    in_check, go_on = threading.Event(), threading.Event()

    def identity(path):
        found = real_identity(path)
        if threading.current_thread().name == "renewer" and not in_check.is_set():
            in_check.set()
            assert go_on.wait(30)
        return found

    monkeypatch.setattr(index_module, "_identity", identity)
    store, reader = remembering_reader(tmp_path)
    clock[0] += 1.0  # the view's check is due
    got = []
    renewer = threading.Thread(target=lambda: got.append(reader.get("k")), name="renewer")
    renewer.start()
    new = None
    try:
        assert in_check.wait(30)  # A has found the old store still there
        new = replace_store(store, tmp_path)
        new.put(entry(2))
        assert reader.get("k") == [entry(2)]  # this thread finds it replaced: the new file's view
        go_on.set()
        renewer.join(30)
        assert not renewer.is_alive() and got and got[0] in ([entry(1)], [entry(2)])
        new.put(entry(3))
        assert reader.get("k") == [entry(3)]  # no clock moved: only the new file's view can tell
    finally:
        go_on.set()
        renewer.join(30)
        if new is not None:
            new.close()
        reader.close()
