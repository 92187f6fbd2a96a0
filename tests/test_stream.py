"""cachefetch.stream: stream_through (the tee) and Committer."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import threading

import pytest

import cachefetch.store as store_module
from cachefetch.hashing import hash_bytes
from cachefetch.store import Blob
from cachefetch.stream import (CacheAbandoned, Committer, LengthMismatch, StreamThroughOptions,
                               StreamThroughResult, UpstreamError, stream_through)

WAIT = 10.0
GET = {"REQUEST_METHOD": "GET"}


class Upstream:
    """An upstream body: yields ``chunks``, then raises ``error`` if given.

    ``gate`` (an Event), if given, is awaited before the chunk at ``gate_at``.
    """

    def __init__(self, chunks, error: BaseException | None = None,
                 gate: threading.Event | None = None, gate_at: int = 1) -> None:
        self.chunks = list(chunks)
        self.error = error
        self.gate, self.gate_at = gate, gate_at
        self.iterated = False
        self.reads = 0
        self.closed = False

    def __iter__(self):
        self.iterated = True
        return self._gen()

    def _gen(self):
        for i, chunk in enumerate(self.chunks):
            if self.gate is not None and i == self.gate_at:
                assert self.gate.wait(WAIT)
            self.reads += 1
            yield chunk
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.closed = True


class Response:
    """What a WSGI server does with an application's answer."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: dict[str, str] = {}

    def start_response(self, status, headers, exc_info=None):
        self.status = status
        self.headers = dict(headers)
        return lambda data: None

    def run(self, opts, upstream, on_complete, environ=GET, max_chunks=None):
        """Call stream_through and consume it like a server: ``(body, error)``.

        With ``max_chunks``, stop after that many chunks (the client hangs
        up); ``close()`` is called in every case, as PEP 3333 requires.
        """
        app_iter = stream_through(dict(environ), self.start_response, upstream, opts, on_complete)
        body, error = bytearray(), None
        try:
            for n, chunk in enumerate(app_iter, 1):
                assert isinstance(chunk, bytes)
                body += chunk
                if max_chunks is not None and n >= max_chunks:
                    break
        except Exception as exc:
            error = exc
        finally:
            close = getattr(app_iter, "close", None)
            if close is not None:
                close()
        return bytes(body), error


class Recorder:
    """An on_complete that records its calls (and checks the temp file then)."""

    def __init__(self, then=None, error: BaseException | None = None) -> None:
        self.calls: list[tuple[StreamThroughResult, str, bytes]] = []
        self.then = then
        self.error = error
        self.called = threading.Event()

    def __call__(self, result, tmp_path):
        with open(tmp_path, "rb") as f:
            self.calls.append((result, tmp_path, f.read()))
        self.called.set()
        if self.error is not None:
            raise self.error
        if self.then is not None:
            self.then(result, tmp_path)


@pytest.fixture
def temp_dir(tmp_path):
    d = tmp_path / "tmp"
    d.mkdir()
    return d


@pytest.fixture
def committer(store):
    c = Committer(store)
    yield c
    c.shutdown(wait=True)


def join_detached_threads() -> None:
    for t in threading.enumerate():
        if t.name == "cachefetch-detached":
            t.join(WAIT)
            assert not t.is_alive()


CHUNKS = [b"first chunk|", b"", b"second|", os.urandom(100000), b"|last"]
BODY = b"".join(CHUNKS)


# -- success ----------------------------------------------------------------

def test_happy_path_streams_hashes_and_commits(store, committer):
    on_complete = Recorder(then=committer)
    opts = StreamThroughOptions(content_type="application/x-test", extra_headers={"X-Extra": "1"},
                                content_length=len(BODY), temp_dir=committer.temp_dir)
    upstream = Upstream(CHUNKS)
    r = Response()
    body, error = r.run(opts, upstream, on_complete)
    assert error is None
    assert body == BODY
    assert r.status == "200 OK"
    assert r.headers == {"Content-Type": "application/x-test", "Content-Length": str(len(BODY)),
                         "X-Extra": "1"}
    assert upstream.closed
    (result, tmp_path, content), = on_complete.calls
    assert result == StreamThroughResult(hash_bytes(BODY), len(BODY))
    assert os.path.dirname(tmp_path) == store.temp_dir  # the temp file was in the store's tmp/
    assert content == BODY  # it was complete when on_complete got it
    committer.flush(WAIT)
    assert not os.path.exists(tmp_path)
    assert store.open(result.hash).read() == BODY
    assert list(store) == [result.hash]
    assert store.temp_files() == []
    assert store.verify() == []


def test_unknown_length_and_file_object_upstream(store, committer):
    data = os.urandom(600 * 1024 + 3)  # several reads of the file
    on_complete = Recorder(then=committer)
    upstream = io.BytesIO(data)
    r = Response()
    body, error = r.run(StreamThroughOptions(temp_dir=committer.temp_dir), upstream, on_complete)
    assert (body, error) == (data, None)
    assert "Content-Length" not in r.headers
    assert upstream.closed
    committer.flush(WAIT)
    assert store.open(hash_bytes(data)).read() == data


def test_bytes_like_chunks_are_sent_as_bytes(temp_dir):
    on_complete = Recorder()
    chunks = [bytearray(b"ab"), memoryview(b"cd"), b"ef"]
    body, error = Response().run(StreamThroughOptions(temp_dir=temp_dir), Upstream(chunks), on_complete)
    assert (body, error) == (b"abcdef", None)
    assert on_complete.calls[0][0] == StreamThroughResult(hash_bytes(b"abcdef"), 6)


def test_empty_body(temp_dir):
    on_complete = Recorder()
    r = Response()
    body, error = r.run(StreamThroughOptions(content_length=0, temp_dir=temp_dir), Upstream([]), on_complete)
    assert (body, error, r.status) == (b"", None, "200 OK")
    assert on_complete.calls[0][0] == StreamThroughResult(hash_bytes(b""), 0)


def test_extra_hashers_see_every_byte(temp_dir):
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    opts = StreamThroughOptions(extra_hashers=[sha256, md5], temp_dir=temp_dir)
    body, error = Response().run(opts, Upstream(CHUNKS), Recorder())
    assert error is None
    assert sha256.hexdigest() == hashlib.sha256(BODY).hexdigest()
    assert md5.digest() == hashlib.md5(BODY).digest()


def test_head_sends_headers_and_never_reads_the_upstream(temp_dir):
    on_complete = Recorder()
    upstream = Upstream(CHUNKS)
    r = Response()
    opts = StreamThroughOptions(content_type="text/x", content_length=len(BODY), temp_dir=temp_dir)
    body, error = r.run(opts, upstream, on_complete, environ={"REQUEST_METHOD": "HEAD"})
    assert (body, error) == (b"", None)
    assert r.status == "200 OK"
    assert r.headers["Content-Length"] == str(len(BODY))
    assert r.headers["Content-Type"] == "text/x"
    assert not upstream.iterated and upstream.reads == 0
    assert upstream.closed
    assert on_complete.calls == []
    assert os.listdir(temp_dir) == []


# -- failures -----------------------------------------------------------------

def test_upstream_error_before_the_first_byte_gives_502(temp_dir, caplog):
    on_complete = Recorder()
    upstream = Upstream([], error=ConnectionResetError("upstream died"))
    r = Response()
    with caplog.at_level(logging.ERROR, logger="cachefetch.stream"):
        body, error = r.run(StreamThroughOptions(temp_dir=temp_dir), upstream, on_complete)
    assert r.status.startswith("502")
    assert error is None
    assert b"upstream" in body
    assert on_complete.calls == []
    assert upstream.closed
    assert os.listdir(temp_dir) == []
    assert "upstream died" in caplog.text


def test_upstream_error_mid_stream_raises_and_commits_nothing(store, committer, caplog):
    on_complete = Recorder(then=committer)
    upstream = Upstream([b"part one|", b"part two|"], error=OSError("connection lost"))
    r = Response()
    app_iter = stream_through(dict(GET), r.start_response, upstream,
                              StreamThroughOptions(temp_dir=committer.temp_dir), on_complete)
    got = next(app_iter) + next(app_iter)
    assert got == b"part one|part two|"
    assert len(store.temp_files()) == 1  # the body so far is in a temp file
    with caplog.at_level(logging.ERROR, logger="cachefetch.stream"):
        with pytest.raises(UpstreamError) as info:
            next(app_iter)
    app_iter.close()
    assert isinstance(info.value.__cause__, OSError)
    assert "connection lost" in caplog.text
    assert r.status == "200 OK"  # the response had started: the server must drop the connection
    assert on_complete.calls == []
    assert upstream.closed
    committer.flush(WAIT)
    assert list(store) == []
    assert store.temp_files() == []


def test_length_mismatch_short_raises_after_the_last_chunk(temp_dir, caplog):
    on_complete = Recorder()
    opts = StreamThroughOptions(content_length=10, temp_dir=temp_dir)
    with caplog.at_level(logging.ERROR, logger="cachefetch.stream"):
        body, error = Response().run(opts, Upstream([b"abc", b"de"]), on_complete)
    assert body == b"abcde"  # every byte the upstream sent, then the error
    assert isinstance(error, LengthMismatch)
    assert on_complete.calls == []
    assert os.listdir(temp_dir) == []
    assert "announced 10" in caplog.text


def test_length_mismatch_long_raises_and_caches_nothing(temp_dir, caplog):
    on_complete = Recorder()
    opts = StreamThroughOptions(content_length=6, temp_dir=temp_dir)
    with caplog.at_level(logging.ERROR, logger="cachefetch.stream"):
        body, error = Response().run(opts, Upstream([b"abc", b"defg", b"h"]), on_complete)
    assert isinstance(error, UpstreamError)
    assert isinstance(error.__cause__ or error, LengthMismatch)
    assert len(body) <= 6  # never more than announced
    assert on_complete.calls == []
    assert os.listdir(temp_dir) == []
    assert "announced" in caplog.text


def test_length_mismatch_long_in_the_first_chunk_gives_502(temp_dir):
    on_complete = Recorder()
    r = Response()
    body, error = r.run(StreamThroughOptions(content_length=2, temp_dir=temp_dir), Upstream([b"abc"]),
                        on_complete)
    assert r.status.startswith("502") and error is None
    assert on_complete.calls == []
    assert os.listdir(temp_dir) == []


def test_on_complete_raising_is_logged_not_raised_and_temp_removed(temp_dir, caplog):
    on_complete = Recorder(error=RuntimeError("commit exploded"))
    aborted = []
    opts = StreamThroughOptions(content_length=len(BODY), temp_dir=temp_dir, on_abort=aborted.append)
    with caplog.at_level(logging.ERROR, logger="cachefetch.stream"):
        body, error = Response().run(opts, Upstream(CHUNKS), on_complete)
    assert (body, error) == (BODY, None)  # the client has its whole body
    assert len(on_complete.calls) == 1
    assert not os.path.exists(on_complete.calls[0][1])
    assert os.listdir(temp_dir) == []
    assert "commit exploded" in caplog.text
    assert [type(e) for e in aborted] == [RuntimeError]


def test_client_disconnect_removes_the_temp_file(temp_dir):
    on_complete = Recorder()
    upstream = Upstream(CHUNKS)
    body, error = Response().run(StreamThroughOptions(temp_dir=temp_dir), upstream, on_complete, max_chunks=1)
    assert body == CHUNKS[0] and error is None
    assert on_complete.calls == []
    assert upstream.closed
    assert upstream.reads < len(CHUNKS)  # the rest was never read
    assert os.listdir(temp_dir) == []


def test_close_before_any_iteration_removes_the_temp_file(temp_dir):
    on_complete = Recorder()
    app_iter = stream_through(dict(GET), Response().start_response, Upstream(CHUNKS),
                              StreamThroughOptions(temp_dir=temp_dir), on_complete)
    assert len(os.listdir(temp_dir)) == 1
    app_iter.close()
    assert os.listdir(temp_dir) == []
    assert on_complete.calls == []


def test_finish_on_disconnect_completes_in_the_background(store, committer):
    committed = threading.Event()
    blobs = []

    def on_complete(result, tmp_path):
        committer.submit(result, tmp_path, callback=lambda blob, err: (blobs.append((blob, err)), committed.set()))

    rest = threading.Event()
    upstream = Upstream(CHUNKS, gate=rest, gate_at=2)
    opts = StreamThroughOptions(temp_dir=committer.temp_dir, finish_on_disconnect=True)
    try:
        body, error = Response().run(opts, upstream, on_complete, max_chunks=1)
        # close() has returned to the server although the upstream is not done.
        assert body == CHUNKS[0] and error is None
        assert not committed.is_set()
    finally:
        rest.set()
    assert committed.wait(WAIT)
    join_detached_threads()
    assert blobs == [(Blob(hash_bytes(BODY), len(BODY)), None)]
    assert store.open(hash_bytes(BODY)).read() == BODY
    assert upstream.closed
    assert store.temp_files() == []


def test_finish_on_disconnect_upstream_error_removes_the_temp(temp_dir):
    aborted = threading.Event()
    reasons = []
    on_complete = Recorder()
    opts = StreamThroughOptions(temp_dir=temp_dir, finish_on_disconnect=True,
                                on_abort=lambda exc: (reasons.append(exc), aborted.set()))
    upstream = Upstream(CHUNKS, error=OSError("died while detached"))
    Response().run(opts, upstream, on_complete, max_chunks=1)
    assert aborted.wait(WAIT)
    join_detached_threads()
    assert [str(e) for e in reasons] == ["died while detached"]
    assert on_complete.calls == []
    assert os.listdir(temp_dir) == []


def test_max_size_abandons_caching_but_the_client_gets_everything(temp_dir):
    on_complete = Recorder()
    reasons = []
    opts = StreamThroughOptions(content_length=len(BODY), temp_dir=temp_dir, max_size=50,
                                on_abort=reasons.append)
    upstream = Upstream(CHUNKS)
    body, error = Response().run(opts, upstream, on_complete)
    assert (body, error) == (BODY, None)
    assert on_complete.calls == []
    assert [type(e) for e in reasons] == [CacheAbandoned]
    assert os.listdir(temp_dir) == []


def test_max_size_while_detached_stops_and_removes_the_temp(temp_dir):
    aborted = threading.Event()
    on_complete = Recorder()
    upstream = Upstream(CHUNKS)
    opts = StreamThroughOptions(temp_dir=temp_dir, finish_on_disconnect=True, max_size=50,
                                on_abort=lambda exc: aborted.set())
    Response().run(opts, upstream, on_complete, max_chunks=1)
    assert aborted.wait(WAIT)
    join_detached_threads()
    assert on_complete.calls == []
    assert upstream.closed
    assert os.listdir(temp_dir) == []


class Interrupted(BaseException):
    """Not an Exception: what a worker's timeout or shutdown may raise."""


def test_base_exception_before_the_first_byte_propagates_and_removes_the_temp(temp_dir):
    upstream = Upstream([], error=Interrupted())
    with pytest.raises(Interrupted):
        stream_through(dict(GET), Response().start_response, upstream,
                       StreamThroughOptions(temp_dir=temp_dir), Recorder())
    assert upstream.closed
    assert os.listdir(temp_dir) == []


FAILURES = {
    "error-at-zero-bytes": dict(upstream=lambda: Upstream([], error=OSError("x"))),
    "error-mid-stream": dict(upstream=lambda: Upstream(CHUNKS, error=OSError("x"))),
    "not-bytes-first": dict(upstream=lambda: Upstream(["text"])),
    "not-bytes-later": dict(upstream=lambda: Upstream([b"a", "text"])),
    "short": dict(upstream=lambda: Upstream(CHUNKS), content_length=len(BODY) + 1),
    "long": dict(upstream=lambda: Upstream(CHUNKS), content_length=len(BODY) - 1),
    "on-complete-raises": dict(upstream=lambda: Upstream(CHUNKS), on_complete_error=ValueError("x")),
    "client-disconnects": dict(upstream=lambda: Upstream(CHUNKS), max_chunks=2),
    "max-size": dict(upstream=lambda: Upstream(CHUNKS), max_size=len(BODY) - 1),
    "head": dict(upstream=lambda: Upstream(CHUNKS), environ={"REQUEST_METHOD": "HEAD"}),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_temp_file_removed_on_every_failure_path(temp_dir, case):
    spec = dict(FAILURES[case])
    upstream = spec.pop("upstream")()
    on_complete = Recorder(error=spec.pop("on_complete_error", None))
    run_kwargs = {k: spec.pop(k) for k in ("environ", "max_chunks") if k in spec}
    opts = StreamThroughOptions(temp_dir=temp_dir, **spec)
    Response().run(opts, upstream, on_complete, **run_kwargs)
    assert os.listdir(temp_dir) == []
    if case != "on-complete-raises":
        assert on_complete.calls == []


# -- concurrency ----------------------------------------------------------------

def test_twenty_concurrent_stream_throughs(store, committer):
    n = 20
    bodies = [bytes([i % 10]) * 4096 * (1 + i % 10) + b"%d" % (i % 10) for i in range(n)]  # 10 distinct
    barrier = threading.Barrier(n, timeout=WAIT)
    outcomes: dict[int, tuple[bytes, BaseException | None, str | None]] = {}

    def client(i: int) -> None:
        try:
            chunks = [bodies[i][j:j + 1024] for j in range(0, len(bodies[i]), 1024)]
            barrier.wait()
            r = Response()
            body, error = r.run(StreamThroughOptions(content_length=len(bodies[i]), temp_dir=committer.temp_dir),
                                Upstream(chunks), committer)
            outcomes[i] = (body, error, r.status)
        except BaseException as exc:
            outcomes[i] = (b"", exc, None)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    for i in range(n):
        assert outcomes[i] == (bodies[i], None, "200 OK")
    committer.flush(WAIT)
    assert set(store) == {hash_bytes(b) for b in bodies}
    assert len(set(store)) == 10
    assert store.verify() == []
    assert store.temp_files() == []


# -- Committer ------------------------------------------------------------------

def test_committer_commits_trusted_by_rename(store, committer, monkeypatch):
    f, tmp = store.new_temp()
    with f:
        f.write(b"committed")
    ino = os.stat(tmp).st_ino

    def no_hashing(*args, **kwargs):
        raise AssertionError("the Committer read the temp file again")

    monkeypatch.setattr(store_module, "hash_file", no_hashing)
    future = committer.submit(StreamThroughResult(hash_bytes(b"committed"), 9), tmp)
    assert future.result(WAIT) == Blob(hash_bytes(b"committed"), 9)
    assert os.stat(store.path(hash_bytes(b"committed"))).st_ino == ino  # no second copy
    assert not os.path.exists(tmp)


def test_committer_failure_is_logged_and_reported(store, committer, caplog):
    done = threading.Event()
    outcome = []
    missing = os.path.join(store.temp_dir, "cf-absent.part")
    with caplog.at_level(logging.ERROR, logger="cachefetch.stream"):
        future = committer.submit(StreamThroughResult(hash_bytes(b"x"), 1), missing,
                                  callback=lambda blob, err: (outcome.append((blob, err)), done.set()))
        assert done.wait(WAIT)
        with pytest.raises(FileNotFoundError):
            future.result(WAIT)
    assert outcome[0][0] is None and isinstance(outcome[0][1], FileNotFoundError)
    assert "cf-absent.part" in caplog.text
    committer.flush(WAIT)  # a failed commit does not stay pending


def test_committer_shutdown_refuses_new_commits(store):
    c = Committer(store)
    c.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        c.submit(StreamThroughResult(hash_bytes(b""), 0), os.path.join(store.temp_dir, "x"))


def test_options_are_checked():
    with pytest.raises(ValueError):
        StreamThroughOptions(content_length=-2)
    with pytest.raises(ValueError):
        StreamThroughOptions(max_size=-1)
    with pytest.raises(TypeError):
        StreamThroughOptions(extra_hashers=[object()])
    with pytest.raises(ValueError):
        StreamThroughOptions(extra_headers={"X": "a\nb"})
    with pytest.raises(TypeError):
        stream_through(GET, lambda *a: None, [], "opts", lambda r, p: None)
    with pytest.raises(TypeError):
        stream_through(GET, lambda *a: None, [], StreamThroughOptions(), "not callable")


def test_partial_writes_to_the_temp_file_are_completed(store, committer, monkeypatch):
    """A raw write may take only part of a chunk (a nearly full disk): the tee
    must write the rest, or the blob would not hold what its hash names."""
    import cachefetch.stream as stream_module

    class Stingy(io.FileIO):
        def write(self, data):  # at most 1000 bytes a call, like a disk near its end
            return super().write(memoryview(data)[:1000])

    real_fdopen = stream_module.os.fdopen

    def fdopen(fd, mode="r", buffering=-1, **kw):
        if mode == "wb" and buffering == 0:
            return Stingy(fd, "wb")
        return real_fdopen(fd, mode, buffering, **kw)

    monkeypatch.setattr(stream_module.os, "fdopen", fdopen)
    on_complete = Recorder(then=committer)
    body, error = Response().run(StreamThroughOptions(temp_dir=committer.temp_dir), Upstream(CHUNKS), on_complete)
    assert (body, error) == (BODY, None)
    (result, _, content), = on_complete.calls
    assert content == BODY
    committer.flush(WAIT)
    assert store.verify() == []
    assert store.open(result.hash).read() == BODY
