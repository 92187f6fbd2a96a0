"""`cachefetch serve` stops cleanly on Ctrl-C (SIGINT) and SIGTERM: exit 0, commits landed."""
from __future__ import annotations

import os
import signal

import pytest

from harness import cachefetch_serve, fetch
from origin import Origin, Resource

from cachefetch.hashing import hash_bytes
from cachefetch.store import CAFS


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_exits_0_with_the_fetched_body_committed(tmp_path, sig):
    body = os.urandom(3 << 20)
    store = tmp_path / "store"
    with Origin() as origin:
        origin.files["/f.bin"] = Resource(body)
        with cachefetch_serve(tmp_path, "--upstream", origin.url, "--store", str(store), "--threads", "4") as server:
            r = fetch(server.port, "/f.bin")
            assert r.complete and r.body == body
            # Stop at once: the commit may still be queued; the worker's exit hook lets it land.
            server.proc.send_signal(sig)
            assert server.proc.wait(timeout=30) == 0, server.log()
    assert CAFS(store).exists(hash_bytes(body))
    assert CAFS(store).verify() == [] and CAFS(store).temp_files() == []
    assert os.listdir(store / "inflight") == []
