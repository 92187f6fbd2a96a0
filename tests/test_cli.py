"""The ``cachefetch`` command line, run for real: verify, gc, stats, bad arguments.

Stores are built under tmp_path with the real CAFS and SQLiteIndex; the
request counters come from a real ``cachefetch serve`` in front of a local
origin.
"""
from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import add_entry

from harness import REPO_ROOT, cachefetch_serve, fetch, free_port, run_cli, wait_until
from origin import Origin, Resource

from cachefetch.index import SQLiteIndex
from cachefetch.store import CAFS

HOUR = 3600.0


# -- helpers ------------------------------------------------------------------

def keys(index: SQLiteIndex) -> set[str]:
    return {e.key for e in index}


def set_age(path: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def assert_one_line_error(result: subprocess.CompletedProcess) -> None:
    """Exit status 2, one line on stderr naming the program, no traceback anywhere."""
    context = f"stdout={result.stdout!r} stderr={result.stderr!r}"
    assert result.returncode == 2, context
    assert "Traceback" not in result.stderr + result.stdout, context
    lines = result.stderr.splitlines()
    assert len(lines) == 1, context
    assert lines[0].startswith("cachefetch"), context
    assert "error" in lines[0], context


_LEADER = r"""
import os, sys
from cachefetch.inflight import Flights
root = sys.argv[1]
lead = Flights(root).lead("a live fetch")
temp = os.path.join(root, "tmp", lead.temp_prefix + "body.part")
with open(temp, "wb") as f:
    f.write(b"the first half of a body")
print(lead.path, temp, flush=True)
sys.stdin.read()
lead.release()
"""


@contextlib.contextmanager
def live_flight(root: str):
    """A real leader in a child process: it holds its journal's lock and writes a temp file.

    Yields ``(proc, journal_path, temp_path)``; closing stdin ends it cleanly.
    """
    proc = subprocess.Popen([sys.executable, "-c", _LEADER, root], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    try:
        line = proc.stdout.readline()  # written once the lock is held and the temp file exists
        assert line, f"the leader process failed (exit {proc.wait()})"
        journal, temp = line.split()
        yield proc, journal, temp
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()


def lock_is_held(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def plant_damage(store: CAFS, index: SQLiteIndex) -> dict:
    """Two sound entries, then one of each kind of damage and leftover."""
    planted = {"good": [add_entry(store, index, "good-1", b"good one\n" * 100),
                        add_entry(store, index, "good-2", b"good two\n" * 300)]}
    corrupt = planted["corrupt"] = add_entry(store, index, "corrupt", b"soon corrupt\n" * 50)
    path = store.path(corrupt.hash)
    os.chmod(path, 0o644)  # blobs are read-only; damage comes from below the store
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"BITROT")
    os.chmod(path, 0o444)
    missing = planted["missing"] = add_entry(store, index, "missing", b"lost blob\n" * 20)
    os.unlink(store.path(missing.hash))

    # A killed leader: a journal with records under no lock, and its temp file.
    inflight = os.path.join(store.root, "inflight")
    os.makedirs(inflight, exist_ok=True)
    dead_fid = "0123456789abcdef"
    journal = os.path.join(inflight, "d" * 40 + ".lock")
    with open(journal, "w") as f:
        f.write('L {"fid":"%s","pid":999999}\nH {"status":"200 OK","headers":[],"body":null}\n' % dead_fid)
    dead_temp = os.path.join(store.temp_dir, f"cf-{dead_fid}-xyz.part")
    with open(dead_temp, "wb") as f:
        f.write(b"half")
    # A flight temp file whose flight id no journal names at all.
    stray = os.path.join(store.temp_dir, "cf-fedcba9876543210-xyz.part")
    with open(stray, "wb") as f:
        f.write(b"stray")
    # A put() temp file left two hours ago, and one being written now.
    old_put = os.path.join(store.temp_dir, "cf-xxxx.tmp")
    with open(old_put, "wb") as f:
        f.write(b"old")
    set_age(old_put, 2 * HOUR)
    young_put = os.path.join(store.temp_dir, "cf-yyyy.tmp")
    with open(young_put, "wb") as f:
        f.write(b"young")
    planted["orphans"] = [journal, dead_temp, stray, old_put]
    planted["young_put"] = young_put
    return planted


# -- verify -------------------------------------------------------------------

def test_verify_clean_store_is_sound(cafs):
    store, index = cafs
    for i in range(3):
        add_entry(store, index, f"k{i}", bytes([i]) * 1000)
    result = run_cli("verify", "--store", store.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "store is sound" in result.stdout
    assert "checked 3 blobs" in result.stdout
    assert "corrupt" not in result.stdout and "orphan" not in result.stdout
    assert re.search(r"verifying \[#+\] 3/3 blobs", result.stderr), result.stderr  # the progress bar
    assert "verifying" not in result.stdout
    assert "Traceback" not in result.stderr


def test_verify_empty_store_is_sound(cafs):
    store, _ = cafs
    result = run_cli("verify", "--store", store.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked 0 blobs" in result.stdout and "store is sound" in result.stdout


def test_verify_reports_damage_and_without_repair_leaves_it(cafs):
    store, index = cafs
    planted = plant_damage(store, index)
    corrupt, missing = planted["corrupt"], planted["missing"]
    corrupt_bytes = open(store.path(corrupt.hash), "rb").read()
    with live_flight(store.root) as (leader, live_journal, live_temp):
        set_age(live_temp, 2 * HOUR)  # a live fetch's file is kept however old it looks
        result = run_cli("verify", "--store", store.root)
        out = result.stdout
        assert result.returncode == 1, out + result.stderr
        assert f"corrupt blob {corrupt.hash.hex} (found)" in out
        assert f"entry missing points at missing blob {missing.hash.hex} (found)" in out
        assert "damage found: 1 corrupt blobs, 1 entries without a blob" in out
        assert "store is sound" not in out
        assert re.search(r"verifying \[#+\] 3/3 blobs", result.stderr), result.stderr
        for path in planted["orphans"]:
            assert f"cleared orphan {path}\n" in out
            assert not os.path.exists(path)
        assert out.count("cleared orphan") == len(planted["orphans"])
        # Nothing a live fetch owns, and no young put() temp file, is touched.
        for path in (live_journal, live_temp, planted["young_put"]):
            assert os.path.exists(path), path
            assert path not in out
        assert lock_is_held(live_journal)
        assert leader.poll() is None
        # Without --repair the damage stays where it was.
        assert open(store.path(corrupt.hash), "rb").read() == corrupt_bytes
        assert keys(index) == {"good-1", "good-2", "corrupt", "missing"}

        again = run_cli("verify", "--store", store.root)
        assert again.returncode == 1
        assert f"corrupt blob {corrupt.hash.hex} (found)" in again.stdout
        assert "cleared orphan" not in again.stdout  # they were cleared the first time
        assert os.path.exists(live_journal) and os.path.exists(live_temp)


def test_verify_repair_removes_damage_then_the_store_is_sound(cafs):
    store, index = cafs
    planted = plant_damage(store, index)
    corrupt, missing = planted["corrupt"], planted["missing"]
    with live_flight(store.root) as (leader, live_journal, live_temp):
        result = run_cli("verify", "--repair", "--store", store.root)
        out = result.stdout
        assert result.returncode == 1, out + result.stderr
        assert f"corrupt blob {corrupt.hash.hex} (removed)" in out
        assert f"entry missing points at missing blob {missing.hash.hex} (removed)" in out
        assert "damage removed: 1 corrupt blobs, 1 entries without a blob" in out
        assert not store.exists(corrupt.hash)
        assert keys(index) == {"good-1", "good-2"}
        assert all(store.exists(e.hash) for e in planted["good"])
        for path in planted["orphans"]:
            assert f"cleared orphan {path}\n" in out and not os.path.exists(path)
        assert os.path.exists(planted["young_put"])
        assert os.path.exists(live_journal) and os.path.exists(live_temp) and lock_is_held(live_journal)

        again = run_cli("verify", "--store", store.root)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "store is sound" in again.stdout and "checked 2 blobs" in again.stdout
        assert os.path.exists(live_journal) and os.path.exists(live_temp)

        # The leader is killed mid-fetch: what it owned becomes a leftover, cleared by the next verify.
        leader.send_signal(signal.SIGKILL)
        leader.wait(timeout=10)
        after = run_cli("verify", "--store", store.root)
        assert after.returncode == 0, after.stdout + after.stderr
        assert f"cleared orphan {live_journal}\n" in after.stdout
        assert f"cleared orphan {live_temp}\n" in after.stdout
        assert not os.path.exists(live_journal) and not os.path.exists(live_temp)


# -- gc -----------------------------------------------------------------------

def test_gc_command_evicts_least_recently_used_down_to_the_size(cafs):
    store, index = cafs
    now = time.time()
    k = 64 << 10  # blobs well above the few pages the index grows by as it is written
    ages = {"a": 2 * HOUR, "b": 4 * HOUR, "c": 1 * HOUR, "d": 3 * HOUR}
    entries = {key: add_entry(store, index, key, key.encode() * k, last_used=now - age) for key, age in ages.items()}
    add_entry(store, index, "in-use", b"u" * k)  # used just now: never evicted
    run_cli("gc", "--store", store.root, "--max-size", "1T", "--policy", "lru")  # admits; evicts nothing
    own = index.usage().index_bytes + index.usage().wal_bytes  # the index's own file counts in the size
    result = run_cli("gc", "--store", store.root, "--max-size", str(own + 3 * k + k // 2), "--policy", "lru")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"[\d.]+ KiB -> [\d.]+ KiB \(lru\): 2 entries evicted, 0 expired purged, "
                        r"2 blobs removed\n", result.stdout), result.stdout
    assert keys(index) == {"a", "c", "in-use"}
    assert not store.exists(entries["b"].hash) and not store.exists(entries["d"].hash)

    result = run_cli("gc", "--store", store.root, "--max-size", "0", "--policy", "lru")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(lru): 2 entries evicted, 0 expired purged, 2 blobs removed\n" in result.stdout
    assert keys(index) == {"in-use"}

    result = run_cli("gc", "--store", store.root, "--max-size", "20G")
    assert "(s3fifo): 0 entries evicted, 0 expired purged, 0 blobs removed\n" in result.stdout
    result = run_cli("gc", "--store", store.root, "--max-size", "20G", "--policy", "mru")
    assert result.returncode == 2 and "invalid choice" in result.stderr


# -- stats --------------------------------------------------------------------

def stats(store_dir: str) -> tuple[dict, dict]:
    """``cachefetch stats --json`` and the table, parsed."""
    as_json = run_cli("stats", "--json", "--store", store_dir)
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    table = run_cli("stats", "--store", store_dir)
    assert table.returncode == 0, table.stdout + table.stderr
    rows = dict(line.split(None, 1) for line in table.stdout.splitlines())
    return json.loads(as_json.stdout), rows


def test_stats_of_a_store_that_never_served(cafs):
    store, index = cafs
    shared = b"s" * 1000
    add_entry(store, index, "a", shared)
    add_entry(store, index, "b", shared)      # two entries, one blob
    add_entry(store, index, "c", b"c" * 500)
    store.put(b"o" * 48)                 # a blob no entry points at: stats does not walk the store
    own = index.usage().index_bytes + index.usage().wal_bytes
    data, rows = stats(store.root)
    assert data.pop("index_bytes") >= own > 0
    assert data == {"store": store.root, "entries": 3, "blobs": 2, "bytes": 1500,
                    "hits": 0, "misses": 0, "collapsed": 0, "stale": 0}
    assert rows["entries"] == "3" and rows["blobs"] == "2" and rows["bytes"] == "1.5 KiB"
    assert rows["index_bytes"].endswith("KiB")
    assert rows["hits"] == rows["misses"] == rows["collapsed"] == "0"


def _start_leader(port: int, path: str) -> tuple[socket.socket, bytes, bytes]:
    """Send a GET on a socket with a tiny receive buffer, read only the response head.

    The client then stops reading: the proxy's writes block, so the fetch
    stays in flight with part of the body on disk.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(1024)
        assert data, "the proxy closed the leader's connection"
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    return sock, head, body


def test_stats_counts_hits_misses_and_collapsed_of_a_real_serve(tmp_path):
    store_dir = str(tmp_path / "store")
    small = os.urandom(100_000)
    big = os.urandom(24 << 20)  # far more than the socket buffers hold
    with Origin() as origin:
        origin.files["/pkg/small.bin"] = Resource(small)
        # The fetch runs at the origin's pace, not the leader client's: the origin holds
        # the rest of the body until the follower has joined.
        resume = threading.Event()
        origin.files["/pkg/big.bin"] = Resource(big, pause_after=1 << 20, resume=resume)
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url, "--store", store_dir, "--workers", "2",
                              "--threads", "4") as server:
            index = SQLiteIndex(os.path.join(store_dir, "index.sqlite3"))
            try:
                miss = fetch(server.port, "/pkg/small.bin")
                assert miss.status == 200 and miss.body == small, server.log()
                assert "fwd=miss" in miss.headers["Cache-Status"]
                wait_until(lambda: len(index) == 1, what="the miss to be committed")
                for _ in range(2):
                    hit = fetch(server.port, "/pkg/small.bin")
                    assert hit.status == 200 and hit.body == small
                    assert "; hit" in hit.headers["Cache-Status"]
                assert origin.hits["/pkg/small.bin"] == 1

                # A follower joins a fetch whose leader's client is stalled mid-body.
                leader, head, leader_body = _start_leader(server.port, "/pkg/big.bin")
                with leader, contextlib.ExitStack() as unblock:
                    unblock.callback(resume.set)  # whatever fails, the origin's thread goes on
                    assert head.startswith(b"HTTP/1.1 200"), head
                    assert b"fwd=miss" in head
                    follower_head = threading.Event()
                    follower: dict = {}

                    def follow() -> None:
                        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                        try:
                            conn.request("GET", "/pkg/big.bin")
                            resp = conn.getresponse()
                            follower["status"] = resp.status
                            follower["cache_status"] = resp.headers["Cache-Status"]
                            follower_head.set()
                            follower["body"] = resp.read()
                        except Exception as exc:  # reported by the assertions below
                            follower["error"] = exc
                        finally:
                            follower_head.set()
                            conn.close()

                    thread = threading.Thread(target=follow, daemon=True)
                    thread.start()
                    assert follower_head.wait(30), "the follower got no response head"
                    assert "error" not in follower, follower.get("error")
                    assert follower["status"] == 200
                    assert "collapsed" in follower["cache_status"], follower["cache_status"]
                    resume.set()
                    # Now let the leader's client read at full speed: both get the whole body.
                    leader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                    while len(leader_body) < len(big):
                        data = leader.recv(1 << 20)
                        if not data:
                            break
                        leader_body += data
                    assert leader_body == big
                thread.join(60)
                assert not thread.is_alive()
                assert "error" not in follower, follower.get("error")
                assert follower["body"] == big
                assert origin.hits["/pkg/big.bin"] == 1
                wait_until(lambda: len(index) == 2, what="the big fetch to be committed")
            finally:
                index.close()

            expected = {"entries": 2, "blobs": 2, "bytes": len(small) + len(big),
                        "hits": 2, "misses": 2, "collapsed": 1, "stale": 0}
            data, rows = stats(store_dir)
            assert {k: data[k] for k in expected} == expected, data
            assert data["store"] == store_dir
        assert server.proc.returncode == 0, server.log()  # SIGTERM: a clean exit

    # The counters outlive the server.
    data, rows = stats(store_dir)
    assert {k: data[k] for k in expected} == expected, data
    assert (rows["hits"], rows["misses"], rows["collapsed"]) == ("2", "2", "1")
    assert rows["entries"] == "2" and rows["blobs"] == "2" and rows["bytes"] == "24.1 MiB"


# -- bad arguments --------------------------------------------------------------

BAD_SERVE = [
    pytest.param((), id="missing-upstream"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--protocol", "ftp"), id="unknown-protocol"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--max-size", "lots"), id="max-size-junk"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--max-size", "-5G"), id="max-size-negative"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--bind", "localhost"), id="bind-no-port"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--bind", ":8080"), id="bind-no-host"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--bind", "127.0.0.1:99999"), id="bind-port-range"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--bind", "127.0.0.1:http"), id="bind-port-name"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--workers", "0"), id="workers-0"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--workers", "two"), id="workers-word"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--threads", "-1"), id="threads-negative"),
    pytest.param(("--upstream", "ftp://127.0.0.1/"), id="upstream-not-http"),
    pytest.param(("--upstream", "not a url"), id="upstream-junk"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--index-ttl", "soon"), id="index-ttl-junk"),
    pytest.param(("--upstream", "http://127.0.0.1:99999"), id="upstream-port-range"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--negative-ttl", "-1"), id="negative-ttl-negative"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--log-level", "loud"), id="log-level-junk"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--max-object-size", "0"), id="max-object-size-0"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--max-object-size", "none"), id="max-object-size-none"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--max-object-size", "-1M"), id="max-object-size-negative"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--max-size", "1G", "--max-object-size", "2G"),
                 id="max-object-size-over-max-size"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--header-timeout", "0"), id="header-timeout-0"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--fetch-timeout", "0"), id="fetch-timeout-0"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--idle-timeout", "never"), id="idle-timeout-word"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--send-timeout", "soon"), id="send-timeout-junk"),
    pytest.param(("--upstream", "http://127.0.0.1:9", "--graceful-timeout", "-4"), id="graceful-timeout-negative"),
]


@pytest.mark.parametrize("args", BAD_SERVE)
def test_bad_serve_arguments_exit_2_with_one_line(tmp_path, args):
    # A free port and a store of its own, so a wrongly accepted command cannot collide with anything.
    # (a later --bind in args overrides this one)
    full = ["serve", "--store", str(tmp_path / "store"), "--bind", f"127.0.0.1:{free_port()}", *args]
    result = run_cli(*full, timeout=30)
    assert_one_line_error(result)


def test_serve_with_a_file_as_store_exits_2(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("not a store")
    result = run_cli("serve", "--upstream", "http://127.0.0.1:9", "--store", str(not_a_dir),
                     "--bind", f"127.0.0.1:{free_port()}", timeout=30)
    assert_one_line_error(result)
    assert not_a_dir.read_text() == "not a store"


@pytest.mark.parametrize("args", [
    pytest.param(("frobnicate",), id="unknown-subcommand"),
    pytest.param((), id="no-subcommand"),
    pytest.param(("--store", "x"), id="option-without-subcommand"),
    pytest.param(("gc",), id="gc-without-max-size"),
    pytest.param(("stats", "--frobnicate"), id="stats-unknown-option"),
    pytest.param(("verify", "extra"), id="verify-extra-argument"),
])
def test_bad_command_line_exits_2_with_one_line(args):
    assert_one_line_error(run_cli(*args, timeout=30))


@pytest.mark.parametrize("command", [("stats",), ("stats", "--json"), ("verify",), ("verify", "--repair"),
                                     ("gc", "--max-size", "1G")])
def test_missing_store_exits_2_and_creates_nothing(tmp_path, command):
    missing = tmp_path / "no-such-store"
    result = run_cli(*command, "--store", str(missing), timeout=30)
    assert_one_line_error(result)
    assert "no store at" in result.stderr and str(missing) in result.stderr
    assert not missing.exists()


def test_store_that_is_a_file_exits_2(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for command in (("stats",), ("verify",), ("gc", "--max-size", "1G")):
        assert_one_line_error(run_cli(*command, "--store", str(not_a_dir), timeout=30))


def test_gc_max_size_junk_exits_2(cafs):
    store, index = cafs
    add_entry(store, index, "a", b"a" * 100, last_used=time.time() - HOUR)
    for junk in ("junk", "5X", "-1", "1.2.3", ""):
        result = run_cli("gc", "--store", store.root, "--max-size", junk, timeout=30)
        assert_one_line_error(result)
        assert "--max-size" in result.stderr
    assert keys(index) == {"a"}  # nothing was collected


def test_stats_on_a_store_with_a_broken_index_exits_2(tmp_path):
    root = tmp_path / "store"
    CAFS(root)
    (root / "index.sqlite3").write_bytes(b"this is not an SQLite database" * 100)
    for command in (("stats",), ("verify",)):  # the commands that only look do not repair
        result = run_cli(*command, "--store", str(root), timeout=30)
        assert_one_line_error(result)
        assert "index" in result.stderr


@pytest.mark.parametrize("command", [("verify", "--repair"), ("gc", "--max-size", "1G")])
def test_repairing_commands_move_a_damaged_index_aside_and_rebuild_it(tmp_path, command):
    root = tmp_path / "store"
    store = CAFS(root)
    kept = store.put(b"a blob the damaged index pointed at")
    (root / "index.sqlite3").write_bytes(b"this is not an SQLite database" * 100)
    result = run_cli(*command, "--store", str(root), timeout=30)
    assert result.returncode == (1 if command[0] == "verify" else 0), result.stdout + result.stderr
    assert result.stderr.count("is damaged") == 1  # logged once
    aside = [p for p in os.listdir(root) if p.startswith("index.sqlite3.damaged-")]
    assert len(aside) == 1
    assert SQLiteIndex(root / "index.sqlite3", heal=False).totals()[0] == 0  # a sound, empty index
    assert command[0] == "gc" or store.exists(kept.hash)  # blobs kept for gc


# -- serve's limits, access log, counters across runs ------------------------------

@pytest.mark.parametrize("args, expected", [
    ((), 8 << 30),                                          # no --max-size: the fixed cap
    (("--max-size", "20G"), (20 << 30) // 8),               # 1/8 of the store
    (("--max-size", "20G", "--max-object-size", "5G"), 5 << 30),
    (("--max-object-size", "unlimited"), None),
    (("--max-object-size", "Unlimited", "--max-size", "1G"), None),
])
def test_max_object_size_defaults_to_an_eighth_of_max_size_or_a_fixed_cap(args, expected):
    from cachefetch.cli import build_parser, max_object_size

    parsed = build_parser().parse_args(["serve", "--upstream", "http://127.0.0.1:9", *args])
    assert max_object_size(parsed) == expected


def test_serve_stores_nothing_larger_than_max_object_size(tmp_path):
    store_dir = str(tmp_path / "store")
    small, large = os.urandom(50_000), os.urandom(300_000)
    with Origin() as origin:
        origin.files["/small.bin"] = Resource(small)
        origin.files["/large.bin"] = Resource(large)
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url, "--store", store_dir,
                              "--max-object-size", "100K") as server:
            first = fetch(server.port, "/large.bin")
            assert first.body == large and first.headers["Cache-Status"] == "cachefetch; fwd=miss; detail=too-large"
            assert fetch(server.port, "/small.bin").body == small
            index = SQLiteIndex(os.path.join(store_dir, "index.sqlite3"))
            try:
                # keys are the exact upstream URLs the proxy fetched
                wait_until(lambda: keys(index) == {origin.url + "/small.bin"}, what="the small body to be stored")
            finally:
                index.close()
            again = fetch(server.port, "/large.bin")
            assert again.body == large and "fwd=miss" in again.headers["Cache-Status"]
    assert origin.hits["/large.bin"] == 2 and origin.hits["/small.bin"] == 1


def _access_lines(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def test_access_log_lines_carry_cache_status_and_the_body_bytes_really_sent(tmp_path):
    body = os.urandom(32 << 20)  # far more than socket buffers hold, so a client that leaves early shows
    access_log = str(tmp_path / "access.log")
    with Origin() as origin:
        origin.files["/big.bin"] = Resource(body)
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url, "--store", str(tmp_path / "store"),
                              "--access-log", access_log) as server:
            assert fetch(server.port, "/big.bin").body == body  # the miss
            wait_until(lambda: "; hit" in fetch(server.port, "/big.bin", method="HEAD").headers["Cache-Status"],
                       what="the body to be committed")
            assert fetch(server.port, "/big.bin").body == body  # a sendfile hit, read to the end
            partial = fetch(server.port, "/big.bin", stop_after=1 << 20)  # a hit the client leaves early
            assert not partial.complete
            wait_until(lambda: sum('"GET ' in line for line in _access_lines(access_log)) == 3,
                       what="a log line for each GET")
    lines = _access_lines(access_log)
    pattern = re.compile(r'"(?P<method>[A-Z]+) /big.bin HTTP/1.1" (?P<status>\d+) (?P<sent>\d+) .* '
                         r'"(?P<cache_status>[^"]*)" \d+ms$')
    parsed = [pattern.search(line) for line in lines]
    assert all(parsed), lines
    get_lines = [m for m in parsed if m["method"] == "GET"]
    miss, hit, left = get_lines
    assert (miss["cache_status"], int(miss["sent"])) == ("cachefetch; fwd=miss; stored", len(body))
    assert hit["cache_status"].startswith("cachefetch; hit") and int(hit["sent"]) == len(body)
    assert left["cache_status"].startswith("cachefetch; hit")
    assert (1 << 20) <= int(left["sent"]) < len(body)  # what the kernel took, not what was announced


def test_cache_status_off_keeps_the_field_out_of_answers_and_in_the_access_log(tmp_path):
    body = os.urandom(100_000)
    access_log = str(tmp_path / "access.log")
    with Origin() as origin:
        origin.files["/f.bin"] = Resource(body)
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url,
                              "--store", str(tmp_path / "store"), "--cache-status", "off",
                              "--access-log", access_log) as server:
            answers = [fetch(server.port, "/f.bin")]  # the miss

            def a_hit_is_logged() -> bool:
                answers.append(fetch(server.port, "/f.bin"))
                return any('"cachefetch; hit' in line for line in _access_lines(access_log))

            wait_until(a_hit_is_logged, what="a hit in the access log")
    assert all(r.body == body and "Cache-Status" not in r.headers for r in answers)
    assert origin.hits["/f.bin"] == 1
    first = next(line for line in _access_lines(access_log) if '"GET /f.bin' in line)
    assert '"cachefetch; fwd=miss; stored"' in first


def test_stats_counters_add_up_over_restarts_and_a_start_folds_a_run_once(tmp_path):
    store_dir = str(tmp_path / "store")
    body = os.urandom(10_000)
    with Origin() as origin:
        origin.files["/f.bin"] = Resource(body)

        def run(hits: int) -> None:
            with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url, "--store", store_dir) as server:
                for _ in range(hits):
                    wait_until(lambda: "; hit" in fetch(server.port, "/f.bin").headers["Cache-Status"],
                               what="a hit")

        run(1)  # a miss, then hits until one
        first, _ = stats(store_dir)
        assert first["misses"] == 1 and first["hits"] >= 1
        run(2)
        second, _ = stats(store_dir)
        assert second["misses"] == 1 and second["hits"] == first["hits"] + 2

        # A start that folded the last run but died before clearing its directory:
        # neither stats nor the next start may count that run twice.
        metrics = os.path.join(store_dir, "metrics")
        kept = str(tmp_path / "kept-metrics")
        shutil.copytree(metrics, kept)
        run(0)  # folds run 2
        shutil.rmtree(metrics)
        shutil.copytree(kept, metrics)  # run 2's directory, already folded, is back
        assert stats(store_dir)[0]["hits"] == second["hits"]
        run(0)
        assert stats(store_dir)[0]["hits"] == second["hits"]
