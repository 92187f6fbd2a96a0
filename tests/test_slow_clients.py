"""Slow clients against a real ``cachefetch serve`` (our gthread worker) on
1 worker x 2 threads: slowloris heads, clients that never read, and the
ordinary keep-alive and pipelining that must still work.

Each attack would take both threads of stock gthread for good; here the probe
sent while it runs must be answered. Waits are on socket events (the peer's
close, readability), never sleeps."""
from __future__ import annotations

import contextlib
import http.client
import os
import select
import socket
import threading
import time

import pytest

from harness import cachefetch_serve, fetch, gunicorn, wait_until
from origin import Origin, Resource

from cachefetch.worker import MAX_HEAD

BIG = os.urandom(8 << 20)        # far more than a small receive window takes
SMALL = os.urandom(20_000)
HUP = select.POLLHUP | select.POLLERR | select.POLLRDHUP


@contextlib.contextmanager
def serving(tmp_path, *args: str, files: dict[str, bytes] | None = None):
    """An origin with ``files`` and a 1 x 2 ``cachefetch serve`` in front of it."""
    with Origin() as origin:
        for path, body in (files or {"/big.bin": BIG, "/small.bin": SMALL}).items():
            origin.files[path] = Resource(body)
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url, "--store", str(tmp_path / "store"),
                              "--workers", "1", "--threads", "2", *args) as server:
            server.extra["origin"] = origin
            yield server


def warm(server, *paths: str) -> None:
    """Fetch each path once and wait until it is a hit."""
    for path in paths:
        assert fetch(server.port, path).status == 200
        wait_until(lambda: "; hit" in (fetch(server.port, path, method="HEAD").headers["Cache-Status"] or ""),
                   what=f"{path} to be committed")


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect: it sets the window the server sees
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    return sock


def never_reader(port: int, path: str) -> socket.socket:
    """A client that asks for ``path`` and never reads a byte of the answer."""
    sock = connect(port, rcvbuf=4096)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


def await_hangup(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closed or reset ``sock`` within ``timeout``, without
    reading from it (a read would be progress for the server)."""
    poller = select.poll()
    poller.register(sock, HUP)
    return bool(poller.poll(timeout * 1000))


def read_all(sock: socket.socket, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


class Trickler:
    """Sends a request head a header line at a time, every ``every`` seconds,
    until the server closes the connection or ``stop`` is set (bounded by ``limit``)."""

    def __init__(self, port: int, every: float = 0.2, limit: float = 60.0) -> None:
        self.sock = connect(port)
        self.stop = threading.Event()
        self.lines_sent = 0
        self._every, self._limit = every, limit
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self._limit
        with contextlib.suppress(OSError):
            self.sock.sendall(b"GET /small.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while time.monotonic() < end and not self.stop.wait(self._every):
                self.sock.sendall(b"X-Slow-%d: loris\r\n" % self.lines_sent)
                self.lines_sent += 1

    def close(self) -> None:
        self.stop.set()
        self._thread.join(10)
        self.sock.close()


def test_slowloris_is_answered_408_and_closed_at_the_header_deadline(tmp_path):
    with serving(tmp_path, "--header-timeout", "1") as server:
        loris = Trickler(server.port)
        try:
            started = time.monotonic()
            assert await_hangup(loris.sock, timeout=30), "the slow head was never cut off"
            lasted = time.monotonic() - started
            loris.stop.set()
            answer = read_all(loris.sock)
        finally:
            loris.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert loris.lines_sent >= 2  # it was trickling, and the server let it, until the deadline
        assert lasted >= 0.9
        assert server.extra["origin"].hits["/small.bin"] == 0  # no half head reached the app


def test_slowloris_connections_beyond_the_threads_leave_probes_answered(tmp_path):
    with serving(tmp_path, "--header-timeout", "60") as server:
        warm(server, "/small.bin")
        lorises = [Trickler(server.port) for _ in range(8)]  # 4x the threads
        try:
            wait_until(lambda: all(t.lines_sent >= 1 for t in lorises), what="every slow head to be under way")
            for _ in range(3):
                probe = fetch(server.port, "/small.bin", timeout=10)
                assert probe.status == 200 and probe.body == SMALL
            assert all(not await_hangup(t.sock, timeout=0) for t in lorises)  # still connected
        finally:
            for t in lorises:
                t.close()


def test_never_reading_clients_of_a_hit_hold_no_thread_and_are_dropped_after_the_send_timeout(tmp_path):
    with serving(tmp_path, "--send-timeout", "2") as server:
        warm(server, "/big.bin", "/small.bin")
        readers = [never_reader(server.port, "/big.bin") for _ in range(4)]
        try:
            # With both threads blocked in sendfile to them this would hang.
            probe = fetch(server.port, "/small.bin", timeout=10)
            assert probe.status == 200 and probe.body == SMALL
            assert "; hit" in probe.headers["Cache-Status"]
            started = time.monotonic()
            for sock in readers:
                assert await_hangup(sock, timeout=30), "a client that never reads was never dropped"
            assert time.monotonic() - started >= 1.0  # not before the idle bound (2 s from the last byte taken)
            for sock in readers:
                assert len(read_all(sock)) < len(BIG)  # cut short, not completed
        finally:
            for sock in readers:
                sock.close()
        assert fetch(server.port, "/big.bin").body == BIG


def test_never_reading_clients_of_streamed_misses_free_their_threads_after_the_send_timeout(tmp_path):
    files = {f"/big{i}.bin": BIG for i in range(4)} | {"/small.bin": SMALL}
    with serving(tmp_path, "--send-timeout", "1", files=files) as server:
        warm(server, "/small.bin")
        # Misses stream from a thread: each holds one until its client has taken no byte for 1 s.
        readers = [never_reader(server.port, f"/big{i}.bin") for i in range(4)]
        try:
            wait_until(lambda: sum(server.extra["origin"].hits[f"/big{i}.bin"] for i in range(4)) >= 2,
                       what="two misses to hold both threads")
            probe = fetch(server.port, "/small.bin", timeout=60)
            assert probe.status == 200 and probe.body == SMALL
            for sock in readers:
                assert await_hangup(sock, timeout=60)
        finally:
            for sock in readers:
                sock.close()
        assert "Socket error processing request" not in server.log()


def test_keep_alive_serves_several_requests_on_one_connection_across_a_sendfile_tail(tmp_path):
    with serving(tmp_path) as server:
        warm(server, "/big.bin", "/small.bin")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            bodies = []
            for path in ("/big.bin", "/small.bin", "/big.bin", "/-/healthz"):
                conn.request("GET", path)
                if path == "/big.bin" and conn.sock is not None:
                    first_sock = conn.sock
                resp = conn.getresponse()
                assert resp.getheader("Connection") == "keep-alive"
                bodies.append(resp.read())
                assert conn.sock is first_sock  # http.client would have reconnected on a close
        finally:
            conn.close()
        assert bodies == [BIG, SMALL, BIG, b"ok\n"]


def _split_responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in ``data`` (all with Content-Length)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:200]
        lines = head.split(b"\r\n")
        length = next(int(v) for k, _, v in (line.partition(b":") for line in lines[1:])
                      if k.strip().lower() == b"content-length")
        out.append((int(lines[0].split()[1]), rest[:length]))
        data = rest[length:]
    return out


def test_pipelined_requests_are_answered_in_order_even_when_one_head_arrives_in_pieces(tmp_path):
    with serving(tmp_path) as server:
        warm(server, "/small.bin", "/big.bin")
        sock = connect(server.port)
        try:
            req = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            last = b"GET /-/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            # Two whole requests and the start of a third in one write, the rest later.
            sock.sendall(req % b"/small.bin" + req % b"/big.bin" + last[:20])
            sock.settimeout(30)
            got = b""
            while len(got) < len(SMALL) + len(BIG):
                got += sock.recv(1 << 20)
            sock.sendall(last[20:])
            answers = _split_responses(got + read_all(sock))
        finally:
            sock.close()
        assert answers == [(200, SMALL), (200, BIG), (200, b"ok\n")]


def test_a_head_longer_than_the_limit_is_431(tmp_path):
    with serving(tmp_path) as server:
        sock = connect(server.port)
        try:
            head = b"GET /small.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            with contextlib.suppress(OSError):  # the server may stop listening mid-way
                sock.sendall(head + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(MAX_HEAD // 1000 + 2)))
            answer = read_all(sock)
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert fetch(server.port, "/-/healthz").status == 200


def test_at_the_connection_limit_the_oldest_waiting_connection_makes_room(tmp_path):
    with Origin() as origin:
        origin.files["/small.bin"] = Resource(SMALL)
        env = {"CF_PROXY_UPSTREAM": origin.url, "CF_PROXY_STORE": str(tmp_path / "store")}
        with gunicorn("proxy_wsgi:application", tmp_path, env=env, workers=1, threads=2,
                      args=("-k", "cachefetch.worker.CachefetchWorker", "--worker-connections", "6")) as server:
            idle = []
            try:
                for _ in range(6):  # connected, silent: they fill the limit
                    idle.append(connect(server.port))
                    assert not await_hangup(idle[-1], timeout=0.2)
                probe = fetch(server.port, "/small.bin", timeout=10)
                assert probe.status == 200 and probe.body == SMALL
                assert await_hangup(idle[0], timeout=10)  # the oldest went to let the probe in
            finally:
                for sock in idle:
                    sock.close()
