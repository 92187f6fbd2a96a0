#!/usr/bin/env python3
"""Benchmark the stale herd: one stale URL, 50 clients at once, an origin that
answers a revalidation with 304 after 1 s; cachefetch vs nginx. Prints Markdown.

Every server listens on 127.0.0.1 and nothing else is contacted. The origin
is a Python ``ThreadingHTTPServer`` in its own process: every answer waits
``DELAY`` s; a 200 carries a 4 MiB body, an ``ETag``, a ``Last-Modified`` and
``Cache-Control: max-age=2`` (with ``stale-while-revalidate=60`` on ``/swr/``
paths); a request whose ``If-None-Match`` names the ETag (or whose
``If-Modified-Since`` is the ``Last-Modified``) gets a 304. It counts what it
is asked and what it sends.

For each proxy and each of the two kinds of path: one GET stores the
response, the script waits until it is stale (2.6 s: the condition under
test), then 50 clients start together (a barrier) on fresh connections; the
script then waits until the origin has nothing in flight and at least
``DELAY + 1`` s have passed, so a background refresh is counted too. Measured:
upstream requests (how many conditional, how many 304), upstream body bytes,
client time to first byte (median, max), and whether every body is the
stored one.

The proxies (all with 2 workers; cachefetch 32 threads each):

- **cachefetch**: ``CacheFetch`` with the RFC 9111 defaults, under ``gunicorn
  -k gthread``, around :func:`make_app`'s forwarder (passes the conditional
  fields to the origin and its 304 back: what a revalidating proxy needs);
- **cachefetch serve**: the shipped proxy (``--protocol generic``), for
  reference;
- **nginx (lock)**: ``proxy_cache_revalidate on; proxy_cache_lock on;``;
- **nginx (stale updating)**: the same plus ``proxy_cache_background_update on;
  proxy_cache_use_stale updating;``, which serves stale while one request
  updates even when the response did not allow it (no ``stale-while-revalidate``).

nginx is Debian's (``apt-get install -y nginx-light``); without it on PATH its
columns are skipped with a note. Every process is stopped and every temp dir
removed at the end, also on errors, Ctrl-C and SIGTERM. The tables go to
``benchmarks/results/revalidate.md``, a chart of the ratios to
``benchmarks/results/revalidate.png`` (matplotlib, the ``bench`` extra).

Usage: ``python benchmarks/bench_revalidate.py [--clients N] [--no-nginx] [--no-serve]``
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
RESULTS_MD = os.path.join(HERE, "results", "revalidate.md")
RESULTS_PNG = os.path.join(HERE, "results", "revalidate.png")
sys.path.insert(0, HERE)

import blake3  # noqa: E402  (a cachefetch dependency: checks the bodies)

import report  # noqa: E402
from bench_proxy import (THREADS, WORKERS, CachefetchServe, Nginx, Proc, PythonOrigin, Section,  # noqa: E402
                         cache_header, clean_env, nginx_version, stop_all, wait_port)
from loadgen import all_at_once, fetch  # noqa: E402
from procstat import children, machine_busy  # noqa: E402
from report import HOST, Bar, cachefetch_revision, free_port, log  # noqa: E402

MiB = 1 << 20
BODY_SIZE = 4 * MiB
DELAY = 1.0
MAX_AGE = 2
# nginx keeps whole seconds and goes stale only past its expiry second: up
# to 1 s later than max-age says.
STALE_WAIT = MAX_AGE + 1.5
CLIENTS = 50
LAST_MODIFIED = formatdate(1717200000, usegmt=True)  # a fixed date in the past
MODES = ("strict", "swr")
CACHE_CONTROL = {"strict": f"max-age={MAX_AGE}", "swr": f"max-age={MAX_AGE}, stale-while-revalidate=60"}
# What a forwarder must not pass on (RFC 9110 §7.6.1), and what the WSGI server sets itself.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                         "upgrade", "server"})


# -- the origin (its own process) ------------------------------------------------------------

def body_of(path: str) -> bytes:
    """The origin's body for ``path``: BODY_SIZE bytes derived from the path."""
    return blake3.blake3(path.encode()).digest(length=BODY_SIZE)


def etag_of(path: str) -> str:
    return '"' + blake3.blake3(path.encode()).hexdigest()[:16] + '"'


class _OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bench-origin"
    record = ""

    def log_message(self, format, *args):  # noqa: A002  (quiet)
        pass

    def _log(self, line: str) -> None:
        with open(self.record, "a") as f:  # one write of one line: threads never interleave
            f.write(line + "\n")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        mode = path.split("/")[1] if path.count("/") >= 2 else ""
        if mode not in CACHE_CONTROL:
            self.send_error(404)
            return
        inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
        conditional = inm is not None or ims is not None
        self._log(f"start {path}")
        sent, status = 0, 200
        try:
            time.sleep(DELAY)  # the slow origin under test
            etag = etag_of(path)
            not_modified = (etag in inm) if inm is not None else (ims == LAST_MODIFIED)
            status = 304 if not_modified else 200
            self.send_response(status)
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", LAST_MODIFIED)
            self.send_header("Cache-Control", CACHE_CONTROL[mode])
            if status == 304:
                self.end_headers()
                return
            data = body_of(path)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            sent = len(data)
        finally:
            self._log(f"end {path} {status} {sent} {int(conditional)}")


def _origin_main(port: int, record: str, ready) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    handler = type("Handler", (_OriginHandler,), {"record": record})
    ThreadingHTTPServer.request_queue_size = 256
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((HOST, port), handler)
    ready.set()
    server.serve_forever()


@dataclass(frozen=True)
class Upstream:
    """What the origin was asked for one path, and what it sent."""

    requests: int
    conditional: int
    not_modified: int
    body_bytes: int
    in_flight: int


class Origin(PythonOrigin):
    """The revalidating origin in a forked process; it logs every request it starts and ends."""

    def __init__(self, workdir: str) -> None:  # not super().__init__(): that starts bench_proxy's origin
        self.name = "Python origin (revalidating)"
        self.port = free_port()
        self.record = os.path.join(workdir, "origin-requests.txt")
        open(self.record, "w").close()
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        self.proc = ctx.Process(target=_origin_main, args=(self.port, self.record, ready), daemon=True)
        self.proc.start()
        if not ready.wait(30):
            self.stop()
            raise RuntimeError("the origin did not start")
        wait_port(self.port, self.proc.is_alive, self.name)

    def seen(self, path: str) -> Upstream:
        """What the origin was asked for ``path`` so far, and what it sent."""
        starts = ends = conditional = not_modified = sent = 0
        with open(self.record) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 2 or fields[1] != path:
                    continue
                if fields[0] == "start":
                    starts += 1
                else:
                    ends += 1
                    not_modified += fields[2] == "304"
                    sent += int(fields[3])
                    conditional += fields[4] == "1"
        return Upstream(ends, conditional, not_modified, sent, starts - ends)


# -- cachefetch under gunicorn, around a forwarder that revalidates -------------------------

_FORWARDED = ("Accept", "If-None-Match", "If-Modified-Since")


def make_app():
    """The WSGI app gunicorn runs (``bench_revalidate:make_app()``): ``CacheFetch``
    with its RFC 9111 defaults around a forwarder to ``BENCH_ORIGIN``, on the
    store ``BENCH_STORE``."""
    from cachefetch import CacheFetch

    origin = os.environ["BENCH_ORIGIN"]

    def forward(environ: dict[str, Any], start_response) -> Iterable[bytes]:
        conn = http.client.HTTPConnection(HOST, int(origin), timeout=60)
        send = {name: environ[key] for name in _FORWARDED
                if (key := "HTTP_" + name.upper().replace("-", "_")) in environ}
        conn.request("GET", environ.get("PATH_INFO", "/"), headers=send)
        resp = conn.getresponse()
        start_response(f"{resp.status} {resp.reason}",
                       [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP])
        return _streamed(conn, resp)

    return CacheFetch(forward, store=os.environ["BENCH_STORE"])


def _streamed(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> Iterator[bytes]:
    try:
        while chunk := resp.read1(1 << 18):
            yield chunk
    finally:
        conn.close()


class CachefetchGunicorn(Proc):
    """``gunicorn -k gthread`` running :func:`make_app` on a fresh store."""

    def __init__(self, workdir: str, origin_port: int) -> None:
        self.name = "cachefetch (gunicorn)"
        self.port = free_port()
        store = tempfile.mkdtemp(prefix="store-gunicorn-", dir=workdir)
        pythonpath = os.pathsep.join(p for p in (REPO_ROOT, HERE, os.environ.get("PYTHONPATH")) if p)
        env = clean_env(PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1", BENCH_ORIGIN=str(origin_port),
                        BENCH_STORE=store)
        cmd = [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", str(WORKERS), "--threads", str(THREADS),
               "-b", f"{HOST}:{self.port}", "--graceful-timeout", "5", "bench_revalidate:make_app()"]
        log(f"starting {self.name}: {' '.join(cmd[1:])}")
        self.start_proc(cmd, os.path.join(workdir, "gunicorn.log"), env=env, cwd=workdir)
        try:
            wait_port(self.port, self.alive, self.name)
            deadline = time.monotonic() + 60
            while len(children(self.proc.pid)) < WORKERS:
                if not self.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: workers did not start")
                time.sleep(0.05)  # another process's children: nothing to block on
        except BaseException:
            self.stop()
            raise


# -- nginx: two configurations in one process --------------------------------------------------

def nginx_body(workdir: str, origin: int, lock_port: int, stale_port: int) -> str:
    common = f"""\
            proxy_pass http://reval_origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache reval;
            proxy_cache_revalidate on;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_cache_lock_age 60s;
            add_header X-Cache-Status $upstream_cache_status always;"""
    return f"""\
    proxy_cache_path {workdir}/nginx-cache levels=1:2 keys_zone=reval:8m max_size=1g inactive=1d use_temp_path=off;
    upstream reval_origin {{ server {HOST}:{origin}; keepalive 64; }}
    server {{
        listen {HOST}:{lock_port};
        location / {{
{common}
        }}
    }}
    server {{
        listen {HOST}:{stale_port};
        location / {{
{common}
            proxy_cache_background_update on;
            proxy_cache_use_stale updating;
        }}
    }}"""


# -- the herd -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Herd:
    """One stale herd through one proxy."""

    upstream: Upstream
    ttfbs: list[float]
    correct: int
    cache: dict[str, int]

    @property
    def median(self) -> float:
        return statistics.median(self.ttfbs)

    @property
    def max(self) -> float:
        return max(self.ttfbs)


def stale_herd(origin: Origin, port: int, path: str, clients: int) -> Herd:
    """Store ``path`` through the proxy on ``port``, let it go stale, then send the herd."""
    warm, _ = fetch(port, path)
    if warm.status != 200 or warm.size != BODY_SIZE:
        raise RuntimeError(f"warming {path} on {port}: {warm.status}, {warm.size} bytes")
    time.sleep(STALE_WAIT)  # the entry must be stale: time passing is the condition measured
    before = origin.seen(path)
    t0 = time.monotonic()
    results = all_at_once(clients, lambda i: fetch(port, path)[0], f"herd on {path}")
    expected = blake3.blake3(body_of(path)).hexdigest()
    deadline = time.monotonic() + 60
    while origin.seen(path).in_flight or time.monotonic() < t0 + DELAY + 1.0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the origin still serves {path} 60 s after the herd")
        time.sleep(0.05)  # another process's requests: nothing to block on
    after = origin.seen(path)
    if after.requests == before.requests:  # every proxy must ask the origin about a stale entry
        raise RuntimeError(f"the herd on {path} (port {port}) did not reach the origin: it was not stale yet")
    cache: dict[str, int] = {}
    for r in results:
        label = cache_header(r.headers)
        cache[label] = cache.get(label, 0) + 1
    return Herd(Upstream(after.requests - before.requests, after.conditional - before.conditional,
                         after.not_modified - before.not_modified, after.body_bytes - before.body_bytes, 0),
                [r.ttfb for r in results], sum(r.status == 200 and r.digest == expected for r in results), cache)


def ms(x: float) -> str:
    return f"{x * 1e3:,.0f} ms"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ratio_cell(a: float, b: float, goal: float | None) -> str:
    """``a ÷ b`` with two decimals (``both 0`` or ``∞`` where ``b`` is 0), and whether it meets ``goal``."""
    if not b:
        text, ok = ("both 0", True) if not a else ("∞", False)
    else:
        text, ok = f"{a / b:.2f}", a / b <= goal if goal is not None else None
    return text if goal is None else f"{text} ({report.met(ok)})"


def render(results: dict[str, dict[str, Herd]], clients: int, bars: list[Bar]) -> list[Section]:
    names = list(results)
    nginx_names = [n for n in names if n.startswith("nginx")]
    sections = []
    for mode in MODES:
        title = ("1. Stale herd, `max-age=2` (no stale-while-revalidate)" if mode == "strict"
                 else "2. Stale herd, `max-age=2, stale-while-revalidate=60`")
        sec = Section(title, ["measurement", *names, *(f"cachefetch ÷ {n}" for n in nginx_names)])
        if mode == "strict" and "nginx (stale updating)" in names:
            sec.notes.append("nginx (stale updating) answers this herd from the stale entry although the response "
                             "allowed no stale use (RFC 9111 §4.2.4): its TTFB is not the same service; cachefetch "
                             "and nginx (lock) wait for the 304")
        if nginx_names:
            sec.notes.append("goal: cachefetch costs the origin no more than nginx (ratio ≤ 1 for upstream requests "
                             "and bytes); TTFB ratios have none (lower is better for cachefetch)")
        herds = {n: results[n][mode] for n in names}
        metrics = [
            ("upstream requests", lambda h: h.upstream.requests, str, 1.0),
            ("upstream body bytes", lambda h: h.upstream.body_bytes, lambda v: f"{v / MiB:.1f} MiB", 1.0),
            ("client TTFB, median", lambda h: h.median, ms, None),
            ("client TTFB, max", lambda h: h.max, ms, None),
        ]
        for label, get, fmt, goal in metrics:
            cf = get(herds["cachefetch"])
            row = [label, *(fmt(get(herds[n])) for n in names)]
            for n in nginx_names:
                r = ratio(cf, get(herds[n]))
                row.append(ratio_cell(cf, get(herds[n]), goal))
                bars.append(Bar(f"{mode}: {label}, cachefetch ÷ {n} (↓)", report.finite(r), goal, False))
            sec.rows.append(row)
        sec.rows.append(["of which conditional / 304", *(f"{herds[n].upstream.conditional} / "
                                                         f"{herds[n].upstream.not_modified}" for n in names),
                         *("" for _ in nginx_names)])
        sec.rows.append([f"bodies identical to the origin's (of {clients})", *(str(herds[n].correct) for n in names),
                         *("" for _ in nginx_names)])
        for n in names:
            sec.notes.append(f"{n}: " + ", ".join(f"`{k or '(none)'}` × {v}" for k, v in sorted(herds[n].cache.items())))
        sections.append(sec)
    return sections


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=CLIENTS, help="clients in each herd")
    parser.add_argument("--no-nginx", action="store_true", help="act as if nginx were not installed")
    parser.add_argument("--no-serve", action="store_true", help="do not measure `cachefetch serve`")
    args = parser.parse_args()
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    report.interrupt_on(signal.SIGTERM)
    started = time.monotonic()
    nginx = None if args.no_nginx else shutil.which("nginx")
    notes = []
    if nginx is None:
        notes.append("nginx columns skipped: " + ("--no-nginx" if args.no_nginx else
                                                  "`nginx` is not on PATH (Debian: `apt-get install -y nginx-light`)"))
    revision = cachefetch_revision()
    busy_before = machine_busy()
    log(f"before the run: {busy_before}")
    workdir = tempfile.mkdtemp(prefix="cachefetch-bench-revalidate-")
    servers: list = []
    results: dict[str, dict[str, Herd]] = {}
    try:
        origin = Origin(workdir)
        servers.append(origin)
        ports = {}
        cf = CachefetchGunicorn(workdir, origin.port)
        servers.append(cf)
        ports["cachefetch"] = cf.port
        if not args.no_serve:
            serve = CachefetchServe(workdir, "revalidate", f"http://{HOST}:{origin.port}")
            servers.append(serve)
            ports["cachefetch serve"] = serve.port
        if nginx:
            lock_port, stale_port = free_port(), free_port()
            nx = Nginx(nginx, workdir, "revalidate", nginx_body(workdir, origin.port, lock_port, stale_port),
                       lock_port, access_log=False)
            servers.append(nx)
            wait_port(stale_port, nx.alive, nx.name)
            ports["nginx (lock)"] = lock_port
            ports["nginx (stale updating)"] = stale_port
        for name, port in ports.items():
            results[name] = {}
            for mode in MODES:
                path = f"/{mode}/{name.replace(' ', '-').replace('(', '').replace(')', '')}"
                herd = results[name][mode] = stale_herd(origin, port, path, args.clients)
                log(f"{name} {mode}: {herd.upstream}, TTFB median {ms(herd.median)}, max {ms(herd.max)}, "
                    f"{herd.correct}/{args.clients} bodies right, {herd.cache}")
    finally:
        stop_all(servers, workdir)
    elapsed = time.monotonic() - started
    busy_after = machine_busy()

    import gunicorn  # noqa: PLC0415  (only for its version)
    bars: list[Bar] = []
    sections = render(results, args.clients, bars)
    title = "Stale-herd revalidation benchmark"
    header = [
        f"# {title}",
        "",
        f"- {report.machine(datetime.datetime.now().astimezone())}; all on {HOST}",
        f"- origin: Python ThreadingHTTPServer (own process); every answer after {DELAY:g} s; a 200 is "
        f"{BODY_SIZE // MiB} MiB with ETag, Last-Modified and `max-age={MAX_AGE}`; a matching conditional gets a 304",
        f"- each herd: one GET stores the URL, {STALE_WAIT:g} s pass (it is stale), then {args.clients} clients start "
        "together, each on a fresh connection; TTFB is from each client's own start",
        f"- cachefetch: `CacheFetch` (RFC 9111 defaults) under gunicorn {gunicorn.__version__} "
        f"`-k gthread -w {WORKERS} --threads {THREADS}` around a forwarder that passes If-None-Match / "
        f"If-Modified-Since on and 304 back, at {revision}; a fresh store (fsync on)",
        "- cachefetch serve: `python -m cachefetch.cli serve --protocol generic` on a fresh store"
        if not args.no_serve else "- cachefetch serve: not measured",
        (f"- nginx {nginx_version(nginx)} (`worker_processes {WORKERS}`): **lock** = `proxy_cache_revalidate on; "
         "proxy_cache_lock on;` (lock timeout/age 60 s); **stale updating** = the same plus "
         "`proxy_cache_background_update on; proxy_cache_use_stale updating;`" if nginx else "- nginx: not measured"),
        f"- the origin, the clients and the proxies share the machine's {os.cpu_count()} CPUs, and other sessions "
        f"use them too: timings are noisy (before the run {busy_before}; after it {busy_after})",
        *(f"- {note}" for note in notes),
        f"- whole run: {elapsed:.0f} s",
    ]
    report.write_results(RESULTS_MD, RESULTS_PNG, title, header, "\n\n".join(s.render() for s in sections),
                         bars, echo=True,
                         subtitle=f"{args.clients} clients on one stale URL; {os.cpu_count()} shared CPUs; "
                                  f"{datetime.datetime.now().astimezone():%Y-%m-%d}")
    return 0


if __name__ == "__main__":
    report.run_main(main)
