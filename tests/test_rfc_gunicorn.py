"""RFC 9111 behaviour of CacheFetch under a real gunicorn (gthread, 2 workers x 16
threads) on 127.0.0.1: a coalesced revalidation herd, stale-while-revalidate,
invalidation across workers, and a cold Range request answered from the growing body."""
from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import blake3
import pytest

from harness import curl, fetch, gunicorn, wait_until
from herd_app import body_for
from rfc_app import LAST_MODIFIED, STALE_SIZE, app_calls, done_marker, etag_for, gate_path, make_env

from cachefetch.hashing import Hash
from cachefetch.layout import StoreLayout
from cachefetch.store import CAFS

HERD = 50
THREADS = 16
APP = "rfc_wsgi:application"


env = pytest.fixture(lambda tmp_path: make_env(tmp_path), name="env")


def herd(port, path, n=HERD):
    """``n`` clients released together, each on a fresh connection."""
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        return fetch(port, path)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def blob_files(env) -> dict[str, tuple[int, int]]:
    """Every blob in the store: path -> (inode, mtime in ns)."""
    out = {}
    for root, _, files in os.walk(StoreLayout.at(env["CF_TEST_STORE"]).blobs_dir):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.join(root, name)] = (st.st_ino, st.st_mtime_ns)
    return out


def settled(env) -> bool:
    """No flight is running (the last one's commit has landed and released it)."""
    flights = StoreLayout.at(env["CF_TEST_STORE"]).flights_dir
    return not os.path.isdir(flights) or os.listdir(flights) == []


def warm(env, port, path, expected):
    """Store ``path`` and wait for its commit; returns the blob's path."""
    first = fetch(port, path)
    assert first.status == 200 and first.body == expected, first.headers
    assert "stored" in first.headers["Cache-Status"], first.headers["Cache-Status"]
    blob = StoreLayout.at(env["CF_TEST_STORE"]).blob_path(Hash.from_digest(blake3.blake3(expected).digest()))
    wait_until(lambda: os.path.exists(blob) and settled(env), what="the first response's commit")
    return blob


def assert_store_clean(env):
    store = CAFS(env["CF_TEST_STORE"])
    assert store.verify() == []
    assert store.temp_files() == []
    assert settled(env)


def statuses(results) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in results:
        kinds[r.headers["Cache-Status"]] = kinds.get(r.headers["Cache-Status"], 0) + 1
    return kinds


def test_stale_herd_sends_one_conditional_request_and_keeps_the_blob(env, tmp_path):
    path = "/rfc/stale/herd"
    url = f"{path}?delay=1"
    expected = body_for(path, STALE_SIZE)
    with gunicorn(APP, tmp_path, env=env, threads=THREADS) as server:
        blob = warm(env, server.port, url, expected)
        before = blob_files(env)
        results = herd(server.port, url)
        kinds = statuses(results)
        print(kinds)
        calls = app_calls(env, path)
        assert len(calls) == 2, (calls, kinds, server.log())
        assert not calls[0].conditional
        revalidation = calls[1]
        assert revalidation.if_none_match == etag_for(path), revalidation
        assert revalidation.if_modified_since == LAST_MODIFIED, revalidation
        for r in results:
            assert r.status == 200 and r.complete, (r.status, r.headers)
            assert r.body == expected
        assert sum(n for k, n in kinds.items() if "fwd-status=304" in k) >= 1, kinds
        assert not any("fwd=miss" in k for k in kinds), kinds
        # One conditional request across processes: both workers answered clients.
        assert len({r.headers["X-Worker"] for r in results}) == 2, kinds
        # The 304 refreshed the entry without rewriting or adding a blob.
        assert blob_files(env) == before, (before, blob_files(env))
        assert os.path.exists(blob)
        after = fetch(server.port, url)
        assert after.headers["Cache-Status"].startswith("cachefetch; hit"), after.headers["Cache-Status"]
        assert after.headers["ETag"] == etag_for(path) and after.body == expected
        assert len(app_calls(env, path)) == 2
    assert_store_clean(env)


def test_stale_while_revalidate_herd_never_waits_on_the_app(env, tmp_path):
    path = "/rfc/stale/swr"
    url = f"{path}?swr=600&gate=swr"
    expected = body_for(path, STALE_SIZE)
    with gunicorn(APP, tmp_path, env=env, threads=THREADS) as server:
        warm(env, server.port, url, expected)
        before = blob_files(env)
        try:
            # The app's revalidation cannot answer before the gate opens, which
            # happens only after every client has its whole answer.
            results = herd(server.port, url)
            kinds = statuses(results)
            for r in results:
                assert r.status == 200 and r.complete and r.body == expected, (r.status, r.headers)
                assert "hit" in r.headers["Cache-Status"] and "stale-while-revalidate" in r.headers["Cache-Status"], kinds
            assert not os.path.exists(gate_path(env, "swr"))
            background = wait_until(lambda: [c for c in app_calls(env, path) if c.conditional],
                                    what="the background revalidation to reach the app")
            assert background[0].if_none_match == etag_for(path)
            assert background[0].if_modified_since == LAST_MODIFIED
        finally:
            open(gate_path(env, "swr"), "w").close()
        refreshed = wait_until(lambda: (r := fetch(server.port, url)).headers["Cache-Status"].startswith(
            "cachefetch; hit; ttl=3") and r, what="the 304 to refresh the entry (max-age=3600)")
        assert refreshed.body == expected
        calls = app_calls(env, path)
        assert len(calls) == 2 and [c.conditional for c in calls] == [False, True], (calls, kinds)
        assert blob_files(env) == before
    assert_store_clean(env)


def _connections_on_two_workers(port):
    """Two keep-alive connections that different workers serve. The kernel
    gives a shared listener's connections to whichever worker accepts first,
    and one worker may take every one (40 in a row were seen under load), so
    the first connection's worker is stopped (SIGSTOP) while the second is
    made: only the other can accept it."""
    first = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    worker = _get(first, "/rfc/whoami").getheader("X-Worker")
    os.kill(int(worker), signal.SIGSTOP)
    try:
        second = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        other = _get(second, "/rfc/whoami").getheader("X-Worker")
    finally:
        os.kill(int(worker), signal.SIGCONT)
    assert other != worker, f"a stopped worker ({worker}) answered"
    return first, second


class _Answer:
    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.status = resp.status
        self.headers = resp.headers
        self.body = resp.read()

    def getheader(self, name):
        return self.headers[name]


def _get(conn, path, method="GET", body=None):
    conn.request(method, path, body=body)
    return _Answer(conn.getresponse())


def test_invalidation_is_seen_by_the_other_worker_on_its_next_request(env, tmp_path):
    path = "/rfc/page/inv"
    with gunicorn(APP, tmp_path, env=env, threads=THREADS, args=("--keep-alive", "60")) as server:
        a, b = _connections_on_two_workers(server.port)
        try:
            worker_a, worker_b = _get(a, "/rfc/whoami").getheader("X-Worker"), _get(b, "/rfc/whoami").getheader("X-Worker")
            assert worker_a != worker_b
            for writer, reader, method in ((a, b, "POST"), (b, a, "PUT")):
                first = _get(writer, path)
                assert first.status == 200
                wait_until(lambda: settled(env), what="the commit")
                on_writer = _get(writer, path)
                on_reader = _get(reader, path)
                for answer in (on_writer, on_reader):
                    assert answer.headers["Cache-Status"].startswith("cachefetch; hit"), answer.headers["Cache-Status"]
                    assert answer.body == first.body
                gets = len([c for c in app_calls(env, path) if c.method == "GET"])
                changed = _get(writer, path, method, body=b"new")
                assert changed.status == 200 and changed.body == b"changed"
                assert changed.headers["X-Worker"] == (worker_a if writer is a else worker_b)
                after = _get(reader, path)
                assert after.headers["X-Worker"] == (worker_b if reader is b else worker_a)
                assert "fwd=miss" in after.headers["Cache-Status"], (method, after.headers["Cache-Status"])
                assert after.body != first.body
                assert len([c for c in app_calls(env, path) if c.method == "GET"]) == gets + 1
                wait_until(lambda: settled(env), what="the new entry's commit")
        finally:
            a.close()
            b.close()
    assert_store_clean(env)


def test_cold_range_request_is_answered_before_the_body_arrives_and_stores_it_whole(env, tmp_path):
    name = "range"
    path = f"/rfc/trickle/{name}"
    size = 50 << 20
    url = f"{path}?size={size}&trickle=3"
    expected = body_for(path, size)
    part = tmp_path / "part"
    with gunicorn(APP, tmp_path, env=env, threads=THREADS) as server:
        t0 = time.monotonic()
        got = curl("-r", "1000000-1000099", "-D", "-", "-o", str(part), server.url + url)
        finished_before_curl = os.path.exists(done_marker(env, name))
        took = time.monotonic() - t0
        assert got.returncode == 0, got.stderr
        head = got.stdout.decode("latin-1").lower()
        assert head.startswith("http/1.1 206"), head
        assert "content-range: bytes 1000000-1000099/52428800" in head, head
        assert part.read_bytes() == expected[1000000:1000100]
        assert not finished_before_curl, "the app had sent its whole body before curl had its 100 bytes"
        wait_until(lambda: os.path.exists(done_marker(env, name)), what="the app to send its whole body")
        print(f"curl had its 100 bytes after {took:.3f} s; the app sent the whole body "
              f"{time.monotonic() - t0:.3f} s after curl started")
        whole = wait_until(lambda: (r := fetch(server.port, url)).headers["Cache-Status"].startswith("cachefetch; hit")
                           and r, what="the whole body to be stored")
        assert whole.status == 200 and whole.complete and whole.body == expected
        assert len(app_calls(env, path)) == 1
    assert_store_clean(env)
