"""The benchmarks' clients: one load generator and the timed fetches every script shares.

- :class:`LoadGenerator` puts keep-alive load on one URL for some seconds:
  ``wrk`` when it is on PATH, else :func:`keepalive_load` (non-blocking
  sockets in a few forked processes, bodies counted and dropped as they
  stream, so a 100 MiB body costs no memory); both give a :class:`Load`.
- :func:`fetch` is one timed GET on a fresh connection (the body's BLAKE3);
  :func:`all_at_once` runs a herd of them in threads, released together;
  :func:`one_by_one` makes a fixed number of GETs in turn on one connection.
- :func:`download_all` holds up to thousands of downloads at once on two
  cores: asyncio in a few forked processes, every connection opened first,
  every request sent after a barrier; a :class:`Got` per client (status,
  size, BLAKE3 if asked, time to first byte, end).

Every client talks to 127.0.0.1 only, and every loop is bounded (a deadline
or a byte count), so a run always ends. It imports nothing from
``cachefetch`` or ``tests``.
"""
from __future__ import annotations

import asyncio
import http.client
import multiprocessing
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["HOST", "Load", "run_wrk", "wrk_version", "keepalive_load", "LoadGenerator", "Fetched", "fetch", "pull",
           "one_by_one", "all_at_once", "Got", "download_all", "raise_fd_limit"]

HOST = "127.0.0.1"
_RECV = 1 << 20
_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*(\d+)")


@dataclass
class Load:
    """What a load generator got: ``bytes`` counts every byte read (heads too, as wrk does)."""

    requests: int
    seconds: float
    non_2xx: int
    errors: int
    bytes: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def bps(self) -> float:
        return self.bytes / self.seconds


# -- wrk -------------------------------------------------------------------------------

_DURATION = re.compile(r"([\d.]+)(us|ms|s|m|h)")
_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def run_wrk(port: int, path: str, seconds: float, connections: int, threads: int,
            options: Sequence[str] = (), env: dict[str, str] | None = None) -> Load:
    """``wrk`` on ``path`` for ``seconds`` (whole, at least 1), and what its summary says."""
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", *options,
                          f"http://{HOST}:{port}{path}"], capture_output=True, text=True, check=True, env=env).stdout
    m = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+)([KMGT]?B) read", out)
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    value, unit = _DURATION.fullmatch(m.group(2)).groups()
    secs = float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    read = int(float(m.group(3)) * _UNITS[m.group(4)])
    non_2xx = int(m2.group(1)) if (m2 := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors = sum(map(int, m3.groups())) if (m3 := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)) else 0
    return Load(int(m.group(1)), secs, non_2xx, errors, read)


def wrk_version() -> str:
    """The first line of ``wrk -v`` up to its copyright, e.g. ``wrk 4.2.0 [epoll]``."""
    version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return version.split(" Copyright")[0].strip() or "wrk"


# -- the Python keep-alive load --------------------------------------------------------

class _Conn:
    """One keep-alive connection of :func:`_load_process`, one request in flight."""

    __slots__ = ("sock", "head", "left", "status")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = bytearray()   # the response head read so far
        self.left = -1            # body bytes still to come; -1 while reading a head
        self.status = 0


def _load_process(port: int, path: str, connections: int, seconds: float, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us when it is interrupted
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    buf = memoryview(bytearray(_RECV))
    done = non_2xx = errors = got = 0

    def connect() -> None:
        s = socket.create_connection((HOST, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        s.send(request)
        sel.register(s, selectors.EVENT_READ, _Conn(s))

    for _ in range(connections):
        connect()
    start = time.monotonic()
    deadline = start + seconds
    while sel.get_map() and (now := time.monotonic()) < deadline:
        for key, _ in sel.select(timeout=deadline - now):
            c: _Conn = key.data
            try:
                n = c.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if not n:  # the server closed the connection: open another
                sel.unregister(c.sock)
                c.sock.close()
                errors += 1
                connect()
                continue
            got += n
            data = buf[:n]
            while data:
                if c.left < 0:
                    start_at = max(0, len(c.head) - 3)
                    c.head += data
                    end = c.head.find(b"\r\n\r\n", start_at)
                    if end < 0:
                        break
                    head, rest = bytes(c.head[:end]), memoryview(bytes(c.head[end + 4:]))
                    c.head.clear()
                    c.status = int(head.split(b" ", 2)[1])
                    m = _LENGTH.search(head)
                    c.left = int(m.group(1)) if m else 0
                    data = rest
                take = min(c.left, len(data))
                c.left -= take
                data = data[take:]
                if c.left == 0:
                    c.left = -1
                    done += 1
                    non_2xx += not 200 <= c.status < 300
                    if time.monotonic() < deadline:
                        c.sock.send(request)
    elapsed = min(time.monotonic(), deadline) - start
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    results.put((done, elapsed, non_2xx, errors, got))


def keepalive_load(port: int, path: str, seconds: float, connections: int, processes: int) -> Load:
    """``connections`` keep-alive connections spread over ``processes`` forked
    processes, each with one GET of ``path`` in flight, for ``seconds``."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    per = [connections // processes + (i < connections % processes) for i in range(processes)]
    procs = [ctx.Process(target=_load_process, args=(port, path, n, seconds, results), daemon=True)
             for n in per if n]
    got = []
    try:
        for p in procs:
            p.start()
        got = [results.get(timeout=seconds + 60) for _ in procs]
    finally:
        _reap(procs, finished=len(got) == len(procs))
    return Load(sum(g[0] for g in got), max(g[1] for g in got), sum(g[2] for g in got), sum(g[3] for g in got),
                sum(g[4] for g in got))


def _reap(procs: list, finished: bool) -> None:
    for p in procs:
        if p.pid is None:
            continue  # never started
        if finished:
            p.join(timeout=10)
        if p.is_alive():
            p.terminate()
        p.join()


class LoadGenerator:
    """Keep-alive load on one URL: ``wrk`` (``-t threads``) when on PATH and
    ``use_wrk``, else :func:`keepalive_load` in ``threads`` processes."""

    def __init__(self, use_wrk: bool, threads: int = 2, wrk_options: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.wrk = use_wrk and shutil.which("wrk") is not None
        self.threads = threads
        self.wrk_options, self.env = list(wrk_options), env
        if self.wrk:
            self.describe = f"`{wrk_version()}` (-t{threads}, keep-alive)"
        else:
            why = "wrk is off (--no-wrk)" if not use_wrk else "wrk is not on PATH (`apt-get install -y wrk`)"
            self.describe = f"Python client ({threads} processes of non-blocking keep-alive connections; {why})"

    def run(self, port: int, path: str, seconds: float, connections: int) -> Load:
        """``connections`` connections on ``path`` for ``seconds``."""
        if self.wrk:
            return run_wrk(port, path, seconds, connections, self.threads, self.wrk_options, self.env)
        return keepalive_load(port, path, seconds, connections, self.threads)


# -- timed fetches ---------------------------------------------------------------------

@dataclass
class Fetched:
    status: int
    headers: http.client.HTTPMessage
    size: int
    digest: str
    start: float
    first_byte: float
    end: float

    @property
    def ttfb(self) -> float:
        return self.first_byte - self.start


def pull(port: int, path: str, buffer_size: int = 1 << 20) -> tuple[int, int, float, http.client.HTTPMessage]:
    """One GET on a fresh connection, the body read into one reused buffer and
    dropped: ``(status, bytes, seconds from the request to the last byte, headers)``."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        buf = memoryview(bytearray(buffer_size))
        got = 0
        while n := resp.readinto(buf):
            got += n
        return resp.status, got, time.perf_counter() - t0, resp.headers
    finally:
        conn.close()


def fetch(port: int, path: str, start: float | None = None, keep: bool = False,
          headers: dict | None = None, timeout: float = 120) -> tuple[Fetched, bytes | None]:
    """One GET on a fresh connection: status, headers, size and BLAKE3 of the body, timings."""
    import blake3  # a cachefetch dependency; only the scripts that fetch need it

    t0 = time.monotonic() if start is None else start
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        hasher = blake3.blake3()
        kept = [] if keep else None
        size, first = 0, None
        while True:
            data = resp.read1(1 << 18)
            if not data:
                break
            if first is None:
                first = time.monotonic()
            hasher.update(data)
            size += len(data)
            if kept is not None:
                kept.append(data)
        now = time.monotonic()
        return (Fetched(resp.status, resp.headers, size, hasher.hexdigest(), t0, first or now, now),
                b"".join(kept) if kept is not None else None)
    finally:
        conn.close()


def one_by_one(port: int, path: str, count: int, size: int, timeout: float = 120) -> http.client.HTTPMessage:
    """``count`` GETs of ``path``, one after another on one keep-alive
    connection, each checked to be a 200 of ``size`` bytes; the last one's
    headers. For counting what a server does per request, not for its speed.

    :raises RuntimeError: on another status or size.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        for _ in range(count):
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or len(body) != size:
                raise RuntimeError(f"GET {path} on port {port}: {resp.status} with {len(body)} bytes")
        return resp.headers
    finally:
        conn.close()


def all_at_once(count: int, fn: Callable[[int], object], what: str) -> list:
    """``fn(i)`` for each of ``count`` clients, each in a thread, released together by a barrier.

    :returns: the results, in client order.
    :raises RuntimeError: when any client raised (``what`` names the run).
    """
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def client(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{what}: {len(failed)} clients failed: {failed[0]!r}")
    return results


# -- thousands at once ------------------------------------------------------------------

@dataclass(frozen=True)
class Got:
    """One client of :func:`download_all`: ``error`` is empty when the body came whole."""

    status: int
    size: int
    length: int           # the announced Content-Length (-1: none)
    digest: str           # BLAKE3 hex of the body, "" when not asked for
    cache: str            # Cache-Status, else X-Cache-Status
    ttfb: float           # seconds from the release to the first body byte
    end: float            # seconds from the release to the last byte
    error: str = ""


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _download(port: int, path: str, digest: bool, sock: socket.socket, go: float, deadline: float,
                    own: memoryview, body_buf: memoryview) -> Got:
    """One client: ``own`` is its buffer, ``body_buf`` where its body may be read
    once the head is in (a shared one when the bytes are only counted)."""
    import blake3

    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
    hasher = blake3.blake3() if digest else None
    head = bytearray()
    status, length, size, first, cache = 0, -1, 0, 0.0, ""
    buf = own
    try:
        await loop.sock_sendall(sock, request)
        while time.monotonic() < deadline:
            n = await asyncio.wait_for(loop.sock_recv_into(sock, buf), deadline - time.monotonic())
            if not n:
                break
            data = buf[:n]
            if status == 0:
                head += data
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    continue
                lines = bytes(head[:end]).decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                length = int(fields.get("content-length", "-1"))
                cache = fields.get("cache-status") or fields.get("x-cache-status") or ""
                data = memoryview(bytes(head[end + 4:]))
                buf = body_buf
                if not data:
                    continue
            if not first:
                first = time.monotonic() - go
            size += len(data)
            if hasher is not None:
                hasher.update(data)
            if 0 <= length <= size:
                break
        else:
            raise TimeoutError("the download did not end in time")
        error = "" if status and (length < 0 or size == length) else f"short body: {size} of {length} bytes"
    except Exception as exc:  # a failed client is a result, not the end of the run
        error = repr(exc)
    finally:
        sock.close()
    return Got(status, size, length, hasher.hexdigest() if hasher is not None and not error else "", cache,
               first, time.monotonic() - go, error)


def _download_process(port: int, path: str, clients: int, digest: bool, timeout: float, barrier, go_at,
                      results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise_fd_limit()
    socks = []
    for _ in range(clients):  # every connection first: the requests then go out together
        s = socket.create_connection((HOST, port), timeout=60)
        s.setblocking(False)
        socks.append(s)
    barrier.wait(timeout=120)
    go = go_at.value

    async def run() -> list[Got]:
        # Another read may run between a read and its coroutine resuming: a head, or a body
        # that is hashed, needs a buffer of its own; a body only counted can share one.
        shared = memoryview(bytearray(_RECV))
        deadline = go + timeout

        def client(s: socket.socket) -> "asyncio.Future[Got]":
            own = memoryview(bytearray(1 << 16 if digest else 1 << 14))
            return _download(port, path, digest, s, go, deadline, own, own if digest else shared)

        return await asyncio.gather(*(client(s) for s in socks))

    results.put(asyncio.run(run()))


def download_all(port: int, path: str, clients: int, processes: int = 2, digest: bool = False,
                 timeout: float = 600.0) -> list[Got]:
    """``clients`` GETs of ``path`` at once, each on its own connection, from
    ``processes`` forked asyncio processes: every connection is opened first,
    then all requests go out after one barrier. Bounded by ``timeout`` seconds.

    :returns: one :class:`Got` per client (failures carry ``error``).
    :raises RuntimeError: if a client process failed to connect or report.
    """
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    go_at = ctx.Value("d", 0.0)
    per = [clients // processes + (i < clients % processes) for i in range(processes)]
    per = [n for n in per if n]

    def release() -> None:
        go_at.value = time.monotonic()  # CLOCK_MONOTONIC is one clock for every process

    barrier = ctx.Barrier(len(per) + 1, action=release)
    procs = [ctx.Process(target=_download_process, args=(port, path, n, digest, timeout, barrier, go_at, results),
                         daemon=True) for n in per]
    got: list[list[Got]] = []
    try:
        for p in procs:
            p.start()
        barrier.wait(timeout=180)
        got = [results.get(timeout=timeout + 120) for _ in procs]
    except threading.BrokenBarrierError as exc:
        raise RuntimeError("a client process could not open its connections") from exc
    finally:
        _reap(procs, finished=len(got) == len(procs))
    return [g for part in got for g in part]
