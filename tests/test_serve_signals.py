"""`cachefetch serve` stops cleanly on Ctrl-C (SIGINT) and SIGTERM: exit 0, commits landed."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

import pytest

from harness import cachefetch_serve, fetch, run_cli
from origin import Origin, Resource

from cachefetch.hashing import hash_bytes
from cachefetch.store import CAFS


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_exits_0_with_the_fetched_body_committed(tmp_path, sig):
    body = os.urandom(3 << 20)
    store = tmp_path / "store"
    with Origin() as origin:
        origin.files["/f.bin"] = Resource(body)
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url, "--store", str(store), "--threads", "4") as server:
            r = fetch(server.port, "/f.bin")
            assert r.complete and r.body == body
            # Stop at once: the commit may still be queued; the worker's exit hook lets it land.
            server.proc.send_signal(sig)
            assert server.proc.wait(timeout=30) == 0, server.log()
    assert CAFS(store).exists(hash_bytes(body))
    assert CAFS(store).verify() == [] and CAFS(store).temp_files() == []
    assert os.listdir(store / "inflight") == []


class TricklingOrigin:
    """An origin that announces ``size`` bytes and sends one a second (for at
    most ``size`` seconds); ``sent`` is set once it has sent ``after`` bytes."""

    def __init__(self, size: int = 120, after: int = 1) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.size, self.after = size, after
        self.sent = threading.Event()
        self.stopped = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._conns: list[socket.socket] = []

    def __enter__(self) -> "TricklingOrigin":
        self._threads[0].start()
        return self

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while not self.stopped.is_set():
                conn, _ = self.listener.accept()
                self._conns.append(conn)
                thread = threading.Thread(target=self._trickle, args=(conn,), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _trickle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % self.size)
            for i in range(self.size):
                conn.sendall(b"x")
                if i + 1 == self.after:
                    self.sent.set()
                if self.stopped.wait(1.0):  # the 1 byte/s pace is what is under test
                    return

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        self.listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(5)


@pytest.mark.parametrize("client", ["left", "reading"])
def test_sigterm_returns_within_5s_while_a_fetch_trickles_at_1_byte_per_second(tmp_path, client):
    with TricklingOrigin() as origin:
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url, "--store", str(tmp_path / "store"),
                              "--workers", "2", "--threads", "4") as server:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            try:
                sock.sendall(b"GET /slow.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 200"), server.log()
                if client == "left":  # the fetch goes on detached, for the cache
                    sock.close()
                assert origin.sent.wait(30)
                started = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                assert server.proc.wait(timeout=5) == 0, server.log()
                took = time.monotonic() - started
            finally:
                sock.close()
    log = server.log()
    assert "SIGKILL" not in log, log  # the workers left by themselves
    assert took < 5
    # Nothing half-fetched was stored; what the cut fetch left, verify clears (as after a SIGKILL).
    store = CAFS(tmp_path / "store")
    assert store.verify() == []
    assert run_cli("verify", "--store", store.root).returncode == 0
    assert store.temp_files() == [] and os.listdir(os.path.join(store.root, "inflight")) == []
