"""cachefetch.download: Downloader and handle_result (the seed's mapping)."""
from __future__ import annotations

import logging
import threading

import pytest

from harness import wait_until
from werkzeug.test import Client

from cachefetch.download import Downloader, HandleResultParams, Result, ServeOptions, handle_result
from cachefetch.hashing import hash_bytes
from cachefetch.singleflight import Group, WaitTimeout
from cachefetch.store import Blob

WAIT = 10.0
BODY = b"the downloaded object\n" * 100


class SpyDownloader(Downloader):
    """A real Downloader that also records which keys were forgotten."""

    def __init__(self) -> None:
        super().__init__()
        self.forgotten: list[object] = []

    def forget(self, key) -> None:
        self.forgotten.append(key)
        super().forget(key)


@pytest.fixture
def downloader():
    d = SpyDownloader()
    yield d
    d.group.shutdown(wait=True)


class NotFound(Exception):
    pass


def respond(store, downloader, key, result=None, error=None, **kwargs):
    """Answer a GET through handle_result, via werkzeug's test Client."""
    def app(environ, start_response):
        return handle_result(HandleResultParams(environ, start_response, downloader, key, result, error, store,
                                                is_not_found=lambda e: isinstance(e, NotFound), **kwargs))
    return Client(app).get("/object")


# -- Downloader -----------------------------------------------------------------

def test_downloader_one_call(store, downloader):
    calls = []

    def fetch():
        calls.append(threading.current_thread().name)
        return store.put(BODY)

    result, shared = downloader.do("key", fetch)
    assert (result, shared) == (Result(hash_bytes(BODY), len(BODY)), False)
    assert isinstance(result, Result)
    assert len(calls) == 1 and calls[0] != threading.current_thread().name


def test_downloader_coalesces_concurrent_callers(store, downloader):
    n = 10
    release = threading.Event()
    calls = []

    def fetch():
        calls.append(1)
        assert release.wait(WAIT)
        return store.put(BODY)

    outcomes = []

    def caller():
        outcomes.append(downloader.do("key", fetch))

    threads = [threading.Thread(target=caller) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: downloader.group.callers("key") == n)  # all joined the one flight
    finally:
        release.set()
        for t in threads:
            t.join(WAIT)
    assert len(calls) == 1
    assert outcomes == [(Result(hash_bytes(BODY), len(BODY)), True)] * n


def test_downloader_rejects_a_function_that_returns_no_result(downloader):
    with pytest.raises(TypeError):
        downloader.do("key", lambda: b"bytes, not a Result")
    with pytest.raises(TypeError):
        Downloader(group="not a group")


def test_downloader_caller_timeout_is_wait_timeout(store, downloader):
    release = threading.Event()
    done = threading.Event()

    def fetch():
        assert release.wait(WAIT)
        blob = store.put(BODY)
        done.set()
        return blob

    try:
        with pytest.raises(WaitTimeout):
            downloader.do("key", fetch, timeout=0.02)
    finally:
        release.set()
    assert done.wait(WAIT)  # the download went on without its caller
    assert store.exists(hash_bytes(BODY))


def test_downloader_uses_the_given_group(store):
    group = Group()
    try:
        d = Downloader(group)
        assert d.group is group
        assert d.do("k", lambda: store.put(b"x"))[0].hash == hash_bytes(b"x")
    finally:
        group.shutdown()


# -- handle_result ----------------------------------------------------------------

def test_success_serves_from_the_store(store, downloader):
    blob = store.put(BODY)
    r = respond(store, downloader, "key", result=blob, opts=ServeOptions(content_type="text/plain"))
    assert r.status_code == 200
    assert r.data == BODY
    assert r.headers["Content-Type"] == "text/plain"
    assert r.headers["ETag"] == f'"{blob.hash.hex}"'
    assert downloader.forgotten == []


def test_real_error_forgets_and_gives_502(store, downloader, caplog):
    with caplog.at_level(logging.ERROR, logger="cachefetch.download"):
        r = respond(store, downloader, "key", error=ConnectionError("upstream refused"))
    assert r.status_code == 502
    assert downloader.forgotten == ["key"]
    assert "upstream refused" in caplog.text


def test_upstream_timeout_forgets_and_gives_504(store, downloader):
    r = respond(store, downloader, "key", error=TimeoutError("upstream read timed out"))
    assert r.status_code == 504
    assert downloader.forgotten == ["key"]


def test_not_found_forgets_and_gives_404(store, downloader):
    r = respond(store, downloader, "key", error=NotFound("no such object"))
    assert r.status_code == 404
    assert downloader.forgotten == ["key"]


def test_not_found_handler_builds_the_response(store, downloader):
    def app(environ, start_response):
        def not_found_handler():  # called with no arguments: it closes over what it needs
            start_response("410 Gone", [("Content-Type", "text/plain")])
            return [b"custom not found"]

        return handle_result(HandleResultParams(environ, start_response, downloader, "key", None, NotFound(),
                                                store, is_not_found=lambda e: isinstance(e, NotFound),
                                                not_found_handler=not_found_handler))

    r = Client(app).get("/")
    assert (r.status_code, r.data) == (410, b"custom not found")
    assert downloader.forgotten == ["key"]


def test_not_found_check_is_optional(store, downloader):
    def app(environ, start_response):
        return handle_result(HandleResultParams(environ, start_response, downloader, "key", None,
                                                NotFound("treated as any error"), store))
    assert Client(app).get("/").status_code == 502
    assert downloader.forgotten == ["key"]


def test_caller_wait_timeout_gives_504_and_does_not_forget(store, downloader):
    release = threading.Event()
    downloaded = threading.Event()

    def fetch():
        assert release.wait(WAIT)
        blob = store.put(BODY)
        downloaded.set()
        return blob

    try:
        try:
            downloader.do("key", fetch, timeout=0.02)
        except WaitTimeout as exc:
            error = exc
        else:
            raise AssertionError("expected a WaitTimeout")
        r = respond(store, downloader, "key", error=error)
        assert r.status_code == 504
        assert downloader.forgotten == []
        assert downloader.group.in_flight("key")  # the download goes on for the others
    finally:
        release.set()
    assert downloaded.wait(WAIT)


def test_forget_on_error_lets_the_next_request_download_again(store, downloader):
    # The seed's reason for forgetting: a failed download must not be the
    # answer for callers that arrive after it was reported.
    release, started = threading.Event(), threading.Event()
    attempts = []

    def failing():
        attempts.append("fail")
        started.set()
        assert release.wait(WAIT)
        raise ConnectionError("boom")

    outcome = []

    def first_caller():
        try:
            downloader.do("key", failing)
        except ConnectionError as exc:
            outcome.append(exc)

    t = threading.Thread(target=first_caller)
    t.start()
    try:
        assert started.wait(WAIT)
        r = respond(store, downloader, "key", error=ConnectionError("reported by another caller"))
        assert r.status_code == 502
        assert not downloader.group.in_flight("key")
        result, shared = downloader.do("key", lambda: (attempts.append("retry"), store.put(BODY))[1])
        assert result == Result(hash_bytes(BODY), len(BODY)) and shared is False
    finally:
        release.set()
        t.join(WAIT)
    assert attempts == ["fail", "retry"]
    assert [str(e) for e in outcome] == ["boom"]  # the old flight's caller still got its outcome


def test_handle_result_needs_exactly_one_of_result_and_error(store, downloader):
    blob = store.put(b"x")
    for result, error in ((None, None), (blob, RuntimeError())):
        with pytest.raises(ValueError):
            handle_result(HandleResultParams({}, lambda *a: None, downloader, "k", result, error, store))


def test_success_with_a_blob_missing_from_the_store_gives_500(store, downloader):
    ghost = Blob(hash_bytes(b"gone"), 4)
    assert respond(store, downloader, "key", result=ghost).status_code == 500
