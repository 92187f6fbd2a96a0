"""The fleet through real processes: redis-server, three `cachefetch serve`
hosts on 127.0.0.1-3, a real origin. Hits anywhere, peer fill by hash, the
endpoint's authentication."""
from __future__ import annotations

import http.client
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from cachefetch.fleet import auth
from cachefetch.hashing import hash_bytes
from fleet_harness import requires_redis, HOSTS, SECRET, fleet, get, metric, redis_server
from harness import run_cli, wait_until
from origin import Origin, Resource

pytestmark = requires_redis


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    with Origin() as origin, redis_server(tmp) as redis, fleet(tmp, origin.url, redis.url) as hosts:
        yield origin, redis, hosts
    for host in hosts:
        assert run_cli("verify", "--store", host.extra["store"]).returncode == 0


def _holders(redis, body: bytes) -> set[str]:
    return {m.decode() for m in redis.client().smembers(f"cachefetch:h:{hash_bytes(body).hex}")}


def _published(redis, body: bytes) -> None:
    """Wait for the leader's background commit to publish the entry (held by Redis, no event to await)."""
    wait_until(lambda: _holders(redis, body), what="the entry to be published")


def test_a_hit_anywhere_after_one_fetch_fills_by_hash_from_the_peer(world):
    origin, redis, hosts = world
    body = os.urandom(3 << 20)
    origin.files["/anywhere.bin"] = Resource(body)
    first = get(hosts[0], "/anywhere.bin")
    assert first.status == 200 and first.body == body
    _published(redis, body)
    fills_before = metric(hosts[1], "cachefetch_fleet_peer_fills_total")
    fleet_hits = metric(hosts[1], "cachefetch_fleet_hits_total")
    for host in hosts[1:]:
        got = get(host, "/anywhere.bin")
        assert got.status == 200 and got.complete and got.body == body
        assert "hit" in got.headers["Cache-Status"]
    assert origin.hits["/anywhere.bin"] == 1
    assert metric(hosts[1], "cachefetch_fleet_peer_fills_total") == fills_before + 1
    assert metric(hosts[1], "cachefetch_fleet_peer_fill_bytes_total") >= len(body)
    assert metric(hosts[1], "cachefetch_fleet_hits_total") == fleet_hits + 1
    assert _holders(redis, body) == {h.url for h in hosts}
    # Now local on every host: a second request on each is a plain hit, no new fill.
    for host in hosts:
        assert get(host, "/anywhere.bin").body == body
    assert metric(hosts[1], "cachefetch_fleet_peer_fills_total") == fills_before + 1


def test_an_invalidation_on_one_host_reaches_every_host(world):
    origin, redis, hosts = world
    origin.files["/changes.txt"] = Resource(b"first version")
    assert get(hosts[0], "/changes.txt").body == b"first version"
    _published(redis, b"first version")
    for host in hosts:
        assert get(host, "/changes.txt").body == b"first version"
    assert origin.hits["/changes.txt"] == 1
    origin.files["/changes.txt"] = Resource(b"second version")
    posted = requests.post(hosts[2].url + "/changes.txt", data=b"x")
    assert posted.status_code == 200
    assert get(hosts[0], "/changes.txt").body == b"second version"
    assert get(hosts[1], "/changes.txt").body == b"second version"


class _Liar:
    """A test double at the fill endpoint: answers every blob with other bytes of the same length."""

    def __init__(self, host: str) -> None:
        liar = self
        self.asked = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                liar.asked += 1
                self.send_response(200)
                self.send_header("Content-Length", str(liar.size))
                self.end_headers()
                self.wfile.write(b"\0" * liar.size)

        self.size = 0
        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_lying_peer_costs_a_refetch_never_a_wrong_byte(world):
    origin, redis, hosts = world
    body = os.urandom(1 << 20)
    origin.files["/lied-about.bin"] = Resource(body)
    assert get(hosts[0], "/lied-about.bin").body == body
    _published(redis, body)
    failures = metric(hosts[1], "cachefetch_fleet_peer_verification_failures_total")
    with _Liar(HOSTS[2]) as liar:
        liar.size = len(body)
        holders = f"cachefetch:h:{hash_bytes(body).hex}"
        r = redis.client()
        r.delete(holders)
        r.sadd(holders, liar.url)  # the only holder Redis knows is the liar
        got = get(hosts[1], "/lied-about.bin")
        assert liar.asked == 1
    assert got.status == 200 and got.complete and got.body == body
    assert origin.hits["/lied-about.bin"] == 2  # the refetch
    assert metric(hosts[1], "cachefetch_fleet_peer_verification_failures_total") == failures + 1
    assert get(hosts[1], "/lied-about.bin").body == body  # and then a local hit
    assert origin.hits["/lied-about.bin"] == 2


class _Answer:
    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code, self.content = status_code, content


def _signed(host, target: str, secret: bytes = SECRET, now: float | None = None) -> _Answer:
    """A signed GET of ``target`` sent byte for byte (http.client: no client-side normalising of ``..``)."""
    conn = http.client.HTTPConnection(host.host, host.port, timeout=10)
    try:
        conn.request("GET", target, headers=auth.sign(secret, "GET", target, now))
        resp = conn.getresponse()
        return _Answer(resp.status, resp.read())
    finally:
        conn.close()


def test_the_endpoint_refuses_without_the_secret_a_wrong_hmac_stale_times_and_other_paths(world):
    origin, redis, hosts = world
    body = b"a blob to ask for" * 100
    origin.files["/asked.bin"] = Resource(body)
    assert get(hosts[0], "/asked.bin").body == body
    _published(redis, body)
    target = f"/-/fleet/blob/{hash_bytes(body).hex}"
    base = hosts[0]
    assert requests.get(base.url + target, timeout=10).status_code == 403
    assert _signed(base, target, secret=b"not-the-fleet-secret-at-all").status_code == 403
    assert _signed(base, target, now=time.time() - 3600).status_code == 403
    forged = auth.sign(SECRET, "GET", "/-/fleet/blob/" + "0" * 64)  # signed for another path
    assert requests.get(base.url + target, headers=forged, timeout=10).status_code == 403
    for path in ("/-/fleet/blob/../../index.sqlite3", "/-/fleet/blob/" + hash_bytes(body).hex.upper(),
                 "/-/fleet/blob/..%2F..%2Fsecret", "/-/fleet/tmp/cf-x", "/-/fleet/flight/../blobs",
                 "/-/fleet/blob/" + hash_bytes(body).hex + "/x"):
        assert _signed(base, path).status_code == 404, path
    assert origin.hits["/-/fleet/blob/" + hash_bytes(body).hex] == 0  # never forwarded upstream
    ok = _signed(base, target)
    assert ok.status_code == 200 and ok.content == body
