#!/usr/bin/env python3
"""Benchmark ``cachefetch serve`` against a direct fetch and nginx; print Markdown tables.

Every server listens on 127.0.0.1 and nothing else is contacted. Every
number is measured in the same run:

1. cold 100 MiB: throughput of ``cachefetch serve`` (generic protocol, a
   fresh store, default fsync) fetching a 100 MiB file it has never seen from
   a local origin, vs the same origin fetched directly (goal: ratio >= 0.75),
   and vs nginx ``proxy_cache`` with ``proxy_cache_lock on`` (goal: >= 1.0;
   the order of the three reverses every other repetition). Each repetition
   fetches a different random file, so every fetch is a true miss. The origin
   is nginx serving static files when nginx is on PATH, else a Python
   ``ThreadingHTTPServer`` (``sendfile``); the client is curl when on PATH,
   else ``http.client``.
2. the herd: 50 clients started together on one cold URL of a Python origin
   that waits 1 s, then trickles 20 MiB over 2 s (it counts its requests):
   upstream requests, leader and median/max follower time to first byte,
   total time, for cachefetch and for nginx (``proxy_cache_lock on``, a large
   ``proxy_cache_lock_timeout``/``_age``, ``proxy_buffering on``).
3. warm hits: requests/s for a cached 4 KiB file and MiB/s for a cached
   100 MiB file, cachefetch vs nginx, with ``wrk`` when on PATH, else a
   Python load generator.
4. a slow leader (issue 8): a client reading 100 kB/s asks first for a cold
   50 MiB file the origin sends as fast as it can, then five fast clients ask
   for it together: each follower's time to its last byte vs the origin's own
   time for one direct fetch (goal: <= 1.5x), for cachefetch and for nginx.

cachefetch runs as ``python -m cachefetch.cli serve --workers 2 --threads 32``
and nginx with ``worker_processes 2``; the script writes nginx's config into a
temp dir and starts it with ``-p prefix -c conf -g 'daemon off;'``. Without
nginx on PATH (Debian package ``nginx``) its rows are skipped with a note.
Every process is stopped and every temp dir removed at the end, also on
errors, Ctrl-C and SIGTERM. The tables are also written to
``benchmarks/results/proxy.md``, and a chart of the ratios to
``benchmarks/results/proxy.png`` (matplotlib, the ``bench`` extra; skipped
with a note when it is missing).

Usage: ``python benchmarks/bench_proxy.py [--quick] [--no-nginx] [--no-wrk] [--no-curl] [--only SECTION]``
(``--only`` runs one section and prints it, leaving ``benchmarks/results/`` alone)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
RESULTS_MD = os.path.join(HERE, "results", "proxy.md")
RESULTS_PNG = os.path.join(HERE, "results", "proxy.png")
sys.path.insert(0, HERE)

import blake3  # noqa: E402  (a cachefetch dependency: checks the herd's bodies)

import loadgen  # noqa: E402
import report  # noqa: E402
from loadgen import Fetched, Load, LoadGenerator, fetch  # noqa: E402
from procstat import CLK_TCK, children, machine_busy, proc_cpu  # noqa: E402
from report import HOST, Bar, cachefetch_revision, free_port, log, markdown_table, met  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
WORKERS, THREADS = 2, 32
COLD_SIZE = 100 * MiB
SMALL_SIZE = 4 * KiB
HERD_CLIENTS = 50
HERD_DELAY, HERD_SIZE, HERD_SPREAD, HERD_PIECES = 1.0, 20 * MiB, 2.0, 40
PACE_SIZE, PACE_FOLLOWERS = 50 * MiB, 5
PACE_PIECE, PACE_PAUSE = 10_000, 0.1  # the slow leader reads 100 kB/s
PACE_GOAL = 1.5  # issue 8: followers within 1.5x the upstream's own time
COLD_GOAL = 0.75
NGINX_COLD_GOAL = 1.0  # issue 10
HERD_GOAL = 1.2  # median follower TTFB ÷ leader TTFB, as in the middleware's herd test
_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def wait_port(port: int, alive, what: str, timeout: float = 60.0) -> None:
    """Return once ``port`` accepts; fail if ``alive()`` turns false first."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise RuntimeError(f"{what} exited before listening on {port}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: nothing listened on {port} within {timeout:g} s") from None
            time.sleep(0.05)  # another process's port: nothing to block on


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env.update(extra)
    return env


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# -- processes ---------------------------------------------------------------------------

class Proc:
    """A server in its own session, stopped by its pid (and its process group)."""

    name = "server"
    proc: subprocess.Popen

    def start_proc(self, cmd: list[str], log_path: str, env: dict[str, str] | None = None,
                   cwd: str | None = None) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=cwd, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def workers(self) -> list[int]:
        return children(self.proc.pid)

    def cpu_seconds(self) -> float:
        return sum(proc_cpu(pid) for pid in self.workers())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> None:
        proc = getattr(self, "proc", None)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Anything of its own session left behind (a worker whose master died).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class CachefetchServe(Proc):
    """``python -m cachefetch.cli serve --upstream URL`` on a fresh store."""

    def __init__(self, workdir: str, name: str, upstream: str, extra: Sequence[str] = ()) -> None:
        self.name = f"cachefetch ({name})"
        self.port = free_port()
        self.store = tempfile.mkdtemp(prefix=f"store-{name}-", dir=workdir)
        pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
        env = clean_env(PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "cachefetch.cli", "serve", "--upstream", upstream, "--store", self.store,
               "--bind", f"{HOST}:{self.port}", "--workers", str(WORKERS), "--threads", str(THREADS),
               "--default-ttl", "forever", *extra]  # the origin stands for an immutable file server
        log(f"starting {self.name}: {' '.join(cmd[1:])}")
        self.start_proc(cmd, os.path.join(workdir, f"serve-{name}.log"), env=env, cwd=workdir)
        try:
            wait_port(self.port, self.alive, self.name)
            deadline = time.monotonic() + 60
            while len(self.workers()) < WORKERS:
                if not self.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: workers did not start:\n{tail(self.log_path)}")
                time.sleep(0.05)
            for _ in range(4 * WORKERS):  # new connections: every worker loads the app
                status, _ = head(self.port, "/-/healthz", method="GET")
                if status != 200:
                    raise RuntimeError(f"{self.name}: /-/healthz answered {status}:\n{tail(self.log_path)}")
        except BaseException:
            self.stop()
            raise


def stop_all(servers: list, workdir: str) -> None:
    """Stop ``servers`` (last started first; one that fails to stop is logged and
    the others still stopped), forget them, then remove ``workdir``."""
    for server in reversed(servers):
        try:
            server.stop()
        except Exception as exc:  # go on stopping the others
            log(f"stopping {getattr(server, 'name', server)} failed: {exc!r}")
    servers.clear()
    shutil.rmtree(workdir, ignore_errors=True)


def nginx_version(nginx: str) -> str:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


_NGINX_CONF = """\
{user}worker_processes {workers};
pid {prefix}/nginx.pid;
lock_file {prefix}/nginx.lock;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {access_log};
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
{body}
}}
"""


class Nginx(Proc):
    """nginx with a config of our own, in a temp prefix, in the foreground."""

    def __init__(self, nginx: str, workdir: str, name: str, body: str, port: int, access_log: bool) -> None:
        self.name = f"nginx ({name})"
        self.port = port
        self.prefix = tempfile.mkdtemp(prefix=f"nginx-{name}-", dir=workdir)
        conf = os.path.join(self.prefix, "nginx.conf")
        # As root, nginx's workers would switch to "nobody", which cannot enter
        # a 0700 temp dir; as another user the directive is ignored (with a warning).
        user = "user root;\n" if os.geteuid() == 0 else ""
        with open(conf, "w") as f:
            f.write(_NGINX_CONF.format(user=user, workers=WORKERS, prefix=self.prefix, body=body,
                                       access_log=f"{self.prefix}/access.log" if access_log else "off"))
        cmd = [nginx, "-e", os.path.join(self.prefix, "error.log"), "-p", self.prefix + "/", "-c", conf,
               "-g", "daemon off;"]
        log(f"starting {self.name} on port {port}")
        self.start_proc(cmd, os.path.join(self.prefix, "stdout.log"), env=clean_env())
        try:
            wait_port(self.port, self.alive, self.name)
        except BaseException:
            log(tail(os.path.join(self.prefix, "error.log")) + tail(self.log_path))
            self.stop()
            raise


def nginx_proxy_body(workdir: str, port: int, origin_port: int, trickle_port: int) -> str:
    """The ``http`` block's server for nginx as the cache under test: ``proxy_cache``
    with the lock, ``/herd/`` from the trickling origin, the rest from the static one."""
    return f"""\
    proxy_cache_path {workdir}/nginx-cache levels=1:2 keys_zone=bench:16m max_size=8g inactive=1d
                     use_temp_path=off;
    server {{
        listen {HOST}:{port};
        proxy_cache bench;
        proxy_cache_valid 200 1d;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 600s;
        proxy_cache_lock_age 600s;
        proxy_buffering on;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        add_header X-Cache-Status $upstream_cache_status always;
        location /herd/ {{ proxy_pass http://{HOST}:{trickle_port}; }}
        location / {{ proxy_pass http://{HOST}:{origin_port}; }}
    }}"""


# -- Python origins (their own processes: no GIL shared with the clients) ---------------------

def herd_body(path: str) -> bytes:
    """The trickling origin's body for ``path``: HERD_SIZE bytes derived from the path."""
    return blake3.blake3(path.encode()).digest(length=HERD_SIZE)


class _OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bench-origin"
    kind = "static"
    root = ""
    record = ""

    def log_message(self, format, *args):  # noqa: A002  (quiet)
        pass

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)

    def _answer(self, body: bool) -> None:
        path = urlsplit(self.path).path
        with open(self.record, "a") as f:
            f.write(f"{self.command} {path}\n")
        if self.kind == "trickle":
            return self._trickle(path, body)
        name = os.path.basename(path)
        full = os.path.join(self.root, name)
        if not name or name.startswith(".") or not os.path.isfile(full):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with open(full, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if body:
                self.connection.sendfile(f)

    def _trickle(self, path: str, body: bool) -> None:
        if not path.startswith("/herd/"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = herd_body(path)
        if body:
            time.sleep(HERD_DELAY)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        piece = len(data) // HERD_PIECES
        t0 = time.monotonic()
        for i in range(HERD_PIECES):
            end = len(data) if i == HERD_PIECES - 1 else (i + 1) * piece
            self.wfile.write(data[i * piece:end])
            pause = t0 + (i + 1) * HERD_SPREAD / HERD_PIECES - time.monotonic()
            if pause > 0:
                time.sleep(pause)


def _origin_main(kind: str, port: int, root: str, record: str, ready) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler
    handler = type("Handler", (_OriginHandler,), {"kind": kind, "root": root, "record": record})
    ThreadingHTTPServer.request_queue_size = 256
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((HOST, port), handler)
    ready.set()
    server.serve_forever()


class PythonOrigin:
    """A ``ThreadingHTTPServer`` in a forked process: static files (``sendfile``) or the trickle."""

    def __init__(self, workdir: str, kind: str, root: str = "") -> None:
        self.name = f"Python origin ({kind})"
        self.port = free_port()
        self.record = os.path.join(workdir, f"origin-{kind}-requests.txt")
        open(self.record, "w").close()
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        self.proc = ctx.Process(target=_origin_main, args=(kind, self.port, root, self.record, ready), daemon=True)
        self.proc.start()
        if not ready.wait(30):
            self.stop()
            raise RuntimeError(f"{self.name} did not start")
        wait_port(self.port, self.proc.is_alive, self.name)

    def requests(self, path: str, method: str = "GET") -> int:
        with open(self.record) as f:
            return sum(1 for line in f if line.strip() == f"{method} {path}")

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


# -- clients -----------------------------------------------------------------------------

def head(port: int, path: str, method: str = "HEAD") -> tuple[int, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.headers
    finally:
        conn.close()


def wait_hit(port: int, path: str, what: str, timeout: float = 120) -> float:
    """Seconds until a HEAD of ``path`` is answered from the cache (cachefetch's or nginx's)."""
    t0 = time.monotonic()
    while True:
        status, headers = head(port, path)
        cache = cache_header(headers)
        if status == 200 and (cache.startswith("cachefetch; hit") or cache == "HIT"):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: {path} is not cached after {timeout:g} s ({status}, {cache!r})")
        time.sleep(0.02)  # another process's commit: nothing here to wait on


def wait_hit_or_fail(port: int, path: str, what: str, timeout: float = 120) -> float:
    """GET ``path`` once (a miss that stores it), then :func:`wait_hit`."""
    status, _ = head(port, path, method="GET")
    if status != 200:
        raise RuntimeError(f"{what}: GET {path} answered {status}")
    return wait_hit(port, path, what, timeout)


@dataclass
class Download:
    status: int
    size: int
    seconds: float
    cache: str  # Cache-Status or X-Cache-Status

    @property
    def rate(self) -> float:
        return self.size / self.seconds


def cache_header(headers) -> str:
    return headers.get("Cache-Status") or headers.get("X-Cache-Status") or ""


class Downloader:
    """One GET of a whole body on a fresh connection, timed: curl, else http.client."""

    def __init__(self, use_curl: bool, workdir: str) -> None:
        self.curl = shutil.which("curl") if use_curl else None
        self.headers_file = os.path.join(workdir, "curl-headers.txt")
        if self.curl:
            version = subprocess.run([self.curl, "--version"], capture_output=True, text=True).stdout.split()[:2]
            self.describe = (f"`{' '.join(version)}` (`-s -o /dev/null -w '%{{time_total}} %{{size_download}}'`, "
                             "a fresh connection per fetch)")
        else:
            self.describe = "Python http.client (1 MiB reads into one buffer; curl not on PATH)"

    def get(self, port: int, path: str) -> Download:
        url = f"http://{HOST}:{port}{path}"
        if self.curl:
            out = subprocess.run([self.curl, "-s", "-S", "--noproxy", "*", "-o", "/dev/null", "-D", self.headers_file,
                                  "-w", "%{http_code} %{time_total} %{size_download}", url],
                                 capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"curl {url} failed ({out.returncode}): {out.stderr.strip()}")
            status, secs, size = out.stdout.split()
            with open(self.headers_file, "rb") as f:
                msg = http.client.parse_headers(_Lines(f.read().split(b"\r\n", 1)[-1]))
            return Download(int(status), int(size), float(secs), cache_header(msg))
        status, size, secs, headers = loadgen.pull(port, path)
        return Download(status, size, secs, cache_header(headers))


def timed_body(port: int, path: str) -> tuple[int, int, float]:
    """One GET on a fresh connection, the body read 1 MiB at a time into one
    buffer: ``(status, bytes, seconds from the request to the last byte)``."""
    return loadgen.pull(port, path)[:3]


class SlowReader:
    """A client that asks for ``path`` and reads :data:`PACE_PIECE` bytes every
    :data:`PACE_PAUSE` seconds (its pace is the point: the pauses are timed on purpose)."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=300)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        self.received = 0
        self._head = bytearray()
        self._has_head = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self.sock.recv(PACE_PIECE)
                if not data:
                    break
                self.received += len(data)
                if not self._has_head.is_set():
                    self._head += data
                    if b"\r\n\r\n" in self._head:
                        self._has_head.set()
                self._stop.wait(PACE_PAUSE)
        except OSError:
            pass
        finally:
            self._has_head.set()

    def wait_head(self, timeout: float = 60) -> None:
        """Return once the response head has come (so this client leads the fetch)."""
        if not self._has_head.wait(timeout) or b"\r\n\r\n" not in self._head:
            raise RuntimeError("the slow leader got no response head")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(10)


class _Lines:
    """A minimal file for ``http.client.parse_headers``."""

    def __init__(self, data: bytes) -> None:
        self._lines = iter(data.splitlines(keepends=True) + [b"\r\n"])

    def readline(self, limit: int = -1) -> bytes:
        return next(self._lines, b"")


# -- formatting --------------------------------------------------------------------------

def mibps(x: float) -> str:
    return f"{x / MiB:,.0f} MiB/s"


def ms(x: float) -> str:
    return f"{x * 1e3:,.0f} ms"


def ratio_text(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"


def safe_div(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        out = [f"## {self.title}", "", markdown_table(self.header, self.rows)]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)


# -- the benchmark -----------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.nginx = None if args.no_nginx else shutil.which("nginx")
        self.notes: list[str] = []
        if self.nginx is None:
            why = "--no-nginx" if args.no_nginx else "`nginx` is not on PATH (Debian: `apt-get install -y nginx`)"
            self.notes.append(f"nginx rows skipped: {why}; the origin is a Python ThreadingHTTPServer (sendfile)")
        self.workdir = tempfile.mkdtemp(prefix="cachefetch-bench-proxy-")
        self.files = os.path.join(self.workdir, "origin-files")
        os.mkdir(self.files)
        self.servers: list = []
        self.load = LoadGenerator(not args.no_wrk, wrk_options=["--timeout", "30s"], env=clean_env())
        self.client = Downloader(not args.no_curl, self.workdir)
        self.reps = 2 if self.quick else 5
        self.bars: list[Bar] = []

    def keep(self, server):
        self.servers.append(server)
        return server

    def stop(self, server) -> None:
        server.stop()
        self.servers.remove(server)

    def close(self) -> None:
        stop_all(self.servers, self.workdir)

    # set-up ------------------------------------------------------------------------------

    def setup(self) -> None:
        log(f"writing {self.reps} random {COLD_SIZE // MiB} MiB files and one of {SMALL_SIZE // KiB} KiB "
            f"under {self.workdir}")
        for r in range(self.reps):
            with open(os.path.join(self.files, f"cold-{r}.bin"), "wb") as f:
                for _ in range(COLD_SIZE // MiB):
                    f.write(os.urandom(MiB))
        with open(os.path.join(self.files, "small.bin"), "wb") as f:
            f.write(os.urandom(SMALL_SIZE))
        # The origin's files written back before any proxy writes its own: their writeback
        # would otherwise compete with whichever proxy runs first.
        os.sync()
        self.trickle = self.keep(PythonOrigin(self.workdir, "trickle"))
        if self.nginx:
            port = free_port()
            body = f"    server {{\n        listen {HOST}:{port};\n        root {self.files};\n    }}"
            self.origin = self.keep(Nginx(self.nginx, self.workdir, "origin", body, port, access_log=False))
            self.origin_desc = f"nginx {nginx_version(self.nginx)} serving static files (sendfile on)"
            port = free_port()
            body = nginx_proxy_body(self.workdir, port, self.origin.port, self.trickle.port)
            self.proxy = self.keep(Nginx(self.nginx, self.workdir, "proxy", body, port, access_log=True))
        else:
            self.origin = self.keep(PythonOrigin(self.workdir, "static", self.files))
            self.origin_desc = "Python ThreadingHTTPServer serving static files (socket.sendfile)"
            self.proxy = None
        self.cf = self.keep(CachefetchServe(self.workdir, "origin", f"http://{HOST}:{self.origin.port}"))

    def wait_hit(self, port: int, path: str, what: str, timeout: float = 120) -> float:
        """Seconds until a HEAD of ``path`` is answered from the cache."""
        return wait_hit(port, path, what, timeout)

    # 1 -----------------------------------------------------------------------------------

    def cold(self) -> Section:
        modes = ["direct", "cachefetch"] + (["nginx"] if self.proxy else [])
        ports = {"direct": self.origin.port, "cachefetch": self.cf.port}
        if self.proxy:
            ports["nginx"] = self.proxy.port
        servers = {"cachefetch": self.cf, "nginx": self.proxy}
        runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}  # (bytes/s, cpu s, commit s)
        self.client.get(self.origin.port, "/small.bin")  # warm the client binary and the origin
        for r in range(self.reps):
            path = f"/cold-{r}.bin"
            for mode in (modes if r % 2 == 0 else modes[::-1]):  # interleaved, order alternated: drift hits all alike
                server = servers.get(mode)
                cpu0 = server.cpu_seconds() if server else 0.0
                d = self.client.get(ports[mode], path)
                if d.status != 200 or d.size != COLD_SIZE:
                    raise RuntimeError(f"cold {mode} {path}: status {d.status}, {d.size} bytes")
                if mode == "cachefetch" and not d.cache.endswith("stored"):
                    raise RuntimeError(f"cold cachefetch {path} was not a stored miss: {d.cache!r}")
                if mode == "nginx" and d.cache != "MISS":
                    raise RuntimeError(f"cold nginx {path} was not a miss: {d.cache!r}")
                commit = self.wait_hit(ports[mode], path, mode) if server else 0.0
                cpu = server.cpu_seconds() - cpu0 if server else 0.0
                runs[mode].append((d.rate, cpu, commit))
                log(f"cold {path} {mode}: {mibps(d.rate)} ({d.seconds:.3f} s)"
                    + (f", server CPU {cpu:.2f} s, cached {commit:.2f} s after the body" if server else ""))

        def med(mode: str, i: int) -> float:
            return statistics.median(run[i] for run in runs[mode])

        def spread(mode: str) -> str:
            rates = [run[0] / MiB for run in runs[mode]]
            return f"runs {min(rates):,.0f}–{max(rates):,.0f}"

        direct, cf = med("direct", 0), med("cachefetch", 0)
        how = f"median of {self.reps}, each a different random file; {spread('cachefetch')}"
        sec = Section(f"1. Cold {COLD_SIZE // MiB} MiB: throughput through the proxy (a fresh miss)",
                      ["measurement", "cachefetch", "baseline", "ratio", "goal", "met"])
        r1 = safe_div(cf, direct)
        cf_cell = (f"{mibps(cf)} ({how}); server CPU {med('cachefetch', 1):.2f} s per fetch; "
                   f"a hit {med('cachefetch', 2) * 1e3:.0f} ms after the body ended (fsync)")
        sec.rows.append(["cachefetch ÷ direct from the origin", cf_cell,
                         f"direct: {mibps(direct)} (median of {self.reps}; {spread('direct')})", ratio_text(r1),
                         f"≥ {COLD_GOAL}",
                         met(r1 >= COLD_GOAL)])
        self.bars.append(Bar("cold 100 MiB: cachefetch ÷ direct (↑)", r1, COLD_GOAL))
        if self.proxy:
            nx = med("nginx", 0)
            r2 = safe_div(cf, nx)
            sec.rows.append(["cachefetch ÷ nginx `proxy_cache` (lock on)", f"{mibps(cf)}",
                             f"nginx: {mibps(nx)} (median of {self.reps}; {spread('nginx')}); "
                             f"worker CPU {med('nginx', 1):.2f} s per fetch", ratio_text(r2),
                             f"≥ {NGINX_COLD_GOAL}", met(r2 >= NGINX_COLD_GOAL)])
            self.bars.append(Bar("cold 100 MiB: cachefetch ÷ nginx (↑)", r2, NGINX_COLD_GOAL))
        else:
            sec.rows.append(["cachefetch ÷ nginx `proxy_cache` (lock on)", f"{mibps(cf)}",
                             "skipped: nginx is not on PATH", "–", f"≥ {NGINX_COLD_GOAL}", "skipped"])
        sec.notes.append(f"origin: {self.origin_desc}; client: {self.client.describe}")
        sec.notes.append("server CPU = utime+stime of the proxy's worker processes from the request until the "
                         "entry is a hit (CPU tick 10 ms)" if CLK_TCK == 100 else
                         "server CPU = utime+stime of the proxy's worker processes")
        return sec

    # 2 -----------------------------------------------------------------------------------

    def herd_once(self, name: str, port: int, path: str) -> dict:
        expected = blake3.blake3(herd_body(path)).hexdigest()
        fetched: list[Fetched] = loadgen.all_at_once(HERD_CLIENTS, lambda i: fetch(port, path)[0], f"herd {name}")
        caches = [cache_header(r.headers) for r in fetched]
        if name == "cachefetch":
            leaders = [r for r, c in zip(fetched, caches) if c.endswith("stored")]
            followers = [r for r, c in zip(fetched, caches) if "collapsed" in c]
        else:
            leaders = [r for r, c in zip(fetched, caches) if c == "MISS"]
            followers = [r for r, c in zip(fetched, caches) if c == "HIT"]
        start = min(r.start for r in fetched)
        out = {
            "upstream": self.trickle.requests(path),
            "good": sum(1 for r in fetched if r.status == 200 and r.digest == expected),
            "leaders": len(leaders),
            "followers": len(followers),
            "leader": leaders[0].ttfb if len(leaders) == 1 else float("nan"),
            "median": statistics.median(r.ttfb for r in followers) if followers else float("nan"),
            "max": max(r.ttfb for r in followers) if followers else float("nan"),
            "total": max(r.end for r in fetched) - start,
            "statuses": sorted(set(caches)),
        }
        log(f"herd {name}: {out['upstream']} upstream requests, {out['leaders']} leader(s) TTFB "
            f"{out['leader']:.3f} s, {out['followers']} followers median {out['median']:.3f} s max "
            f"{out['max']:.3f} s, total {out['total']:.2f} s, {out['good']}/{HERD_CLIENTS} bodies right, "
            f"cache statuses {out['statuses']}")
        return out

    def herd(self) -> Section:
        cf_server = self.keep(CachefetchServe(self.workdir, "herd", f"http://{HOST}:{self.trickle.port}"))
        try:
            res = {"cachefetch": self.herd_once("cachefetch", cf_server.port, "/herd/cachefetch.bin")}
        finally:
            self.stop(cf_server)
        if self.proxy:
            res["nginx"] = self.herd_once("nginx", self.proxy.port, "/herd/nginx.bin")
        cf, nx = res["cachefetch"], res.get("nginx")
        sec = Section(f"2. The herd: {HERD_CLIENTS} clients at once on one cold URL (origin: {HERD_DELAY:g} s to "
                      f"first byte, then {HERD_SIZE // MiB} MiB over {HERD_SPREAD:g} s)",
                      ["measurement", "cachefetch", "nginx", "cachefetch ÷ nginx", "goal", "met"])
        skip = "skipped (no nginx)"

        def row(label: str, key: str, fmt, goal: str = "— (no goal)", ok: bool | None = None,
                ratio: bool = True) -> None:
            sec.rows.append([label, fmt(cf[key]), fmt(nx[key]) if nx else skip,
                             ratio_text(safe_div(cf[key], nx[key])) if nx and ratio else "–", goal, met(ok)])

        row("upstream requests", "upstream", str, "1 (cachefetch)", cf["upstream"] == 1, ratio=False)
        row("bodies complete and right", "good", lambda v: f"{v}/{HERD_CLIENTS}", f"{HERD_CLIENTS}/{HERD_CLIENTS}",
            cf["good"] == HERD_CLIENTS, ratio=False)
        row("leader time to first byte", "leader", ms)
        row("follower time to first byte, median", "median", ms)
        row("follower time to first byte, max", "max", ms)
        row("total time (first request to last byte)", "total", lambda v: f"{v:.2f} s")
        cf_r = safe_div(cf["median"], cf["leader"])
        nx_r = safe_div(nx["median"], nx["leader"]) if nx else float("nan")
        sec.rows.append(["median follower ÷ leader time to first byte", ratio_text(cf_r),
                         ratio_text(nx_r) if nx else skip, "–", f"≤ {HERD_GOAL} (cachefetch)",
                         met(cf_r <= HERD_GOAL)])
        self.bars.append(Bar("herd: cachefetch median follower ÷ leader TTFB (↓)", cf_r, HERD_GOAL,
                             higher_is_better=False))
        if nx:
            self.bars.append(Bar("herd: nginx median follower ÷ leader TTFB (↓)", nx_r))
            self.bars.append(Bar("herd: follower TTFB median, cachefetch ÷ nginx (↓)",
                                 safe_div(cf["median"], nx["median"])))
        counts = "; ".join(f"{name}: {r['leaders']} leader(s), {r['followers']} followers, cache statuses "
                           f"{', '.join(f'`{s}`' for s in r['statuses'])}" for name, r in res.items())
        sec.notes.append(f"leaders and followers told apart by `Cache-Status` (cachefetch: `stored` / `collapsed`) "
                         f"and `X-Cache-Status: $upstream_cache_status` (nginx: `MISS` / `HIT`); {counts}")
        sec.notes.append("clients: Python http.client threads in the benchmark process, a fresh connection each, "
                         "released together by a barrier; every body's BLAKE3 checked")
        if nx:
            sec.notes.append("nginx: `proxy_cache_lock on; proxy_cache_lock_timeout 600s; proxy_cache_lock_age "
                             "600s; proxy_buffering on` — a follower waits until the whole response is in the cache "
                             "(nginx re-checks the lock every 500 ms)")
        return sec

    # 4 -----------------------------------------------------------------------------------

    def paced_once(self, name: str, port: int, path: str) -> list[float]:
        """A leader reading 100 kB/s, then :data:`PACE_FOLLOWERS` fast clients
        together: each follower's seconds from its start to its last byte."""
        leader = SlowReader(port, path)
        try:
            leader.wait_head()
            got = loadgen.all_at_once(PACE_FOLLOWERS, lambda i: timed_body(port, path), f"paced {name}")
        finally:
            leader.close()
        for status, size, _ in got:
            if status != 200 or size != PACE_SIZE:
                raise RuntimeError(f"paced {name} {path}: a follower got {status} with {size} bytes")
        times = sorted(secs for _, _, secs in got)
        log(f"paced {name} {path}: followers {', '.join(f'{t:.3f}' for t in times)} s; the leader had read "
            f"{leader.received:,} bytes")
        return times

    def paced(self) -> Section:
        """Issue 8's case: the herd behind a leader whose client reads at 100 kB/s,
        on an upstream that sends as fast as loopback allows."""
        for r in range(self.reps):
            for mode in ("direct", "cachefetch", "nginx"):
                with open(os.path.join(self.files, f"paced-{mode}-{r}.bin"), "wb") as f:
                    for _ in range(PACE_SIZE // MiB):
                        f.write(os.urandom(MiB))
        os.sync()
        ports = {"cachefetch": self.cf.port, **({"nginx": self.proxy.port} if self.proxy else {})}
        direct: list[float] = []
        direct_herd: list[float] = []  # what this machine can deliver to five clients at once, with no cache
        followers: dict[str, list[float]] = {mode: [] for mode in ports}
        for r in range(self.reps):
            path = f"/paced-direct-{r}.bin"
            status, size, secs = timed_body(self.origin.port, path)
            if status != 200 or size != PACE_SIZE:
                raise RuntimeError(f"direct paced fetch: {status}, {size} bytes")
            direct.append(secs)
            together = loadgen.all_at_once(PACE_FOLLOWERS, lambda i: timed_body(self.origin.port, path),
                                           "paced direct")
            if any(status != 200 or size != PACE_SIZE for status, size, _ in together):
                raise RuntimeError(f"direct paced fetch by {PACE_FOLLOWERS} clients failed: {together}")
            direct_herd.append(statistics.median(secs for _, _, secs in together))
            for mode in (list(ports) if r % 2 == 0 else list(ports)[::-1]):
                followers[mode].append(statistics.median(self.paced_once(mode, ports[mode], f"/paced-{mode}-{r}.bin")))
        base = statistics.median(direct)
        sec = Section(f"4. A slow leader: its client reads {PACE_PIECE * 10 // 1000} kB/s, then "
                      f"{PACE_FOLLOWERS} fast followers, on a cold {PACE_SIZE // MiB} MiB the upstream sends "
                      "as fast as it can",
                      ["measurement", "time", "÷ the upstream's own time", "goal", "met"])
        sec.rows.append(["the upstream's own time (one client, direct)",
                         f"{ms(base)} (median of {self.reps}; runs {ms(min(direct))}–{ms(max(direct))})", "1.00", "–",
                         "–"])
        herd_base = statistics.median(direct_herd)
        sec.rows.append([f"{PACE_FOLLOWERS} clients at once, direct from the upstream (no cache: what this machine "
                         "delivers to five at once)",
                         f"{ms(herd_base)} (median of each run's median)", ratio_text(safe_div(herd_base, base)),
                         "–", "–"])
        for mode, medians in followers.items():
            value = statistics.median(medians)
            ratio = safe_div(value, base)
            goal = f"≤ {PACE_GOAL} (issue 8)" if mode == "cachefetch" else "–"
            sec.rows.append([f"{mode}: a follower, start to last byte (median of each run's median)",
                             f"{ms(value)} (runs {ms(min(medians))}–{ms(max(medians))})", ratio_text(ratio), goal,
                             met(ratio <= PACE_GOAL) if mode == "cachefetch" else "–"])
            self.bars.append(Bar(f"slow leader: {mode} follower ÷ upstream's own time (↓)", ratio,
                                 PACE_GOAL if mode == "cachefetch" else None, higher_is_better=False))
        sec.notes.append(f"the leader: a raw socket reading {PACE_PIECE:,} bytes every {PACE_PAUSE:g} s, started "
                         "first; the followers start once it has its response head, all at once, each on a fresh "
                         "connection reading 1 MiB at a time (http.client, in the benchmark's process); each run "
                         "a new random file, so every proxy fetches it cold; order of the proxies alternated")
        if self.proxy:
            sec.notes.append("nginx fetches into its temp file at the upstream's pace too (`proxy_buffering on`); "
                             "its followers wait on `proxy_cache_lock` until the entry is complete, re-checking "
                             "every 500 ms")
        return sec

    # 3 -----------------------------------------------------------------------------------

    def warm(self) -> Section:
        big = "/cold-0.bin"  # fetched cold in section 1: cached in both
        targets = {"cachefetch": self.cf}
        if self.proxy:
            targets["nginx"] = self.proxy
        for name, server in targets.items():
            d = self.client.get(server.port, "/small.bin")
            if d.status != 200 or d.size != SMALL_SIZE:
                raise RuntimeError(f"{name} /small.bin: {d.status}, {d.size} bytes")
            self.wait_hit(server.port, "/small.bin", name)
            self.wait_hit(server.port, big, name)
        rounds = 1 if self.quick else 3
        seconds = 3.0 if self.quick else 5.0
        cases = [("small", "/small.bin", 64), ("big", big, 4)]
        runs: dict[tuple[str, str], list[tuple[Load, float]]] = {}
        for case, path, conns in cases:
            for name, server in targets.items():
                self.load.run(server.port, path, 1.0, conns)  # warm-up
            for r in range(rounds):
                for name, server in targets.items():
                    cpu0 = server.cpu_seconds()
                    load = self.load.run(server.port, path, seconds, conns)
                    cpu = server.cpu_seconds() - cpu0
                    if load.non_2xx or load.errors:
                        raise RuntimeError(f"warm {case} {name}: {load.non_2xx} non-2xx, {load.errors} socket errors")
                    runs.setdefault((case, name), []).append((load, cpu))
                    cost = (f"{cpu / max(1, load.requests) * 1e6:,.0f} µs/request" if case == "small" else
                            f"{cpu / max(1, load.bytes) * COLD_SIZE * 1e3:,.0f} ms per 100 MiB")
                    log(f"warm {path} round {r + 1}/{rounds} {name}: {load.rps:,.0f} req/s, {mibps(load.bps)}, "
                        f"server CPU {cost}")
        for name, server in targets.items():  # still hits, not refetched
            for path in ("/small.bin", big):
                status, headers = head(server.port, path)
                cache = cache_header(headers)
                if not (cache.startswith("cachefetch; hit") or cache == "HIT"):
                    raise RuntimeError(f"{name} {path} is no longer a hit: {cache!r}")

        def med(case: str, name: str, what: str) -> float:
            got = runs[(case, name)]
            if what == "rps":
                return statistics.median(load.rps for load, _ in got)
            if what == "bps":
                return statistics.median(load.bps for load, _ in got)
            if what == "cpu":
                return statistics.median(cpu / max(1, load.requests) for load, cpu in got)
            return statistics.median(cpu / max(1, load.bytes) * COLD_SIZE for load, cpu in got)  # per 100 MiB

        how = f"median of {rounds} × {seconds:g} s" if rounds > 1 else f"{seconds:g} s"
        sec = Section("3. Warm hits", ["measurement", "cachefetch", "nginx", "cachefetch ÷ nginx", "goal", "met"])
        has_nx = "nginx" in targets
        cf_rps, cf_cpu = med("small", "cachefetch", "rps"), med("small", "cachefetch", "cpu")
        if has_nx:
            nx_rps, nx_cpu = med("small", "nginx", "rps"), med("small", "nginx", "cpu")
            r = safe_div(cf_rps, nx_rps)
            sec.rows.append([f"4 KiB hit, requests/s ({cases[0][2]} connections, {how})",
                             f"{cf_rps:,.0f} req/s ({cf_cpu * 1e6:,.0f} µs server CPU/req)",
                             f"{nx_rps:,.0f} req/s ({nx_cpu * 1e6:,.0f} µs server CPU/req)", ratio_text(r),
                             "— (no goal)", met(None)])
            self.bars.append(Bar("warm 4 KiB: req/s, cachefetch ÷ nginx (↑)", r))
        else:
            sec.rows.append([f"4 KiB hit, requests/s ({cases[0][2]} connections, {how})",
                             f"{cf_rps:,.0f} req/s ({cf_cpu * 1e6:,.0f} µs server CPU/req)", "skipped (no nginx)",
                             "–", "— (no goal)", "skipped"])
        cf_bps, cf_cpu = med("big", "cachefetch", "bps"), med("big", "cachefetch", "cpu_per_body")
        if has_nx:
            nx_bps, nx_cpu = med("big", "nginx", "bps"), med("big", "nginx", "cpu_per_body")
            r = safe_div(cf_bps, nx_bps)
            sec.rows.append([f"100 MiB hit, throughput ({cases[1][2]} connections, {how})",
                             f"{mibps(cf_bps)} ({cf_cpu * 1e3:,.0f} ms server CPU per 100 MiB)",
                             f"{mibps(nx_bps)} ({nx_cpu * 1e3:,.0f} ms server CPU per 100 MiB)", ratio_text(r),
                             "— (no goal)", met(None)])
            self.bars.append(Bar("warm 100 MiB: MiB/s, cachefetch ÷ nginx (↑)", r))
        else:
            sec.rows.append([f"100 MiB hit, throughput ({cases[1][2]} connections, {how})",
                             f"{mibps(cf_bps)} ({cf_cpu * 1e3:,.0f} ms server CPU per 100 MiB)",
                             "skipped (no nginx)", "–",
                             "— (no goal)", "skipped"])
        sec.notes.append(f"load generator: {self.load.describe}; bytes/s counts every byte read, "
                         "requests/s only completed requests")
        return sec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shorter loads")
    parser.add_argument("--no-nginx", action="store_true", help="act as if nginx were not installed")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator even if wrk is on PATH")
    parser.add_argument("--no-curl", action="store_true", help="use http.client even if curl is on PATH")
    parser.add_argument("--only", choices=["cold", "herd", "warm", "paced"],
                        help="run this section only and print it (the results files are left alone)")
    args = parser.parse_args()

    report.interrupt_on(signal.SIGTERM)
    started = time.monotonic()
    bench = None
    busy_before = revision = "unknown"
    sections: list[Section] = []
    try:
        revision = cachefetch_revision()
        busy_before = machine_busy()
        log(f"before the run: {busy_before}")
        bench = Bench(args)
        log(f"temp dir {bench.workdir}")
        bench.setup()
        for name in ("cold", "herd", "warm", "paced"):
            if args.only in (None, name):
                sections.append(getattr(bench, name)())
    finally:
        if bench is not None:
            bench.close()
    elapsed = time.monotonic() - started
    busy_after = machine_busy()

    import gunicorn  # noqa: PLC0415  (only for its version)
    title = f"cachefetch serve benchmark{' (--quick)' if args.quick else ''}"
    header = [
        f"# {title}",
        "",
        f"- {report.machine(datetime.datetime.now().astimezone())}; all on {HOST}",
        f"- cachefetch: `python -m cachefetch.cli serve --protocol generic --workers {WORKERS} --threads {THREADS}` "
        f"(gunicorn {gunicorn.__version__} gthread) at {revision}, a fresh store in a temp dir on the disk, "
        "default options (**fsync on**)",
        (f"- nginx {nginx_version(bench.nginx)}: `worker_processes {WORKERS}`, `proxy_cache` with "
         "`proxy_cache_lock on`, `proxy_buffering on`, `sendfile on`, cache in the same temp dir"
         if bench.nginx else "- nginx: not measured"),
        f"- the origins, the clients and the proxies all share the machine's {os.cpu_count()} CPUs: "
        "client CPU is taken from the servers, so absolute numbers are lower than on separate hosts",
        f"- other work on the machine: before the run {busy_before}; after it {busy_after}",
        *(f"- {note}" for note in bench.notes),
        f"- whole run: {elapsed:.0f} s",
    ]
    if args.only:
        print("\n\n".join(s.render() for s in sections))
        return 0
    report.write_results(RESULTS_MD, RESULTS_PNG, title, header, "\n\n".join(s.render() for s in sections),
                         bench.bars, echo=True,
                         subtitle=f"{os.cpu_count()} CPUs shared by clients and servers; "
                                  f"{datetime.datetime.now().astimezone():%Y-%m-%d}")
    return 0


if __name__ == "__main__":
    report.run_main(main)
