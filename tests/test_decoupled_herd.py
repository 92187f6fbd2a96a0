"""The herd through a real ``cachefetch serve`` (2 workers) is fetched at the
upstream's pace, not at its leader's: a leader's client reading at ~100 kB/s,
or not reading at all, holds no follower back, and the entry is stored whole.

The leader is a raw socket reading small pieces with pauses: its pace is what
is tested, so its reads are timed on purpose."""
from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from attack_app import PacedOrigin, paced_bytes
from harness import cachefetch_serve, fetch, wait_until

SIZE = 50 << 20
# The upstream sends at 25 MiB/s (2 s for the body): 250 times the leader's pace.
# Unpaced, a loopback origin sends 50 MiB in ~0.05 s, less than the proxy's own
# cost of hashing, writing and re-reading them; the claim here is that the
# followers go at the upstream's pace instead of the leader's, so the upstream
# is given a pace the proxy's overhead does not swamp.
RATE = 25 << 20
FOLLOWERS = 5
# 100 kB/s: 10 kB every 0.1 s.
LEADER_PIECE = 10_000
LEADER_PAUSE = 0.1


@pytest.fixture(scope="module")
def herd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("herd")
    with PacedOrigin() as origin:
        with cachefetch_serve(tmp, "--default-ttl", "forever", "--upstream", origin.url, "--store", str(tmp / "store"),
                              "--workers", "2", "--threads", "16") as server:
            yield server, origin


class Leader:
    """A client that sends its request, waits for the answer's head, then reads
    ``LEADER_PIECE`` bytes every ``LEADER_PAUSE`` s (``pace=False``: never again)."""

    def __init__(self, port: int, path: str, pace: bool) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # a small window, so the kernel's buffers do not read ahead for it
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(30)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.read = 0
        head = b""
        while b"\r\n\r\n" not in head:
            piece = self.sock.recv(LEADER_PIECE)
            assert piece, "the server closed before its answer's head"
            head += piece
        self.head, _, body = head.partition(b"\r\n\r\n")
        self.read = len(body)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if pace else None
        if self._thread:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(LEADER_PAUSE):  # the pace under test
            try:
                piece = self.sock.recv(LEADER_PIECE)
            except OSError:
                return
            if not piece:
                return
            self.read += len(piece)

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sock.close()


def upstream_time(origin: PacedOrigin, path: str) -> float:
    """The upstream's own time for the whole body, by the same client code."""
    direct = fetch(origin.port, path)
    assert direct.status == 200 and direct.complete and len(direct.body) == SIZE
    return direct.end - direct.start


@pytest.mark.parametrize("pace", [True, False], ids=["leader-100kBps", "leader-stops-reading"])
def test_followers_run_at_the_upstream_pace_whatever_the_leader_reads(herd, pace):
    server, origin = herd
    name = "slow" if pace else "stalled"
    path = f"/paced/{name}?size={SIZE}&rate={RATE}"
    own = upstream_time(origin, f"/paced/direct-{name}?size={SIZE}&rate={RATE}")
    expected = paced_bytes(f"/paced/{name}", SIZE)

    leader = Leader(server.port, path, pace)
    try:
        assert b" 200 " in leader.head.split(b"\r\n", 1)[0], leader.head[:200]
        assert b"cachefetch; fwd=miss" in leader.head, leader.head
        with ThreadPoolExecutor(FOLLOWERS) as pool:
            results = list(pool.map(lambda _: fetch(server.port, path), range(FOLLOWERS)))
        leader_read = leader.read
    finally:
        leader.close()

    times = [r.end - r.start for r in results]
    print(f"upstream's own time {own:.3f}s; followers {', '.join(f'{t:.3f}' for t in times)}s; "
          f"leader had read {leader_read} bytes")
    for r in results:
        assert r.status == 200 and r.complete and r.body == expected
    assert max(times) <= 1.5 * own, (own, times)
    assert leader_read < 1 << 20  # the followers did not wait for the leader's client
    assert origin.log.sent[f"/paced/{name}"] == SIZE
    wait_until(lambda: "; hit" in (fetch(server.port, path, method="HEAD").headers["Cache-Status"] or ""),
               timeout=10, what="the entry to be committed")
    stored = fetch(server.port, path)
    assert stored.headers["Cache-Status"].startswith("cachefetch; hit") and stored.body == expected
