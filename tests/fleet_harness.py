"""Real fleets for tests: a redis-server on loopback and `cachefetch serve`
hosts bound to 127.0.0.1, 127.0.0.2 and 127.0.0.3, each with its own store.

Everything started here is stopped (and waited for) by its context manager.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from harness import REPO_ROOT, Server, _running, fetch, wait_for_port

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
SECRET = b"a-test-secret-of-the-fleet-0123456789"

#: Fleet tests need redis-server (``.ci/run`` installs it). Locally they skip
#: saying so; under CI a missing server must fail, not skip.
requires_redis = pytest.mark.skipif(not shutil.which("redis-server") and not os.environ.get("CI"),
                                    reason="redis-server is not installed: run `bash .ci/run`")


def free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server without persistence, on 127.0.0.1: ``kill`` and ``start`` again on the same port."""

    port: int
    workdir: str
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(os.path.join(self.workdir, "redis.log"), "ab")
        with log:
            self.proc = subprocess.Popen(
                [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.workdir, "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, self.proc)

    def kill(self) -> None:
        """SIGKILL it (what it held is lost: no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


@contextlib.contextmanager
def redis_server(tmp_path) -> Iterator[RedisServer]:
    workdir = os.path.join(tmp_path, "redis")
    os.makedirs(workdir, exist_ok=True)
    server = RedisServer(free_port_on("127.0.0.1"), workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def fleet_host(tmp_path, host: str, upstream: str, redis_url: str | None, *args: str,
               secret: bytes = SECRET) -> Iterator[Server]:
    """One `cachefetch serve` member of the fleet on ``host`` (its own store
    under ``tmp_path``); with ``redis_url=None``, a cache of its own instead."""
    port = free_port_on(host)
    base = os.path.join(tmp_path, f"host-{host}")
    os.makedirs(base, exist_ok=True)
    secret_file = os.path.join(base, "secret")
    with open(secret_file, "wb") as f:
        f.write(secret)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "PYTHONUNBUFFERED": "1"}
    joining = [] if redis_url is None else ["--fleet", redis_url, "--fleet-secret-file", secret_file,
                                            "--advertise", f"http://{host}:{port}"]
    cmd = [sys.executable, "-m", "cachefetch.cli", "serve", "--bind", f"{host}:{port}",
           "--store", os.path.join(base, "store"), "--upstream", upstream, "--default-ttl", "forever",
           *joining, "--workers", "2", "--threads", "32", *args]
    with _running(cmd, port, os.path.join(base, f"serve-{port}.log"), env, tmp_path, host=host) as server:
        server.extra["store"] = os.path.join(base, "store")
        yield server


@contextlib.contextmanager
def fleet(tmp_path, upstream: str, redis_url: str | None, *args: str) -> Iterator[list[Server]]:
    """Three hosts, one per address of :data:`HOSTS` (``redis_url=None``: three independent caches)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(fleet_host(tmp_path, h, upstream, redis_url, *args)) for h in HOSTS]


def get(server: Server, path: str, **kwargs):
    """``harness.fetch`` on ``server``'s own address."""
    return fetch(server.port, path, host=server.host, **kwargs)


def metric(server: Server, name: str) -> float:
    """The sum of every sample of counter ``name`` on the host's /-/metrics."""
    text = get(server, "/-/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


class TrickleOrigin:
    """An origin that waits ``delay`` seconds before answering, then sends
    ``body`` in ``chunks`` pieces spread over ``spread`` seconds. Counts
    requests and body bytes sent; ``with`` starts and stops it (127.0.0.1)."""

    def __init__(self, body: bytes, delay: float = 1.0, spread: float = 2.0, chunks: int = 40) -> None:
        self.body, self.requests, self.sent = body, 0, 0
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with origin._lock:
                    origin.requests += 1
                time.sleep(delay)  # the slow origin is the behaviour under test
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(origin.body)))
                self.end_headers()
                step = -(-len(origin.body) // chunks)
                try:
                    for i in range(0, len(origin.body), step):
                        self.wfile.write(origin.body[i:i + step])
                        self.wfile.flush()
                        with origin._lock:
                            origin.sent += min(step, len(origin.body) - i)
                        time.sleep(spread / chunks)
                except (BrokenPipeError, ConnectionResetError):
                    return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "TrickleOrigin":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_herd(hosts: list[Server], path: str, clients: int):
    """Start ``clients`` GETs of ``path`` spread round-robin over ``hosts``,
    released at once; returns a function that waits for them and returns
    ``(host index, Fetched)`` in client order."""
    barrier = threading.Barrier(clients)
    results: list = [None] * clients

    def client(i: int) -> None:
        host = hosts[i % len(hosts)]
        barrier.wait()
        try:
            results[i] = (i % len(hosts), get(host, path, timeout=30))
        except (OSError, http.client.HTTPException):  # its host was killed before answering
            results[i] = (i % len(hosts), None)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()

    def join() -> list:
        for t in threads:
            t.join()
        return results

    return join


def herd(hosts: list[Server], path: str, clients: int) -> list:
    """:func:`start_herd`, waited for."""
    return start_herd(hosts, path, clients)()


def kill_host(server: Server) -> None:
    """SIGKILL the host's whole serve process group (arbiter and workers)."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()


def lease_host(redis: RedisServer) -> str | None:
    """The URL of the host holding a flight lease now (the only flight running), or ``None``."""
    r = redis.client()
    for name in r.scan_iter("cachefetch:l:*"):
        value = r.get(name)
        if value:
            return value.decode().split(" ")[2]
    return None
