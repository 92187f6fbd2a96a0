"""cachefetch.flights: the lead/follow protocol and its typed journal, with real files, threads and processes."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from cachefetch.hashing import hash_bytes
from cachefetch.flights import (DoneRecord, FailedRecord, Flights, Follow, HeadRecord, Journal, JournalOrderError,
                                Lead, LeaderGone, LeaderRecord, RefreshedRecord, UncacheableRecord, decode_record,
                                encode_record)

WAIT = 10.0


@pytest.fixture
def flights(tmp_path):
    return Flights(tmp_path / "root")


def later(seconds: float = WAIT) -> float:
    return time.monotonic() + seconds


def new_body(flights: Flights, lead: Lead, name: str = "body.part"):
    """An empty body file where the middleware puts it (the store's tmp/, named
    with the lead's prefix), opened unbuffered for the 'leader' to append to."""
    os.makedirs(flights.temp_dir, exist_ok=True)
    path = os.path.join(flights.temp_dir, lead.temp_prefix + name)
    return open(path, "wb", buffering=0), path


def records(journal: Journal) -> tuple:
    """The (head, final) records a journal has collected."""
    return journal.head, journal.final


NOTHING = (None, None)


# -- lead / follow / release -------------------------------------------------

def test_inflight_dir_is_created(tmp_path):
    f = Flights(tmp_path / "r")
    assert os.path.isdir(tmp_path / "r" / "inflight")
    assert f.dir == str(tmp_path / "r" / "inflight")


def test_paths_are_hashed_file_names(flights):
    p = flights.path("http://h/a?b=../../c")
    assert os.path.dirname(p) == flights.dir
    assert p.endswith(".lock") and "/" not in os.path.basename(p)
    assert flights.path("a") != flights.path("b")
    assert flights.path("a") == flights.path("a")


def test_second_lead_is_refused_while_the_first_holds_it(flights):
    first = flights.lead("k")
    assert isinstance(first, Lead) and first.active
    assert flights.lead("k") is None
    other = flights.lead("other key")  # flights are independent
    assert other is not None
    other.release()
    assert flights.lead("k") is None
    first.release()
    assert not first.active
    again = flights.lead("k")
    assert again is not None
    again.release()


def test_only_one_of_many_threads_leads(flights):
    n = 16
    barrier = threading.Barrier(n)
    results: list[Lead | None] = [None] * n

    def run(i: int) -> None:
        barrier.wait(WAIT)
        results[i] = flights.lead("hot")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    leads = [r for r in results if r is not None]
    assert len(leads) == 1
    leads[0].release()
    assert os.listdir(flights.dir) == []


def test_follow_returns_none_when_nothing_runs(flights):
    assert flights.follow("k") is None
    lead = flights.lead("k")
    follow = flights.follow("k")
    assert isinstance(follow, Follow)
    follow.close()
    lead.release()
    assert flights.follow("k") is None


def test_release_unlinks_the_lock_file_and_is_idempotent(flights):
    lead = flights.lead("k")
    assert os.path.exists(lead.path)
    assert lead.path == flights.path("k")
    lead.release()
    assert not os.path.exists(lead.path)
    lead.release()
    with pytest.raises(RuntimeError):
        lead.publish(HeadRecord("200 OK"))
    assert os.listdir(flights.dir) == []


def test_fail_and_uncacheable_release_too(flights):
    a = flights.lead("a")
    a.fail("upstream", "boom")
    b = flights.lead("b")
    b.uncacheable(500)
    assert not a.active and not b.active
    assert os.listdir(flights.dir) == []
    a.fail("upstream")  # after release: no error, nothing written
    b.uncacheable(500)


# -- the journal -------------------------------------------------------------

def test_journal_records_are_parsed(flights):
    head = HeadRecord("200 OK", (("Content-Type", "text/plain"),), 5, (), "", "/x/y.part")
    lead = flights.lead("k")
    follow = flights.follow("k")
    try:
        assert records(follow.journal()) == NOTHING
        assert follow.journal().fid == lead.fid  # the L record names the flight
        lead.publish(head)
        assert records(follow.journal()) == (head, None)
        h = hash_bytes(b"hello")
        lead.done(h.hex, 5)
        assert records(follow.journal()) == (head, DoneRecord(h.hex, 5))
        assert follow.journal().fid == lead.fid
        lead.release()
        # Released and unlinked, but the follower still reads through its descriptor.
        assert not os.path.exists(lead.path)
        assert follow.settled().final == DoneRecord(h.hex, 5)
    finally:
        follow.close()
        lead.release()


def test_journal_f_record(flights):
    lead = flights.lead("k")
    follow = flights.follow("k")
    try:
        lead.publish(HeadRecord("200 OK", body="/b"))
        lead.fail("abandoned", "x" * 2000)
        j = follow.journal()
        assert j.head == HeadRecord("200 OK", body="/b")
        assert j.final == FailedRecord("abandoned", "x" * 500)  # the message truncated
        assert follow.settled() == j  # a final record: no LeaderGone though the lock is free
    finally:
        follow.close()


def test_journal_x_record(flights):
    lead = flights.lead("k")
    follow = flights.follow("k")
    try:
        lead.uncacheable(503)
        j = follow.journal()
        assert records(j) == (None, UncacheableRecord(503))
        assert follow.wait(later()) == j
    finally:
        follow.close()


def test_journal_ignores_a_line_still_being_written(flights):
    lead = flights.lead("k")
    follow = flights.follow("k")
    try:
        with open(lead.path, "ab") as f:
            f.write(b'H {"status": "200')
        assert records(follow.journal()) == NOTHING
    finally:
        follow.close()
        lead.release()


# -- following: liveness, wait, body ----------------------------------------

def test_settled_and_leader_alive_while_the_leader_runs(flights):
    lead = flights.lead("k")
    follow = flights.follow("k")
    try:
        assert follow.leader_alive()
        assert records(follow.settled()) == NOTHING
        # Testing liveness does not steal the lock.
        assert flights.lead("k") is None
        assert follow.leader_alive()
    finally:
        follow.close()
        lead.release()


def test_wait_returns_the_head_once_published(flights):
    lead = flights.lead("k")
    follow = flights.follow("k")
    waiting = threading.Event()
    out: dict = {}

    def waiter() -> None:
        waiting.set()
        try:
            out["journal"] = follow.wait(later())
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=waiter)
    t.start()
    try:
        assert waiting.wait(WAIT)
        lead.publish(HeadRecord("200 OK", body="/b"))
        t.join(WAIT)
        assert not t.is_alive()
        assert list(out) == ["journal"]
        assert records(out["journal"]) == (HeadRecord("200 OK", body="/b"), None)
    finally:
        follow.close()
        lead.release()


def test_wait_times_out(flights):
    lead = flights.lead("k")
    follow = flights.follow("k")
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            follow.wait(t0 + 0.05)
        assert time.monotonic() - t0 < WAIT
    finally:
        follow.close()
        lead.release()


def test_follower_body_streams_step_by_step(flights):
    lead = flights.lead("k")
    body_file, body_path = new_body(flights, lead)
    lead.publish(HeadRecord("200 OK", body=body_path))
    follow = flights.follow("k")
    received = bytearray()
    cond = threading.Condition()
    state: dict = {}

    def follower() -> None:
        try:
            for chunk in follow.body(body_path, later()):
                assert isinstance(chunk, bytes) and chunk
                with cond:
                    received.extend(chunk)
                    cond.notify_all()
            state["result"] = "complete"
        except BaseException as exc:
            state["result"] = exc
        finally:
            with cond:
                state["finished"] = True
                cond.notify_all()

    t = threading.Thread(target=follower)
    t.start()
    sent = b""
    try:
        for i in range(6):
            chunk = bytes([65 + i]) * (1000 * (i + 1))
            with cond:
                assert bytes(received) == sent  # nothing the leader has not written
                assert "finished" not in state
            body_file.write(chunk)
            sent += chunk
            with cond:  # the follower gets each chunk while the leader is still running
                assert cond.wait_for(lambda n=len(sent): len(received) >= n or "finished" in state, WAIT)
                assert bytes(received) == sent
                assert "finished" not in state
        # The last chunk and D back to back: the follower must still read it all.
        last = b"Z" * 70000
        body_file.write(last)
        sent += last
        lead.done(hash_bytes(sent).hex, len(sent))
        t.join(WAIT)
        assert not t.is_alive()
        assert state["result"] == "complete"
        assert bytes(received) == sent
    finally:
        body_file.close()
        follow.close()
        lead.release()


def test_follower_body_as_file_spans_grows_with_the_file_and_ends_at_done(flights):
    """What cachefetch's worker sends with sendfile for a follower in another
    process: spans of the leader's body file, each what was written since the
    last, contiguous, ending where D says."""
    lead = flights.lead("k")
    body_file, body_path = new_body(flights, lead)
    lead.publish(HeadRecord("200 OK", body=body_path))
    follow = flights.follow("k")
    try:
        body_file.write(b"a" * 3000)
        spans = follow.body(body_path, later(), start=1000).sendfile_spans()
        fd, offset, count = next(spans)
        assert (offset, count) == (1000, 2000) and os.pread(fd, count, offset) == b"a" * 2000
        body_file.write(b"b" * 5000)
        body_file.write(b"c" * 100)
        lead.done(hash_bytes(b"a" * 3000 + b"b" * 5000 + b"c" * 100).hex, 8100)
        rest = bytearray()
        position = 3000
        for fd, offset, count in spans:
            assert offset == position and count > 0
            rest += os.pread(fd, count, offset)
            position += count
        assert bytes(rest) == b"b" * 5000 + b"c" * 100
        ranged = b"".join(os.pread(fd, n, off) for fd, off, n in follow.body(body_path, later(), 2990, 3010)
                          .sendfile_spans())
        assert ranged == b"a" * 10 + b"b" * 10
    finally:
        body_file.close()
        follow.close()
        lead.release()


def test_body_ending_short_of_the_announced_size_raises(flights):
    lead = flights.lead("k")
    body_file, body_path = new_body(flights, lead)
    lead.publish(HeadRecord("200 OK", body=body_path))
    follow = flights.follow("k")
    try:
        body_file.write(b"abc")
        lead.done(hash_bytes(b"abcdef").hex, 6)
        got = bytearray()
        with pytest.raises(LeaderGone, match="3 of 6"):
            for chunk in follow.body(body_path, later()):
                got += chunk
        assert got == b"abc"
    finally:
        body_file.close()
        follow.close()
        lead.release()


def test_body_raises_leader_gone_on_f(flights):
    lead = flights.lead("k")
    body_file, body_path = new_body(flights, lead)
    lead.publish(HeadRecord("200 OK", body=body_path))
    follow = flights.follow("k")
    got = bytearray()
    first = threading.Event()
    out: dict = {}

    def follower() -> None:
        try:
            for chunk in follow.body(body_path, later()):
                got.extend(chunk)
                first.set()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=follower)
    t.start()
    try:
        body_file.write(b"partial")
        assert first.wait(WAIT)
        lead.fail("upstream", "the app raised")
        t.join(WAIT)
        assert not t.is_alive()
        assert isinstance(out.get("error"), LeaderGone)
        assert got == b"partial"
    finally:
        body_file.close()
        follow.close()


def test_body_file_already_gone(flights, tmp_path):
    lead = flights.lead("k")
    follow = flights.follow("k")
    try:
        with pytest.raises(FileNotFoundError):
            next(follow.body(str(tmp_path / "committed-and-renamed.part"), later()))
    finally:
        follow.close()
        lead.release()


def test_body_times_out_without_a_first_byte(flights):
    lead = flights.lead("k")
    body_file, body_path = new_body(flights, lead)
    follow = flights.follow("k")
    try:
        with pytest.raises(TimeoutError):
            next(follow.body(body_path, time.monotonic() + 0.05))
    finally:
        body_file.close()
        follow.close()
        lead.release()


# -- a leader that dies ------------------------------------------------------

def _lead_and_hang(root: str, key: str, publish: bool, conn) -> None:
    """Child process: lead ``key``, write part of a body to a temp file named
    as the middleware names it, publish it if asked, then wait to be killed."""
    flights = Flights(root)
    lead = flights.lead(key)
    if lead is None:
        conn.send(("not leader", None))
        return
    os.makedirs(flights.temp_dir, exist_ok=True)
    body_path = os.path.join(flights.temp_dir, lead.temp_prefix + "x.part")
    with open(body_path, "wb") as f:
        f.write(b"partial body")
    if publish:
        lead.publish(HeadRecord("200 OK", body=body_path))
    conn.send(("ready", body_path))
    conn.recv()  # never sent: we are SIGKILLed while blocked here


@pytest.mark.parametrize("published", [True, False], ids=["after-H", "before-H"])
def test_killed_leader_is_detected_and_cleared(tmp_path, published):
    root = str(tmp_path / "root")
    flights = Flights(root)
    os.makedirs(flights.temp_dir)
    bystander = os.path.join(flights.temp_dir, "cf-0123456789abcdef-other.part")  # another flight's
    open(bystander, "wb").close()
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_lead_and_hang, args=(root, "k", published, child_conn))
    follow = None
    child.start()
    try:
        assert parent_conn.poll(30), "the child never got ready"
        msg, body_path = parent_conn.recv()
        assert msg == "ready"
        # The child's lock holds across processes.
        assert flights.lead("k") is None
        follow = flights.follow("k")
        assert follow is not None
        assert follow.leader_alive()
        expected_head = HeadRecord("200 OK", body=body_path) if published else None
        assert follow.settled().head == expected_head
        assert flights.orphans() == []
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(WAIT)
    assert child.exitcode == -signal.SIGKILL
    try:
        assert not follow.leader_alive()
        with pytest.raises(LeaderGone):
            follow.settled()
        with pytest.raises(LeaderGone):
            follow.wait(later())
        if published:
            got = bytearray()
            with pytest.raises(LeaderGone):
                for chunk in follow.body(body_path, later()):
                    got += chunk
            assert got == b"partial body"
        assert os.path.exists(body_path)
        assert flights.orphans() == [flights.path("k")]

        lead = flights.lead("k")
        assert lead is not None
        assert not os.path.exists(body_path)  # the dead leader's temp file went with its journal
        assert os.path.exists(bystander)  # and nothing else did
        assert flights.orphans() == []
        fresh = flights.follow("k")
        assert fresh.journal().fid == lead.fid  # a fresh journal: only the new L record
        assert records(fresh.journal()) == NOTHING
        fresh.close()
        lead.release()
        assert os.listdir(flights.dir) == []
    finally:
        follow.close()


def test_orphans_lists_only_unlocked_lock_files(flights):
    live = flights.lead("live")
    # A lock file nobody holds, as a killed worker leaves it.
    dead = flights.path("dead")
    with open(dead, "wb") as f:
        f.write(b'L {"fid":"00000000deadbeef"}\nH {"body":null}\n')
    try:
        assert flights.orphans() == [dead]
        assert flights.lead("live") is None  # orphans() did not take or break the live lock
        cleared = flights.lead("dead")
        assert cleared is not None
        follow = flights.follow("dead")
        assert follow.journal().fid == cleared.fid and records(follow.journal()) == NOTHING
        follow.close()
        cleared.release()
        assert flights.orphans() == []
    finally:
        live.release()
    assert os.listdir(flights.dir) == []


# -- typed records: order, format, size ---------------------------------------

def test_records_round_trip_and_carry_a_version():
    for record in (LeaderRecord("ab12", 7), HeadRecord("200 OK", (("A", "1"),), 3, ("accept",), "v", "/p"),
                   DoneRecord("00" * 32, 3), FailedRecord("upstream", "boom"), UncacheableRecord(500),
                   RefreshedRecord("11" * 32, "v")):
        line = encode_record(record)
        assert line.endswith(b"\n") and b'"v":1' in line
        assert decode_record(line[:-1]) == record


@pytest.mark.parametrize("line", [b'D {"hash":"x","size":1,"v":2}', b'D {"hash":"x","size":1}', b"Q {}",
                                  b'H {"status": "200', b'D {"hash":"x","v":1,"extra":1,"size":1}', b"D"])
def test_other_versions_unknown_kinds_and_torn_lines_are_ignored(line):
    assert decode_record(line) is None


def test_lead_refuses_records_out_of_order(flights):
    lead = flights.lead("k")
    with pytest.raises(JournalOrderError):
        lead.done("00" * 32, 1)  # Done before Head
    lead.publish(HeadRecord("200 OK"))
    with pytest.raises(JournalOrderError):
        lead.publish(HeadRecord("200 OK"))  # a second Head
    with pytest.raises(JournalOrderError):
        lead.uncacheable(500)  # X after H
    with pytest.raises(JournalOrderError):
        lead.refreshed("00" * 32)  # R after H
    lead.done("00" * 32, 1)
    lead.fail("upstream")  # after a final record: nothing written, just released
    assert not lead.active
    with pytest.raises(TypeError):
        flights.lead("k2").publish({"status": "200 OK"})


def test_a_refreshed_flight_tells_its_followers(flights):
    lead = flights.lead("k")
    follow = flights.follow("k")
    try:
        lead.refreshed("22" * 32, "var")
        assert not lead.active
        assert follow.wait(later()).final == RefreshedRecord("22" * 32, "var")
    finally:
        follow.close()


def test_a_head_record_of_any_size_is_read_whole(flights):
    big = tuple((f"X-Header-{i}", "v" * 200) for i in range(10_000))  # over 2 MiB of fields
    lead = flights.lead("k")
    follow = flights.follow("k")
    try:
        lead.publish(HeadRecord("200 OK", big, body="/b"))
        assert follow.wait(later()).head.headers == big
    finally:
        follow.close()
        lead.release()


def test_a_follower_reads_only_what_was_appended(flights, monkeypatch):
    """Each poll costs the new bytes, not a re-read of the journal."""
    lead = flights.lead("k")
    follow = flights.follow("k")
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(off) or real_pread(fd, n, off))
    try:
        lead.publish(HeadRecord("200 OK", (("A", "x" * 5000),), body="/b"))
        follow.journal()
        size = os.stat(lead.path).st_size
        reads.clear()
        for _ in range(5):
            follow.journal()  # nothing new
        assert reads and all(off == size for off in reads)
    finally:
        follow.close()
        lead.release()
