"""How the upstream body is cut into chunks: a trickle piece by piece, a fast
body coalesced (a short read waits a moment for what follows), every byte in
order. Real sockets on 127.0.0.1; the coalescing rule also on its own."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from cachefetch import upstream as upstream_mod
from cachefetch.upstream import COALESCE_SIZE, Upstream, _coalesced, _readiness

WAIT = 10.0


class RawOrigin:
    """One connection, answered by ``script(conn)`` on a thread: full control of what is sent when."""

    def __init__(self, script) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.script = script
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.recv(65536)  # the request head
                self.script(conn)
        except BaseException as exc:  # reported by close()
            self.error = exc

    def close(self) -> None:
        self.thread.join(WAIT)
        self.sock.close()
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def test_a_trickle_is_handed_on_piece_by_piece_without_waiting_for_the_next():
    """Each piece is sent only once the client has it: were a chunk held back
    for more, the origin would wait in vain (and say so)."""
    pieces = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    taken = [threading.Event() for _ in pieces]
    waited_in_vain: list[int] = []

    def script(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n")
        for i, piece in enumerate(pieces):
            conn.sendall(piece)
            if not taken[i].wait(WAIT):
                waited_in_vain.append(i)

    origin = RawOrigin(script)
    up = Upstream(pool_size=1)
    try:
        resp = up.get(origin.url + "/t")
        got = []
        for i, chunk in enumerate(resp.chunks()):
            got.append(chunk)
            if i < len(taken):
                taken[i].set()
        assert got == pieces
        assert waited_in_vain == []
    finally:
        for event in taken:
            event.set()
        up.close()
        origin.close()


def test_a_fast_body_arrives_whole_and_in_order_in_few_chunks():
    """16 MiB sent in 64 KiB writes: every byte, in order; chunks of at most 1 MiB."""
    body = os.urandom(16 << 20)

    def script(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        view = memoryview(body)
        for start in range(0, len(body), 64 << 10):
            conn.sendall(view[start:start + (64 << 10)])

    origin = RawOrigin(script)
    up = Upstream(pool_size=1)
    try:
        resp = up.get(origin.url + "/fast")
        assert _readiness(resp.raw.raw) is not None  # a plain, length-delimited body: coalesced
        chunks = list(resp.chunks())
        assert b"".join(chunks) == body
        assert max(map(len, chunks)) <= upstream_mod.CHUNK_SIZE
    finally:
        up.close()
        origin.close()


def test_a_chunked_body_is_not_coalesced_and_arrives_whole():
    def script(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

    origin = RawOrigin(script)
    up = Upstream(pool_size=1)
    try:
        resp = up.get(origin.url + "/chunked")
        assert _readiness(resp.raw.raw) is None
        assert b"".join(resp.chunks()) == b"hello world"
    finally:
        up.close()
        origin.close()


class Pieces:
    """A body whose ``read1`` hands out ``pieces`` one at a time, then b""."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.asked: list[int] = []

    def read1(self, amt: int, decode_content: bool = False) -> bytes:
        self.asked.append(amt)
        return self.pieces.pop(0)[:amt] if self.pieces else b""


def test_coalescing_joins_what_is_ready_up_to_its_size_and_never_asks_past_a_chunk():
    piece = 100 << 10
    body = Pieces([bytes([i]) * piece for i in range(1, 20)])
    first = b"\x00" * piece
    joined = _coalesced(body, first, lambda: True)
    expected = first + b"".join(bytes([i]) * piece for i in range(1, 6))
    assert len(joined) >= COALESCE_SIZE  # 6 pieces of 100 KiB pass 512 KiB, 5 do not
    assert joined == expected
    # each read asks for what is left of one chunk: never more than a chunk in all
    assert body.asked == [upstream_mod.CHUNK_SIZE - k * piece for k in range(1, 6)]


def test_coalescing_stops_when_nothing_is_ready_at_the_end_and_at_its_time_limit(monkeypatch):
    first = b"x" * 1000
    assert _coalesced(Pieces([b"y" * 10]), first, lambda: False) is first  # nothing follows soon
    assert _coalesced(Pieces([b"y" * 10]), first, lambda: True) == first + b"y" * 10  # then the end
    monkeypatch.setattr(upstream_mod, "COALESCE_LIMIT", 0.0)
    assert _coalesced(Pieces([b"y" * 10]), first, lambda: True) is first  # out of time at once


@pytest.mark.parametrize("body", [object(), type("Chunked", (), {"chunked": True})()])
def test_no_readiness_without_a_plain_socket_or_for_a_chunked_body(body):
    assert _readiness(body) is None
