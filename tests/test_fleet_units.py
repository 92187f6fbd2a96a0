"""The fleet's parts in one process, against a real redis-server: the
signature, the entry codec, the link's down/up, and option checks."""
from __future__ import annotations

import contextlib
import logging
import math
import time

import pytest
import redis as redis_py

from cachefetch.fleet import Fleet, FleetUnavailable, RedisLink, auth
from cachefetch.fleet.fleet import as_fleet
from cachefetch.fleet.keys import FleetKeys
from cachefetch.fleet.redis_flights import Lease
from cachefetch.fleet.redis_index import decode_entry, encode_entry
from cachefetch.hashing import hash_bytes
from cachefetch.index import Entry
from fleet_harness import requires_redis, SECRET, redis_server
from harness import run_cli

pytestmark = requires_redis


def test_a_signature_binds_method_target_and_time():
    headers = auth.sign(SECRET, "GET", "/-/fleet/blob/ab", now=1000)
    date, mac = headers[auth.DATE_HEADER], headers[auth.SIGNATURE_HEADER]
    assert auth.check(SECRET, "GET", "/-/fleet/blob/ab", date, mac, now=1010) is None
    assert auth.check(SECRET, "HEAD", "/-/fleet/blob/ab", date, mac, now=1010) == "bad signature"
    assert auth.check(SECRET, "GET", "/-/fleet/blob/ac", date, mac, now=1010) == "bad signature"
    assert auth.check(b"x" * 32, "GET", "/-/fleet/blob/ab", date, mac, now=1010) == "bad signature"
    assert auth.check(SECRET, "GET", "/-/fleet/blob/ab", date, mac, now=1000 + auth.MAX_SKEW + 1) == "stale"
    assert auth.check(SECRET, "GET", "/-/fleet/blob/ab", None, mac) == "unsigned"
    assert auth.check(SECRET, "GET", "/-/fleet/blob/ab", "12a", mac) == "bad date"
    with pytest.raises(ValueError):
        auth.sign(b"short", "GET", "/")


def test_entries_round_trip_and_anything_else_decodes_to_none():
    entry = Entry("GET http://h/x", "gzip", hash_bytes(b"x"), 1, 200, (("Content-Type", "text/plain"),),
                  1000.5, 2000.0, ("accept-encoding",), 3)
    assert decode_entry(encode_entry(entry)) == entry
    for junk in (b"", b"not json", b"[]", b'{"v": 2}', encode_entry(entry).replace(b'"size":1', b'"size":-1')):
        assert decode_entry(junk) is None


def test_lease_tokens_parse_strictly():
    lease = Lease(7, "0123456789abcdef", "http://127.0.0.2:8080")
    parsed = Lease.parse(lease.token().encode())
    assert (parsed.fence, parsed.fid, parsed.host) == (7, "0123456789abcdef", "http://127.0.0.2:8080")
    for junk in (None, b"", b"7 0123 http://h", b"x 0123456789abcdef http://h", b"7 0123456789abcdef"):
        assert Lease.parse(junk) is None


def test_the_link_goes_down_warns_once_and_rejoins(tmp_path, caplog):
    with redis_server(tmp_path) as server:
        link = RedisLink.from_url(server.url, timeout=0.5, retry_after=0.0)
        rejoined = []
        link.on_rejoin(lambda: rejoined.append(True))
        assert link.run(lambda r: r.ping())
        server.kill()
        caplog.set_level(logging.WARNING, "cachefetch.fleet")
        for _ in range(3):
            with pytest.raises(FleetUnavailable):
                link.run(lambda r: r.ping())
        assert not link.up
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) <= 1  # at most once a minute (an earlier test may have used the minute)
        server.start()
        assert link.run(lambda r: r.ping()) and link.up and rejoined == [True]
        link.close()


def test_a_link_that_failed_does_not_retry_before_its_time(tmp_path):
    with redis_server(tmp_path) as server:
        link = RedisLink.from_url(server.url, timeout=0.5, retry_after=60.0)
        server.kill()
        with pytest.raises(FleetUnavailable):
            link.run(lambda r: r.ping())
        server.start()
        calls = []
        with pytest.raises(FleetUnavailable):
            link.run(lambda r: calls.append(r))
        assert calls == []  # known down: not even tried
        link.close()


def test_fleet_options_are_checked():
    link = RedisLink(redis_py.Redis(port=1))
    with pytest.raises(ValueError):
        Fleet(link, secret=b"short", advertise="http://127.0.0.1:1")
    for bad in ("127.0.0.1:8080", "ftp://h:1", "http://h:1/path", "http://u@h:1"):
        with pytest.raises(ValueError):
            Fleet(link, secret=SECRET, advertise=bad)
    with pytest.raises(ValueError):
        Fleet(link, secret=SECRET, advertise="http://h:1", lease_ms=10)
    with pytest.raises(ValueError):
        Fleet.from_url("http://not-redis", secret=SECRET, advertise="http://h:1")
    with pytest.raises(TypeError):
        as_fleet(42)
    with pytest.raises(ValueError):
        FleetKeys("two words")


def test_serve_refuses_half_a_fleet_configuration(tmp_path):
    store = str(tmp_path / "store")
    done = run_cli("serve", "--store", store, "--upstream", "http://127.0.0.1:1", "--fleet", "redis://127.0.0.1:1/0")
    assert done.returncode == 2 and "--fleet needs --fleet-secret-file and --advertise" in done.stderr
    done = run_cli("serve", "--store", store, "--upstream", "http://127.0.0.1:1", "--advertise", "http://127.0.0.1:1")
    assert done.returncode == 2 and "need --fleet" in done.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was created


def test_a_blob_removed_from_the_store_withdraws_this_host_from_its_holders(tmp_path):
    """gc and eviction remove blobs through CAFS.delete: Redis must stop
    sending peers to a host for a blob it no longer has."""
    from cachefetch.index import SQLiteIndex
    from cachefetch.maintenance import collect_garbage
    from cachefetch.store import CAFS

    with redis_server(tmp_path) as server:
        fleet = Fleet.from_url(server.url, secret=SECRET, advertise="http://127.0.0.9:1")
        store = CAFS(tmp_path / "store", fsync=False)
        local = SQLiteIndex(store.layout.index_path)
        member = fleet.attach(store, local)
        blob = store.put(b"evicted soon" * 100)
        member.filler.announce(blob.hash)
        holders = FleetKeys("cachefetch").holders(blob.hash)
        client = server.client()
        assert client.smembers(holders) == {b"http://127.0.0.9:1"}
        collect_garbage(store, local, 0, grace=0, sweep=True)  # a blob no entry knows: removed
        assert not store.exists(blob.hash)
        assert client.smembers(holders) == set()
        client.close()
        local.close()
        fleet.close()


@contextlib.contextmanager
def _member(tmp_path):
    """A fleet member on a fresh redis-server: ``(member, store, keys, client)``."""
    from cachefetch.index import SQLiteIndex
    from cachefetch.store import CAFS

    with redis_server(tmp_path) as server:
        fleet = Fleet.from_url(server.url, secret=SECRET, advertise="http://127.0.0.9:1")
        store = CAFS(tmp_path / "store", fsync=False)
        local = SQLiteIndex(store.layout.index_path)
        member = fleet.attach(store, local)
        client = server.client()
        try:
            yield member, store, FleetKeys("cachefetch"), client
        finally:
            client.close()
            local.close()
            fleet.close()


def _entry(key: str, variant: str, body: bytes, expires_at: float) -> Entry:
    return Entry(key, variant, hash_bytes(body), len(body), 200, (("Content-Type", "text/plain"),),
                 time.time(), expires_at, (), 0)


def test_redis_keys_live_until_a_week_after_the_longest_freshness_and_forever_entries_keep_theirs(tmp_path):
    """An entry's hash and its holders set expire STALE_WINDOW after the
    freshness of the longest-lived entry written to them; a shorter-lived
    write never shortens that; a FOREVER entry keeps its key."""
    from cachefetch.maintenance import STALE_WINDOW

    with _member(tmp_path) as (member, store, keys, client):
        now = time.time()
        store.put(b"x" * 100)
        long_lived = _entry("GET http://h/x", "a", b"x" * 100, now + 3600)
        member.index.put(long_lived)
        ttl = client.pttl(keys.entries(long_lived.key)) / 1000
        assert abs(ttl - (3600 + STALE_WINDOW)) < 60, ttl
        assert abs(client.pttl(keys.holders(long_lived.hash)) / 1000 - (3600 + STALE_WINDOW)) < 60
        member.index.put(_entry("GET http://h/x", "b", b"x" * 100, now + 10))  # a shorter-lived variant
        assert abs(client.pttl(keys.entries(long_lived.key)) / 1000 - (3600 + STALE_WINDOW)) < 60
        member.index.put(_entry("GET http://h/x", "c", b"x" * 100, now + 7200))  # a longer-lived one
        assert abs(client.pttl(keys.entries(long_lived.key)) / 1000 - (7200 + STALE_WINDOW)) < 60
        member.index.put(_entry("GET http://h/x", "d", b"x" * 100, None))  # FOREVER
        assert client.pttl(keys.entries(long_lived.key)) == -1
        member.index.put(_entry("GET http://h/x", "e", b"x" * 100, now + 10))
        assert client.pttl(keys.entries(long_lived.key)) == -1  # still kept for the FOREVER entry


def test_an_entry_past_its_horizon_is_gone_from_redis(tmp_path):
    """Redis itself drops the key: nothing sweeps, nothing is left behind."""
    from cachefetch.maintenance import STALE_WINDOW

    with _member(tmp_path) as (member, store, keys, client):
        store.put(b"old" * 10)
        # stale for a week less 3 s: its horizon is 3 s away (room for a loaded machine to write it)
        entry = _entry("GET http://h/old", "", b"old" * 10, time.time() - STALE_WINDOW + 3.0)
        member.index.put(entry)
        name = keys.entries(entry.key)
        assert client.exists(name)
        deadline = time.monotonic() + 15
        while client.exists(name) and time.monotonic() < deadline:
            time.sleep(0.05)  # Redis's own clock is what is tested: poll its answer
        assert not client.exists(name) and not client.exists(keys.holders(entry.hash))


def test_write_and_extend_refuses_unknown_ops():
    from cachefetch.fleet.expiry import horizon_ms, write_and_extend

    with pytest.raises(ValueError):
        write_and_extend(None, "k", "del", "x", when="1")
    with pytest.raises(ValueError):
        write_and_extend(None, "k", "sadd", "x", "y", when="1")
    with pytest.raises(ValueError):
        horizon_ms(math.nan)
    assert horizon_ms(math.inf) == horizon_ms(None) == "inf"
