"""A full disk: the store on a 5 MiB tmpfs, a 10 MiB file through `cachefetch serve`.

The client still gets the whole body, nothing is stored, the 'not caching'
warning is logged once (rate-limited), earlier hits keep working and the
server keeps answering."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from harness import cachefetch_serve, fetch, wait_until
from origin import Origin, Resource

from cachefetch.hashing import hash_bytes
from cachefetch.store import CAFS

WARNING = "not caching: writing"


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs mounted under tmp_path (needs root); unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs (mount exited {done.returncode}): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
        shutil.rmtree(mnt, ignore_errors=True)
        assert not os.path.ismount(mnt)


def wait_settled(store) -> None:
    inflight = os.path.join(store, "inflight")
    wait_until(lambda: os.path.isdir(inflight) and os.listdir(inflight) == [], what="in-flight fetches to settle")


def test_full_disk_streams_the_whole_body_stores_nothing_and_keeps_serving(tmp_path, small_disk):
    store = small_disk / "store"
    small = os.urandom(200_000)
    big = os.urandom(10 << 20)
    later = os.urandom(100_000)
    with Origin() as origin:
        origin.files["/f/small.bin"] = Resource(small)
        origin.files["/f/big.bin"] = Resource(big)
        origin.files["/f/later.bin"] = Resource(later)
        # one worker: the once-a-minute warning is per process
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url + "/f", "--store", str(store),
                              "--workers", "1", "--threads", "8") as server:
            first = fetch(server.port, "/small.bin")
            assert first.status == 200 and first.body == small
            wait_settled(store)
            assert {h.hex for h in CAFS(store)} == {hash_bytes(small).hex}

            for attempt in (1, 2):
                r = fetch(server.port, "/big.bin")
                assert r.status == 200, r.body[:200]
                assert r.complete and len(r.body) == len(big) and r.body == big
                assert origin.hits["/f/big.bin"] == attempt  # not stored, so fetched again
                wait_settled(store)
                assert hash_bytes(big).hex not in {h.hex for h in CAFS(store)}
                assert CAFS(store).temp_files() == []  # the partial temp file was removed

            log = server.log()
            assert log.count(WARNING) == 1, log[-4000:]

            hit = fetch(server.port, "/small.bin")
            assert hit.status == 200 and hit.body == small
            assert hit.headers["Cache-Status"].startswith("cachefetch; hit"), hit.headers["Cache-Status"]
            assert origin.hits["/f/small.bin"] == 1

            # space came back with the temp file gone: a new small file is stored again
            new = fetch(server.port, "/later.bin")
            assert new.status == 200 and new.body == later
            wait_settled(store)
            assert fetch(server.port, "/later.bin").headers["Cache-Status"].startswith("cachefetch; hit")
            assert fetch(server.port, "/-/healthz").status == 200
        assert server.proc.returncode == 0
    cafs = CAFS(store)
    assert cafs.verify() == []
    assert cafs.temp_files() == []
