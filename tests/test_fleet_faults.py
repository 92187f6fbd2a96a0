"""Faults of a fleet, with real processes: the leader host SIGKILLed before
its first byte and mid-body, redis-server SIGKILLed mid-herd and restarted.
In each case no client gets a wrong complete body, the stores verify clean,
and the next request is right."""
from __future__ import annotations

import os


from cachefetch.hashing import hash_bytes
from fleet_harness import (requires_redis, TrickleOrigin, fleet, get, kill_host, lease_host, metric, redis_server,
                           start_herd)
from harness import run_cli, wait_until

pytestmark = requires_redis

LEASE = ("--fleet-lease-ms", "1000")


def _no_wrong_body(results, body: bytes) -> None:
    for _, r in results:
        if r is not None and r.complete:
            assert r.status == 200 and r.body == body


def _verify(hosts) -> None:
    for host in hosts:
        done = run_cli("verify", "--store", host.extra["store"])
        assert done.returncode == 0, done.stdout + done.stderr


def _next_requests_right(survivors, path: str, body: bytes, origin) -> None:
    """The next request on each survivor is right, two upstream fetches in all
    (the dead leader's and one more), and the survivors' stores verify clean."""
    for host in survivors:
        again = get(host, path)
        assert again.status == 200 and again.complete and again.body == body
    assert origin.requests == 2
    _verify(survivors)


def _leader_of(hosts, redis):
    url = wait_until(lambda: lease_host(redis), what="a host to take the lease")
    return next(h for h in hosts if h.url == url)


def test_leader_host_killed_before_its_first_byte_a_survivor_leads(tmp_path):
    body = os.urandom(2 << 20)
    with TrickleOrigin(body, delay=2.0, spread=0.5) as origin, redis_server(tmp_path) as redis, \
            fleet(tmp_path, origin.url, redis.url, *LEASE) as hosts:
        join = start_herd(hosts, "/cold.bin", 12)
        leader = _leader_of(hosts, redis)
        survivors = [h for h in hosts if h is not leader]
        wait_until(lambda: origin.requests == 1 and all(
            metric(h, "cachefetch_fleet_remote_followers_total") >= 1 for h in survivors),
            what="followers on the other hosts")
        kill_host(leader)
        results = join()
        _no_wrong_body(results, body)
        on_survivors = [r for h, r in results if hosts[h] is not leader]
        assert len(on_survivors) == 8 and all(r is not None and r.complete for r in on_survivors)
        assert origin.requests == 2  # the dead leader's fetch, and the survivor's
        assert sum(metric(h, "cachefetch_fleet_lease_takeovers_total") for h in survivors) == 1
        _next_requests_right(survivors, "/cold.bin", body, origin)


def test_leader_host_killed_mid_body_cuts_remote_followers_never_a_wrong_body(tmp_path):
    body = os.urandom(8 << 20)
    with TrickleOrigin(body, delay=0.2, spread=3.0) as origin, redis_server(tmp_path) as redis, \
            fleet(tmp_path, origin.url, redis.url, *LEASE) as hosts:
        join = start_herd(hosts, "/cut.bin", 12)
        leader = _leader_of(hosts, redis)
        survivors = [h for h in hosts if h is not leader]
        wait_until(lambda: origin.sent >= len(body) // 3, what="a third of the body to be sent")
        kill_host(leader)
        results = join()
        _no_wrong_body(results, body)
        cut = [r for h, r in results if hosts[h] is not leader and r is not None and not r.complete]
        assert cut, "the remote followers mid-body must be cut, not completed"
        assert all(len(r.body) < len(body) for r in cut)
        _next_requests_right(survivors, "/cut.bin", body, origin)  # one of them fetches again


def test_redis_killed_mid_herd_hosts_serve_alone_then_rejoin(tmp_path):
    body = os.urandom(2 << 20)
    with TrickleOrigin(body, delay=1.0, spread=0.5) as origin, redis_server(tmp_path) as redis, \
            fleet(tmp_path, origin.url, redis.url, *LEASE) as hosts:
        join = start_herd(hosts, "/during.bin", 12)
        wait_until(lambda: origin.requests >= 1, what="the fetch to start")
        redis.kill()
        results = join()
        assert all(r is not None and r.complete and r.body == body for _, r in results)
        assert 1 <= origin.requests <= 3  # coalesced per host at worst
        for host in hosts:  # every host keeps serving its own hits
            assert "hit" in get(host, "/during.bin").headers["Cache-Status"]
        assert all(metric(h, "cachefetch_fleet_redis_errors_total") >= 1 for h in hosts)
        redis.start()  # empty: it kept nothing
        # Rejoining: the next request on each host republishes what it holds.
        wait_until(lambda: all("hit" in get(h, "/during.bin").headers["Cache-Status"] for h in hosts)
                   and redis.client().scard(f"cachefetch:h:{hash_bytes(body).hex}") == 3,
                   what="every host to republish its entries")
        fresh = os.urandom(1 << 20)
        origin.body = fresh
        assert get(hosts[0], "/after.bin").body == fresh
        wait_until(lambda: redis.client().scard(f"cachefetch:h:{hash_bytes(fresh).hex}"), what="the publication")
        before = origin.requests
        assert get(hosts[2], "/after.bin").body == fresh  # a hit through the fleet again
        assert origin.requests == before
        for host in hosts:
            warnings = host.log().count("serving from this host alone")
            assert 1 <= warnings <= 2  # once a minute per worker, not once per request
    _verify(hosts)
