#!/usr/bin/env python3
"""Three cachefetch hosts as one fleet (Redis) vs three independent caches
(cachefetch alone on each host, and nginx ``proxy_cache_lock on`` per host).

Everything runs on loopback: a redis-server (no persistence), three
``cachefetch serve`` hosts on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (2 workers
x 32 threads, each its own store), and an origin that answers after 1 s and
trickles 20 MiB over 2 s. Per setup:

1. the herd: 60 clients at once, spread round-robin over the three hosts,
   on one cold URL: upstream requests and body bytes the origin sent, the
   leader's time to first byte, and the others' (the fleet's remote
   followers: clients on the two hosts that did not lead);
2. a hit on a host that did not fetch: a second URL (4 MiB, from the same
   origin: 1 s, then 2 s of trickle) is fetched on host 1, then asked of
   host 2: in the fleet a peer fill then a local hit, alone a miss; then
   asked again there (a local hit either way).

Ratios are fleet / independent cachefetch in the same run; nginx's column is
skipped without nginx on PATH. Usage:
``python benchmarks/bench_fleet.py``. Writes ``benchmarks/results/fleet.md``
(and ``fleet.png`` with matplotlib, the ``bench`` extra).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the tests' fleet harness, not a copy

import report  # noqa: E402
from bench_proxy import Nginx, machine_busy, nginx_version  # noqa: E402
from fleet_harness import HOSTS, TrickleOrigin, fleet, get, herd, redis_server  # noqa: E402
from harness import wait_until  # noqa: E402
from report import Bar, cachefetch_revision, log, markdown_table  # noqa: E402

RESULTS_MD = os.path.join(HERE, "results", "fleet.md")
RESULTS_PNG = os.path.join(HERE, "results", "fleet.png")
BIG = 20 << 20
SMALL = 4 << 20
CLIENTS = 60


class _Listener:
    """What the harness's ``get`` needs of a server: its address."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port


@contextlib.contextmanager
def nginx_hosts(nginx: str, tmp: str, upstream: str):
    """Three nginx, each with its own proxy_cache (and cache lock). They listen
    on 127.0.0.1 (three ports): the benchmark's helpers wait for that address,
    and an independent cache does not care which loopback address it has."""
    servers = []
    try:
        for host in HOSTS:
            port = report.free_port()
            body = f"""\
    proxy_cache_path {tmp}/cache-{host} levels=1:2 keys_zone=z{port}:16m max_size=8g inactive=1d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        proxy_cache z{port};
        proxy_cache_valid 200 1d;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 600s;
        proxy_cache_lock_age 600s;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / {{ proxy_pass {upstream}; }}
    }}"""
            servers.append(Nginx(nginx, tmp, f"host-{host}", body, port, access_log=False))
            servers[-1].port = port
        yield [_Listener("127.0.0.1", s.port) for s in servers]
    finally:
        for server in servers:
            server.stop()


def run(kind: str) -> dict:
    """One setup's figures: ``kind`` is ``fleet``, ``alone`` (cachefetch) or ``nginx``."""
    body = os.urandom(BIG)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fleet-"))
        origin = stack.enter_context(TrickleOrigin(body, delay=1.0, spread=2.0))
        redis = stack.enter_context(redis_server(tmp))
        if kind == "nginx":
            hosts = stack.enter_context(nginx_hosts(shutil.which("nginx"), tmp, origin.url))
        else:
            hosts = stack.enter_context(fleet(tmp, origin.url, redis.url if kind == "fleet" else None))
        joined = kind == "fleet"
        results = herd(hosts, "/big.bin", CLIENTS)
        bad = [r for _, r in results if r is None or not r.complete or r.body != body]
        if bad:
            raise RuntimeError(f"{len(bad)} clients got a wrong or incomplete body")
        if kind == "nginx":  # no Cache-Status: the leader is the first to get a byte
            leaders = [min(results, key=lambda hr: hr[1].ttfb)]
        else:
            leaders = [(h, r) for h, r in results if "collapsed" not in r.headers.get("Cache-Status", "")]
        leader_host = leaders[0][0]
        herd_figures = dict(
            upstream_requests=origin.requests, upstream_bytes=origin.sent,
            leader_ttfb=min(r.ttfb for _, r in leaders),
            others_ttfb=[r.ttfb for h, r in results if h != leader_host])
        origin.body = os.urandom(SMALL)
        first = get(hosts[0], "/small.bin")
        assert first.body == origin.body
        if joined:
            wait_until(lambda: redis.client().keys("cachefetch:e:*"), what="publication")
            wait_until(lambda: len(redis.client().keys("cachefetch:h:*")) >= 2, what="publication")
        t0 = time.monotonic()
        second = get(hosts[1], "/small.bin")
        other_first = time.monotonic() - t0
        assert second.body == origin.body
        t0 = time.monotonic()
        third = get(hosts[1], "/small.bin")
        other_again = time.monotonic() - t0
        assert third.body == origin.body
        return dict(herd_figures, other_host_first=other_first, other_host_again=other_again,
                    upstream_requests_after=origin.requests)


def main() -> int:
    now = datetime.datetime.now(datetime.timezone.utc)
    busy = machine_busy()
    log("three independent caches ...")
    alone = run("alone")
    log("three hosts as one fleet ...")
    joined = run("fleet")
    nginx = shutil.which("nginx")
    if nginx:
        log("nginx on each host ...")
    per_host = run("nginx") if nginx else None
    rows = []

    def cell(value: float | None, unit: str) -> str:
        if value is None:
            return "n/a"
        return f"{value:.3f} s" if unit == "s" else f"{value:,.0f}"

    def row(label: str, pick, unit: str = "") -> None:
        a, j = pick(alone), pick(joined)
        n = pick(per_host) if per_host else None
        rows.append([label, cell(a, unit), cell(n, unit), cell(j, unit), f"{j / a:.2f}" if a else "n/a"])

    row("upstream requests (herd)", lambda f: f["upstream_requests"])
    row("upstream body bytes (herd)", lambda f: f["upstream_bytes"])
    row("leader TTFB", lambda f: f["leader_ttfb"], "s")
    row("other hosts' TTFB, median", lambda f: statistics.median(f["others_ttfb"]), "s")
    row("other hosts' TTFB, max", lambda f: max(f["others_ttfb"]), "s")
    row("host that did not fetch: first GET", lambda f: f["other_host_first"], "s")
    row("host that did not fetch: next GET", lambda f: f["other_host_again"], "s")
    table = markdown_table(["measure", "3 independent cachefetch", "nginx per host", "fleet of 3",
                            "fleet / independent cachefetch"], rows)
    remote_vs_leader = max(joined["others_ttfb"]) / joined["leader_ttfb"]
    bars = [Bar("upstream requests, fleet / independent", joined["upstream_requests"] / alone["upstream_requests"],
                goal=1 / 3, higher_is_better=False),
            Bar("remote followers' max TTFB / the leader's (fleet)", remote_vs_leader, goal=1.3,
                higher_is_better=False),
            Bar("first GET on a host that did not fetch, fleet / independent",
                joined["other_host_first"] / alone["other_host_first"], goal=1.0, higher_is_better=False)]
    header = ["# Fleet: three hosts through Redis vs three independent caches",
              "",
              f"- when: {now:%Y-%m-%d %H:%M} UTC; cachefetch {cachefetch_revision()}",
              f"- machine: {report.machine(now)}; {busy} (other work on the machine skews every time here)",
              f"- nginx: {nginx_version(nginx) + ', proxy_cache_lock on, one cache per host' if nginx else 'not on PATH: skipped'}",
              f"- herd: {CLIENTS} clients over 3 hosts, origin 1 s to first byte then 20 MiB over 2 s;"
              " a second URL of 4 MiB (the same origin: 1 s to first byte, 2 s of trickle) for the hit"
              " on a host that did not fetch"]
    report.write_results(RESULTS_MD, RESULTS_PNG, "cachefetch fleet vs independent caches", header, table, bars,
                         subtitle="one run; loopback, 2 workers x 32 threads per host", echo=True)
    return 0


if __name__ == "__main__":
    report.run_main(main)
