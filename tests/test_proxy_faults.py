"""`cachefetch serve` (generic protocol) against a faulty origin: down, slow,
dying mid-body, lying about its length, and answering 404/403/500.

After every fault the store must hold nothing corrupt and no temp file, and
the next request must go upstream again."""
from __future__ import annotations

import http.client
import os
import socket
import threading
import time

import pytest

from harness import cachefetch_serve, fetch, free_port, gunicorn, wait_until
from origin import Origin, Resource

from cachefetch.hashing import hash_bytes
from cachefetch.store import CAFS

BIG = 3 << 20  # several 1 MiB upstream chunks


def serve(tmp_path, upstream: str, *args: str):
    return cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", upstream, "--store", str(tmp_path / "store"),
                            "--workers", "2", "--threads", "8", *args)


def wait_settled(store) -> None:
    """Wait until no fetch is in flight (a leader unlinks its lock file once its
    commit and index entry are done, or once it failed)."""
    inflight = os.path.join(store, "inflight")
    wait_until(lambda: os.path.isdir(inflight) and os.listdir(inflight) == [], what="in-flight fetches to settle")


def blobs(store) -> set[str]:
    return {h.hex for h in CAFS(store)}


def assert_store_clean(store) -> None:
    """Once the server has stopped: no blob that fails verification, no temp file."""
    cafs = CAFS(store)
    assert cafs.verify() == []
    assert cafs.temp_files() == []


def is_plain_text(r) -> bool:
    return r.headers.get("Content-Type", "").startswith("text/plain")


def intercept(origin: Origin, path: str, behaviour):
    """Answer GETs of ``path`` with ``behaviour(handler)`` instead of a Resource
    (counted in ``origin.hits`` like any other request); returns ``restore()``."""
    base = origin.server.RequestHandlerClass

    class Handler(base):
        def do_GET(self, head=False):
            if self.path != path or head:
                return super().do_GET(head)
            origin.hits[path] += 1
            behaviour(self)

    origin.server.RequestHandlerClass = Handler

    def restore() -> None:
        origin.server.RequestHandlerClass = base

    return restore


def send_in_two_parts(first: bytes, rest: bytes, go_on: threading.Event):
    """A behaviour: headers and ``first``, then wait for ``go_on``, then ``rest``
    (or, if ``go_on`` never comes, close the connection short)."""

    def behaviour(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(first) + len(rest)))
        handler.send_header("Connection", "close")
        handler.close_connection = True
        handler.end_headers()
        try:
            handler.wfile.write(first)
            handler.wfile.flush()
            if go_on.wait(15):
                handler.wfile.write(rest)
                handler.wfile.flush()
        except OSError:
            pass

    return behaviour


# -- upstream down ------------------------------------------------------------

def test_upstream_on_a_closed_port_is_502_saying_so(tmp_path):
    port = free_port()  # nothing listens there
    with serve(tmp_path, f"http://127.0.0.1:{port}/base") as server:
        r = fetch(server.port, "/file.bin")
        assert r.status == 502
        assert is_plain_text(r)
        assert b"unreachable" in r.body and b"refused" in r.body.lower(), r.body
        assert "cachefetch_upstream_errors_total{kind=\"connect\"}" in fetch(server.port, "/-/metrics").body.decode()
        wait_settled(tmp_path / "store")
        assert blobs(tmp_path / "store") == set()
    assert server.proc.returncode == 0
    assert_store_clean(tmp_path / "store")


def test_upstream_stopped_is_502_for_a_miss_while_hits_are_still_served(tmp_path):
    store = tmp_path / "store"
    data = os.urandom(100_000)
    with Origin() as origin:
        origin.files["/base/kept.bin"] = Resource(data)
        origin.files["/base/never.bin"] = Resource(data)
        with serve(tmp_path, origin.url + "/base") as server:
            assert fetch(server.port, "/kept.bin").body == data
            wait_settled(store)
            origin.stop()
            r = fetch(server.port, "/never.bin")
            assert r.status == 502 and is_plain_text(r)
            assert b"the upstream is unreachable" in r.body, r.body
            hit = fetch(server.port, "/kept.bin")
            assert hit.status == 200 and hit.body == data
            assert hit.headers["Cache-Status"].startswith("cachefetch; hit")
            wait_settled(store)
            assert blobs(store) == {hash_bytes(data).hex}
    assert_store_clean(store)


# -- slow upstream -----------------------------------------------------------

def test_upstream_slower_than_the_read_timeout_is_504_and_not_cached(tmp_path):
    """read_timeout is not on the command line: create_app(read_timeout=0.5) under a real gunicorn."""
    store = tmp_path / "store"
    data = b"eventually" * 1000
    with Origin() as origin:
        origin.files["/base/slow.bin"] = Resource(data, delay=3.0)
        env = {"CF_PROXY_UPSTREAM": origin.url + "/base", "CF_PROXY_STORE": str(store),
               "CF_PROXY_READ_TIMEOUT": "0.5"}
        with gunicorn("proxy_wsgi:application", tmp_path, env=env, workers=1, threads=8) as server:
            r = fetch(server.port, "/slow.bin")
            assert r.status == 504, (r.status, r.body)
            assert is_plain_text(r)
            assert b"timed out" in r.body, r.body
            assert r.end - r.start < 2.5  # the proxy gave up; it did not wait for the origin
            # the origin recovers: the next request goes upstream again
            origin.files["/base/slow.bin"] = Resource(data)
            again = fetch(server.port, "/slow.bin")
            assert again.status == 200 and again.body == data
            assert origin.hits["/base/slow.bin"] == 2
            wait_settled(store)
            assert blobs(store) == {hash_bytes(data).hex}
    assert_store_clean(store)


@pytest.mark.parametrize("sent", [0, 1000], ids=["headers-only", "mid-body"])
def test_upstream_stalling_past_the_read_timeout_after_its_headers(tmp_path, sent):
    """Headers, then ``sent`` bytes, then silence: with nothing of the body sent the
    client gets a 504; once bytes have gone out, its connection is cut short."""
    store = tmp_path / "store"
    data = os.urandom(BIG)
    never = threading.Event()
    with Origin() as origin:
        restore = intercept(origin, "/base/stall.bin", send_in_two_parts(data[:sent], data[sent:], never))
        env = {"CF_PROXY_UPSTREAM": origin.url + "/base", "CF_PROXY_STORE": str(store),
               "CF_PROXY_READ_TIMEOUT": "0.5"}
        try:
            with gunicorn("proxy_wsgi:application", tmp_path, env=env, workers=1, threads=8) as server:
                r = fetch(server.port, "/stall.bin", timeout=10)
                if sent == 0:
                    assert r.status == 504 and is_plain_text(r), (r.status, r.body[:200])
                    assert b"timed out" in r.body
                else:
                    assert r.status == 200 and not r.complete, (r.status, r.complete, len(r.body))
                    assert data.startswith(r.body) and len(r.body) < len(data)
                wait_settled(store)
                assert blobs(store) == set()
                restore()  # the origin recovers
                origin.files["/base/stall.bin"] = Resource(data)
                again = fetch(server.port, "/stall.bin")
                assert again.status == 200 and again.complete and again.body == data
                assert origin.hits["/base/stall.bin"] == 2
        finally:
            never.set()
    assert_store_clean(store)


def test_trickling_upstream_streams_to_the_client_as_bytes_arrive(tmp_path):
    """The first bytes must reach the client while the origin holds the rest back,
    not once a large read buffer has filled."""
    store = tmp_path / "store"
    data = os.urandom(BIG)
    go_on = threading.Event()
    with Origin() as origin:
        intercept(origin, "/base/trickle.bin", send_in_two_parts(data[:20_000], data[20_000:], go_on))
        with serve(tmp_path, origin.url + "/base") as server:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            try:
                conn.request("GET", "/trickle.bin")
                try:
                    resp = conn.getresponse()
                    first = resp.read1(1 << 16)
                except socket.timeout:
                    pytest.fail("no byte within 5 s while the origin had sent 20 kB and waited for us")
                finally:
                    go_on.set()  # the origin sends the rest either way
                assert resp.status == 200
                assert first and data.startswith(first)
                rest = resp.read()
                assert first + rest == data
            finally:
                conn.close()
            wait_settled(store)
            assert blobs(store) == {hash_bytes(data).hex}
    assert_store_clean(store)


# -- broken bodies -----------------------------------------------------------

@pytest.mark.parametrize("die_after", [1000, (1 << 20) + 5000], ids=["in-first-chunk", "after-first-chunk"])
def test_upstream_dying_mid_body_cuts_the_client_short_and_stores_nothing(tmp_path, die_after):
    store = tmp_path / "store"
    data = os.urandom(BIG)
    with Origin() as origin:
        origin.files["/base/dies.bin"] = Resource(data, die_after=die_after)
        with serve(tmp_path, origin.url + "/base") as server:
            r = fetch(server.port, "/dies.bin")
            assert r.status == 502 or not r.complete, (r.status, r.complete, len(r.body))
            assert len(r.body) <= die_after
            wait_settled(store)
            assert blobs(store) == set()
            # the next request fetches again (and, the origin healed, stores it)
            origin.files["/base/dies.bin"] = Resource(data)
            again = fetch(server.port, "/dies.bin")
            assert again.status == 200 and again.complete and again.body == data
            assert origin.hits["/base/dies.bin"] == 2
            wait_settled(store)
            assert blobs(store) == {hash_bytes(data).hex}
    assert_store_clean(store)


@pytest.mark.parametrize("size", [10, BIG], ids=["small", "big"])
def test_upstream_announcing_more_than_it_sends_gives_an_incomplete_body_and_stores_nothing(tmp_path, size):
    store = tmp_path / "store"
    data = os.urandom(size)
    with Origin() as origin:
        origin.files["/base/lies.bin"] = Resource(data, announce=size + 100)
        with serve(tmp_path, origin.url + "/base") as server:
            r = fetch(server.port, "/lies.bin")
            assert r.status == 502 or not r.complete, (r.status, r.complete, len(r.body))
            wait_settled(store)
            assert blobs(store) == set()
            second = fetch(server.port, "/lies.bin")
            assert second.status == 502 or not second.complete
            assert origin.hits["/base/lies.bin"] == 2  # nothing cached: it went upstream again
            wait_settled(store)
            assert blobs(store) == set()
    assert_store_clean(store)


# -- upstream statuses -------------------------------------------------------

def test_upstream_404_is_404_and_negatively_cached(tmp_path):
    store = tmp_path / "store"
    with Origin() as origin:
        # A TTL no loaded machine outlasts between two requests: the hit must not depend on timing.
        with serve(tmp_path, origin.url + "/base", "--negative-ttl", "600") as server:
            first = fetch(server.port, "/missing.bin")
            assert first.status == 404 and first.body == b"no such file"  # the origin's own answer
            wait_settled(store)
            second = fetch(server.port, "/missing.bin")
            assert second.status == 404 and second.body == first.body
            assert second.headers["Cache-Status"].startswith("cachefetch; hit"), second.headers["Cache-Status"]
            assert origin.hits["/base/missing.bin"] == 1
            # Every negative entry shares one blob: junk paths cost index rows, not files.
            assert fetch(server.port, "/also-missing.bin").status == 404
            wait_settled(store)
            assert len(blobs(store)) == 1
    assert_store_clean(store)


def test_negative_entry_expires_after_negative_ttl(tmp_path):
    store = tmp_path / "store"
    with Origin() as origin:
        with serve(tmp_path, origin.url + "/base", "--negative-ttl", "1") as server:
            assert fetch(server.port, "/missing.bin").status == 404
            wait_settled(store)
            # it appears upstream; once the negative TTL lapses it is fetched again
            origin.files["/base/missing.bin"] = Resource(b"here now")
            time.sleep(1.2)  # let the 1 s negative TTL lapse: expiry is the behaviour under test
            third = fetch(server.port, "/missing.bin")
            assert third.status == 200 and third.body == b"here now"
            assert origin.hits["/base/missing.bin"] == 2
    assert_store_clean(store)


def test_upstream_403_is_passed_through_and_not_cached(tmp_path):
    store = tmp_path / "store"
    with Origin() as origin:
        origin.files["/base/private.bin"] = Resource(b"go away", status=403, content_type="text/plain")
        with serve(tmp_path, origin.url + "/base") as server:
            for n in (1, 2):
                r = fetch(server.port, "/private.bin")
                assert r.status == 403 and r.body == b"go away"
                assert "hit" not in r.headers.get("Cache-Status", "")
                assert origin.hits["/base/private.bin"] == n
            wait_settled(store)
            assert blobs(store) == set()
    assert_store_clean(store)


def test_upstream_500_is_passed_through_as_sent_and_not_cached(tmp_path):
    """A reverse proxy passes the origin's error on (status, headers, body);
    only its own failures are local answers."""
    store = tmp_path / "store"
    with Origin() as origin:
        origin.files["/base/broken.bin"] = Resource(b"internal details", status=500,
                                                    headers={"X-Origin-Detail": "db down"})
        with serve(tmp_path, origin.url + "/base") as server:
            for n in (1, 2):
                r = fetch(server.port, "/broken.bin")
                assert r.status == 500 and r.body == b"internal details"
                assert r.headers["X-Origin-Detail"] == "db down"
                assert origin.hits["/base/broken.bin"] == n
            wait_settled(store)
            assert blobs(store) == set()
    assert_store_clean(store)
