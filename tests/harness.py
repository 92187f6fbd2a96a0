"""Real servers for tests: gunicorn processes on 127.0.0.1 and HTTP clients.

Every server started here is stopped (and waited for) by its context manager.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    """Return once something accepts on ``port``; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling a port: there is no event to wait on
    raise TimeoutError(f"nothing listened on port {port} within {timeout}s")


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: str
    extra: dict = field(default_factory=dict)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


_READY_HOOK = """
import os
def post_worker_init(worker):
    open(os.path.join({ready!r}, str(os.getpid())), "w").close()
"""


@contextlib.contextmanager
def gunicorn(app: str, tmp_path, env: dict | None = None, workers: int = 2, threads: int = 32,
             args: tuple[str, ...] = (), cwd: str | None = None, config: str | None = None):
    """Run ``gunicorn -k gthread`` serving ``app`` ("module:callable") on a free port.

    Yields once every worker has loaded the app (a ``post_worker_init`` hook
    marks each one), unless ``config`` names a config file of its own; then
    once the port accepts.
    """
    port = free_port()
    log_path = os.path.join(tmp_path, f"gunicorn-{port}.log")
    ready_dir = os.path.join(tmp_path, f"ready-{port}")
    if config is None:
        os.makedirs(ready_dir)
        config = os.path.join(tmp_path, f"gunicorn-{port}.conf.py")
        with open(config, "w") as f:
            f.write(_READY_HOOK.format(ready=ready_dir))
        counting = True
    else:
        counting = False
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, TESTS_DIR, cwd or ""]),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", str(workers), "--threads", str(threads),
           "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", "--timeout", "60",
           "--log-level", "info", "-c", config, *args, app]
    with _running(cmd, port, log_path, full_env, cwd or tmp_path) as server:
        if counting:
            proc = server.proc
            wait_until(lambda: proc.poll() is not None or len(os.listdir(ready_dir)) >= workers,
                       what="every worker to boot")
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode}")
        yield server


@contextlib.contextmanager
def _running(cmd: list[str], port: int, log_path: str, env: dict, cwd,
             host: str = "127.0.0.1") -> "Iterator[Server]":
    """Start ``cmd`` in its own session, yield once ``port`` accepts; then
    SIGTERM it (SIGKILL after 30 s) and reap whatever it left."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    try:
        wait_for_port(port, proc, host=host)
        yield Server(proc, port, log_path, host=host)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Reap anything left in its session (a worker killed by a test is already gone).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Fetched:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    complete: bool          # the body had the announced length / chunked end
    start: float            # monotonic times
    first_byte: float
    end: float

    @property
    def ttfb(self) -> float:
        return self.first_byte - self.start


def fetch(port: int, path: str, method: str = "GET", headers: dict | None = None, start: float | None = None,
          stop_after: int | None = None, timeout: float = 60.0, host: str = "127.0.0.1") -> Fetched:
    """One request on a fresh connection, timing the first body byte.

    ``stop_after``: read that many body bytes, then hang up.
    A connection dropped mid-body gives ``complete=False`` instead of raising.
    """
    t0 = time.monotonic() if start is None else start
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        chunks = []
        first = None
        complete = True
        got = 0
        try:
            while True:
                data = resp.read1(1 << 16) if method != "HEAD" else b""
                if not data:
                    break
                if first is None:
                    first = time.monotonic()
                chunks.append(data)
                got += len(data)
                if stop_after is not None and got >= stop_after:
                    complete = False
                    break
        except (http.client.IncompleteRead, ConnectionError, socket.timeout):
            complete = False
        if resp.length not in (None, 0) and complete:
            complete = False  # http.client counts down what is still missing
        if method != "HEAD" and resp.chunked and not resp.isclosed() and complete:
            complete = False
        now = time.monotonic()
        return Fetched(resp.status, resp.headers, b"".join(chunks), complete, t0, first or now, now)
    finally:
        conn.close()


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll ``condition()`` until it is truthy (for state kept by another process,
    which offers nothing to block on); returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def curl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the real curl client."""
    return subprocess.run(["curl", "--silent", "--show-error", "--noproxy", "*", *args],
                          capture_output=True, timeout=timeout)


@contextlib.contextmanager
def cachefetch_serve(tmp_path, *args: str, env: dict | None = None):
    """Run the real ``cachefetch serve`` command on a free port; stop it with SIGTERM."""
    port = free_port()
    log_path = os.path.join(tmp_path, f"serve-{port}.log")
    full_env = {**os.environ, "PYTHONPATH": REPO_ROOT, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "cachefetch.cli", "serve", "--bind", f"127.0.0.1:{port}", *args]
    with _running(cmd, port, log_path, full_env, tmp_path) as server:
        yield server


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``cachefetch ARGS`` as a real command."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    return subprocess.run([sys.executable, "-m", "cachefetch.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
