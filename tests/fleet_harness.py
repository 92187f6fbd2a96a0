"""Real fleets for tests: a redis-server on loopback and `cachefetch serve`
hosts bound to 127.0.0.1, 127.0.0.2 and 127.0.0.3, each with its own store.

Everything started here is stopped (and waited for) by its context manager.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

from harness import REPO_ROOT, Server, _running, fetch, wait_for_port

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
SECRET = b"a-test-secret-of-the-fleet-0123456789"


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
def fleet_host(tmp_path, host: str, upstream: str, redis_url: str, *args: str,
               secret: bytes = SECRET) -> Iterator[Server]:
    """One `cachefetch serve` member of the fleet on ``host`` (its own store under ``tmp_path``)."""
    port = free_port_on(host)
    base = os.path.join(tmp_path, f"host-{host}")
    os.makedirs(base, exist_ok=True)
    secret_file = os.path.join(base, "secret")
    with open(secret_file, "wb") as f:
        f.write(secret)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cachefetch.cli", "serve", "--bind", f"{host}:{port}",
           "--store", os.path.join(base, "store"), "--upstream", upstream, "--default-ttl", "forever",
           "--fleet", redis_url, "--fleet-secret-file", secret_file, "--advertise", f"http://{host}:{port}",
           "--workers", "2", "--threads", "32", *args]
    with _running(cmd, port, os.path.join(base, f"serve-{port}.log"), env, tmp_path, host=host) as server:
        server.extra["store"] = os.path.join(base, "store")
        yield server


@contextlib.contextmanager
def fleet(tmp_path, upstream: str, redis_url: str, *args: str) -> Iterator[list[Server]]:
    """Three hosts, one per address of :data:`HOSTS`."""
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
