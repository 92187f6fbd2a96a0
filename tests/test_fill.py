"""The decoupled fetch: a Fill reads its upstream at the upstream's pace,
whoever reads it, within its bounds (real files and threads)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from cachefetch import CacheFetch
from cachefetch.fill import FILLS, Fill, FillFailed, FillOptions
from cachefetch.hashing import hash_bytes
from cachefetch.stream import LengthMismatch
from test_middleware import WAIT, assert_clean, client, settled, wait_for


class Recorded:
    """on_start / on_complete / on_abort, remembered."""

    def __init__(self) -> None:
        self.started, self.completed, self.aborted = [], [], []
        self.done = threading.Event()

    def on_start(self, path):
        self.started.append(path)

    def on_complete(self, result, path):
        self.completed.append((result, path))
        self.done.set()

    def on_abort(self, exc):
        self.aborted.append(exc)
        self.done.set()


def gated(chunks, gate: threading.Event, after: int = 1):
    """Yield ``after`` chunks, wait for ``gate``, then the rest."""
    for i, chunk in enumerate(chunks):
        if i == after:
            assert gate.wait(WAIT)
        yield chunk


def test_the_fill_runs_at_the_upstream_pace_while_its_reader_stalls(tmp_path):
    chunks = [bytes([65 + i]) * 100_000 for i in range(20)]
    rec = Recorded()
    fill = Fill(iter(chunks), FillOptions(str(tmp_path)), rec.on_start, rec.on_complete, rec.on_abort)
    reader = iter(fill.start())
    first = next(reader)  # the client reads a little, then stops reading
    assert rec.done.wait(WAIT)  # ...and the whole body is fetched and hashed meanwhile
    (result, path), = rec.completed
    assert result.hash == hash_bytes(b"".join(chunks)) and os.path.getsize(path) == 2_000_000
    rest = b"".join(reader)
    assert first + rest == b"".join(chunks)
    os.unlink(path)


def test_several_readers_each_get_their_span(tmp_path):
    data = os.urandom(1_000_000)
    gate = threading.Event()
    rec = Recorded()
    pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    fill = Fill(gated(pieces, gate), FillOptions(str(tmp_path), content_length=len(data)),
                rec.on_start, rec.on_complete, rec.on_abort)
    whole = fill.start()
    middle = fill.reader(300_000, 300_100)
    gate.set()
    assert b"".join(middle) == data[300_000:300_100]
    assert b"".join(whole) == data
    assert rec.done.wait(WAIT)
    os.unlink(rec.completed[0][1])


def test_an_upstream_failing_mid_body_fails_every_reader_and_removes_the_temp(tmp_path):
    def failing():
        yield b"x" * 1000
        raise ConnectionResetError("upstream died")

    rec = Recorded()
    fill = Fill(failing(), FillOptions(str(tmp_path)), rec.on_start, rec.on_complete, rec.on_abort)
    reader = fill.start()
    with pytest.raises(FillFailed):
        b"".join(reader)
    assert rec.done.wait(WAIT) and isinstance(rec.aborted[0], ConnectionResetError)
    assert os.listdir(tmp_path) == [] and rec.completed == []


def test_a_wrong_length_is_a_failure(tmp_path):
    rec = Recorded()
    fill = Fill(iter([b"abc"]), FillOptions(str(tmp_path), content_length=5), rec.on_start, rec.on_complete,
                rec.on_abort)
    with pytest.raises(FillFailed):
        b"".join(fill.start())
    assert rec.done.wait(WAIT) and isinstance(rec.aborted[0], LengthMismatch)
    assert os.listdir(tmp_path) == []


def test_an_idle_upstream_is_given_up(tmp_path):
    gate = threading.Event()
    rec = Recorded()
    fill = Fill(gated([b"a" * 10, b"b" * 10], gate), FillOptions(str(tmp_path), idle_timeout=0.5),
                rec.on_start, rec.on_complete, rec.on_abort)
    reader = iter(fill.start())
    assert next(reader) == b"a" * 10
    try:
        with pytest.raises(FillFailed, match="no byte"):
            next(reader)  # the watchdog ends the fill; the stalled upstream is abandoned
        assert rec.done.wait(WAIT) and rec.completed == [] and os.listdir(tmp_path) == []
    finally:
        gate.set()


def test_a_fetch_over_its_total_time_is_given_up(tmp_path):
    def endless():
        while True:
            yield b"z" * 100
            time.sleep(0.01)  # a slow upstream (what is tested is the bound, not the pace)

    rec = Recorded()
    fill = Fill(endless(), FillOptions(str(tmp_path), total_timeout=0.5), rec.on_start, rec.on_complete,
                rec.on_abort)
    with pytest.raises(FillFailed, match="took more than"):
        for _ in fill.start():
            pass
    assert rec.done.wait(WAIT) and rec.completed == [] and os.listdir(tmp_path) == []


def test_past_max_detached_a_fetch_nobody_reads_is_abandoned(tmp_path):
    gate = threading.Event()
    rec = Recorded()
    fill = Fill(gated([b"a"] * 5, gate), FillOptions(str(tmp_path), max_detached=0), rec.on_start,
                rec.on_complete, rec.on_abort)
    reader = fill.start()
    reader.close()  # the only client left
    gate.set()
    assert rec.done.wait(WAIT) and rec.completed == [] and rec.aborted
    wait_for(lambda: os.listdir(tmp_path) == [], "the temp file to go")
    assert fill not in FILLS._fills or not fill.detached


def test_the_watchdog_ends_with_the_last_fill_and_a_later_fill_starts_another(tmp_path):
    rec = Recorded()
    fill = Fill(iter([b"x" * 10]), FillOptions(str(tmp_path)), rec.on_start, rec.on_complete, rec.on_abort)
    assert b"".join(fill.start()) == b"x" * 10 and rec.done.wait(WAIT)
    os.unlink(rec.completed[0][1])
    wait_for(lambda: not FILLS._fills, "every fill of this process to end")
    watchdog = FILLS._watchdog
    if watchdog is not None:
        watchdog.join(WAIT)
        assert not watchdog.is_alive(), "the watchdog outlived the last fill"
    # The next fill's bounds are still kept: it gets a watchdog of its own.
    gate, rec = threading.Event(), Recorded()
    fill = Fill(gated([b"a" * 10, b"b" * 10], gate), FillOptions(str(tmp_path), idle_timeout=0.5),
                rec.on_start, rec.on_complete, rec.on_abort)
    reader = iter(fill.start())
    try:
        assert next(reader) == b"a" * 10
        with pytest.raises(FillFailed, match="no byte"):
            next(reader)
        assert rec.done.wait(WAIT) and rec.completed == []
    finally:
        gate.set()
    wait_for(lambda: os.listdir(tmp_path) == [], "the temp file to go")


# -- through the middleware ---------------------------------------------------



def test_a_leader_that_stops_reading_holds_no_follower_back(make):
    chunks = [bytes([65 + i % 26]) * 65536 for i in range(40)]
    gate = threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Cache-Control", "max-age=60"),
                                  ("Content-Length", str(65536 * 40))])
        return gated(chunks, gate)

    mw = make(app)
    leader = iter(mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "HTTP_HOST": "h", "wsgi.url_scheme": "http"},
                     lambda s, h, e=None: None))
    first = next(leader)  # the leader's client reads once, then stalls
    gate.set()
    follower = client(mw).get("/x", headers={"Host": "h"}, buffered=True)  # ...and a follower gets it all
    assert follower.data == b"".join(chunks)
    assert first and b"".join(chunks).startswith(first)
    leader.close()
    settled(mw)
    assert len(mw.index) == 1
    assert_clean(mw)


def test_middleware_bounds_are_checked(make, tmp_path):
    app = lambda environ, start_response: []  # noqa: E731
    for kw in ({"fetch_timeout": 0}, {"idle_timeout": -1}, {"max_detached": -1}, {"max_detached": 1.5},
               {"fetch_timeout": True}):
        with pytest.raises(ValueError):
            CacheFetch(app, tmp_path / "s", **kw)
