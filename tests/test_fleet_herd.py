"""One upstream fetch for a herd spread over three hosts (real processes)."""
from __future__ import annotations

import os


from cachefetch.hashing import hash_bytes
from fleet_harness import requires_redis, TrickleOrigin, fleet, get, herd, metric, redis_server
from harness import run_cli, wait_until

pytestmark = requires_redis


def test_a_herd_over_three_hosts_makes_one_upstream_fetch_and_remote_followers_stream(tmp_path):
    body = os.urandom(20 << 20)
    with TrickleOrigin(body, delay=1.0, spread=2.0) as origin, redis_server(tmp_path) as redis, \
            fleet(tmp_path, origin.url, redis.url) as hosts:
        results = herd(hosts, "/big.bin", 60)
        assert origin.requests == 1
        assert all(r.status == 200 and r.complete and r.body == body for _, r in results)
        leaders = [(h, r) for h, r in results if "collapsed" not in r.headers.get("Cache-Status", "")]
        assert len(leaders) == 1, [r.headers.get("Cache-Status") for _, r in results]
        leader_host, leader = leaders[0]
        remote = [r.ttfb for h, r in results if h != leader_host]
        assert len(remote) == 40
        slow = [(h, r.ttfb, r.headers.get("Cache-Status")) for h, r in results if h != leader_host
                and r.ttfb > 1.3 * leader.ttfb]
        assert max(remote) <= 1.3 * leader.ttfb, (leader_host, leader.ttfb, slow)
        followed = sum(metric(h, "cachefetch_fleet_remote_followers_total") for h in hosts)
        # Counted when a request finds another host's lease; one that arrives as the flight ends does not.
        assert 30 <= followed <= 60
        holders = f"cachefetch:h:{hash_bytes(body).hex}"
        wait_until(lambda: redis.client().scard(holders) == 3, what="every host to hold the blob")
        for host in hosts:
            again = get(host, "/big.bin")
            assert again.body == body and "hit" in again.headers["Cache-Status"]
        assert origin.requests == 1
    for host in hosts:
        assert run_cli("verify", "--store", host.extra["store"]).returncode == 0
