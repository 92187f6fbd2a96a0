"""cachefetch.store: the CAFS content-addressable file store."""
from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

import cachefetch.store as store_module
from cachefetch.hashing import Hash, hash_bytes, hash_file
from cachefetch.store import CAFS, Blob, BlobNotFound, IntegrityError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_temp(store: CAFS, data: bytes) -> str:
    f, path = store.new_temp()
    with f:
        f.write(data)
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env


def blob_files(store: CAFS) -> list[str]:
    """Every regular file under blobs/, whatever its name."""
    out = []
    for dirpath, _, files in os.walk(store.blobs_dir):
        out.extend(os.path.join(dirpath, f) for f in files)
    return out


# -- layout, put ----------------------------------------------------------

def test_new_store_creates_blobs_and_tmp(tmp_path):
    s = CAFS(tmp_path / "a" / "b")
    assert os.path.isdir(tmp_path / "a" / "b" / "blobs")
    assert os.path.isdir(tmp_path / "a" / "b" / "tmp")
    assert s.temp_dir == str(tmp_path / "a" / "b" / "tmp")


def test_put_bytes(store):
    data = b"hello, cafs\n"
    blob = store.put(data)
    h = hash_bytes(data)
    assert blob == Blob(h, len(data))
    assert store.path(h) == os.path.join(store.root, "blobs", h.shard, h.hex)
    with open(store.path(h), "rb") as f:
        assert f.read() == data
    with store.open(h) as f:
        assert f.read() == data
    assert store.exists(h) and h in store
    assert store.size(h) == len(data)
    assert stat.S_IMODE(os.stat(store.path(h)).st_mode) == 0o444
    assert store.temp_files() == []


def test_put_binary_file_objects(store, tmp_path):
    data = os.urandom((2 << 20) + 123)  # more than one 1 MiB read
    blob = store.put(io.BytesIO(data))
    assert blob == Blob(hash_bytes(data), len(data))
    path = tmp_path / "src"
    path.write_bytes(data[::-1])
    with open(path, "rb") as f:
        blob2 = store.put(f)
    assert blob2 == Blob(hash_bytes(data[::-1]), len(data))
    assert sorted(store, key=str) == sorted([blob.hash, blob2.hash], key=str)
    assert store.temp_files() == []


def test_put_empty(store):
    blob = store.put(b"")
    assert blob.size == 0 and store.size(blob.hash) == 0


def test_put_rejects_str_and_text_files(store):
    with pytest.raises(TypeError):
        store.put("text")
    with pytest.raises(TypeError):
        store.put(io.StringIO("text"))
    assert store.temp_files() == []
    assert list(store) == []


# -- commit ---------------------------------------------------------------

def test_commit_without_expected_hashes_the_file(store):
    data = os.urandom(10000)
    tmp = write_temp(store, data)
    blob = store.commit(tmp)
    assert blob == Blob(hash_bytes(data), len(data))
    assert not os.path.exists(tmp)
    assert store.open(blob.hash).read() == data


def test_commit_with_matching_expected(store):
    data = b"expected content"
    tmp = write_temp(store, data)
    blob = store.commit(tmp, hash_bytes(data))
    assert blob == Blob(hash_bytes(data), len(data))
    assert not os.path.exists(tmp)
    assert store.open(blob.hash).read() == data


def test_commit_trusted_renames_without_reading(store, monkeypatch):
    data = b"trusted content"
    tmp = write_temp(store, data)
    ino = os.stat(tmp).st_ino

    def no_hashing(*args, **kwargs):
        raise AssertionError("commit(trusted=True) read the file again")

    monkeypatch.setattr(store_module, "hash_file", no_hashing)
    monkeypatch.setattr(store_module, "Hasher", no_hashing)
    blob = store.commit(tmp, hash_bytes(data), trusted=True)
    assert blob == Blob(hash_bytes(data), len(data))
    # A rename, not a copy: the blob is the very inode that was written.
    assert os.stat(store.path(blob.hash)).st_ino == ino
    assert not os.path.exists(tmp)


def test_commit_trusted_needs_expected(store):
    tmp = write_temp(store, b"x")
    with pytest.raises(ValueError):
        store.commit(tmp, trusted=True)


def test_commit_mismatch_raises_integrity_error_and_deletes_temp(store):
    tmp = write_temp(store, b"actual content")
    wrong = hash_bytes(b"other content")
    with pytest.raises(IntegrityError) as info:
        store.commit(tmp, wrong)
    assert isinstance(info.value, ValueError)
    assert not os.path.exists(tmp)
    assert store.temp_files() == []
    assert list(store) == []
    assert not store.exists(wrong)


def test_commit_rejects_non_hash_expected(store):
    tmp = write_temp(store, b"x")
    with pytest.raises(TypeError):
        store.commit(tmp, hash_bytes(b"x").hex)


def test_commit_missing_file_raises(store):
    with pytest.raises(FileNotFoundError):
        store.commit(os.path.join(store.temp_dir, "absent"))


def test_second_commit_of_same_content_keeps_one_blob_and_removes_temp(store):
    data = os.urandom(4096)
    first = store.commit(write_temp(store, data))
    ino = os.stat(store.path(first.hash)).st_ino
    tmp2 = write_temp(store, data)
    second = store.commit(tmp2)
    assert first == second
    assert not os.path.exists(tmp2)
    assert store.temp_files() == []
    assert blob_files(store) == [store.path(first.hash)]
    assert os.stat(store.path(first.hash)).st_ino == ino  # the first blob was kept


def test_commit_from_another_filesystem(store):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm to put a temp file on another filesystem")
    if os.stat(shm).st_dev == os.stat(store.temp_dir).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test's tmp_path")
    data = os.urandom((1 << 20) + 17)
    fd, src = tempfile.mkstemp(prefix="cachefetch-test-", dir=shm)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        blob = store.commit(src, hash_bytes(data))
        assert blob == Blob(hash_bytes(data), len(data))
        assert not os.path.exists(src)  # consumed, like a rename would
        assert store.open(blob.hash).read() == data
        assert store.temp_files() == []
        assert os.stat(store.path(blob.hash)).st_dev == os.stat(store.temp_dir).st_dev

        # With a wrong expected hash it is still an IntegrityError and nothing stays behind.
        fd, src2 = tempfile.mkstemp(prefix="cachefetch-test-", dir=shm)
        with os.fdopen(fd, "wb") as f:
            f.write(b"other")
        with pytest.raises(IntegrityError):
            store.commit(src2, hash_bytes(b"not other"), trusted=True)
        assert not os.path.exists(src2)
        assert store.temp_files() == []
        assert list(store) == [blob.hash]
    finally:
        for p in (src, locals().get("src2")):
            if p and os.path.exists(p):
                os.unlink(p)


# -- reading, deleting, iterating -------------------------------------------

def test_blob_not_found_is_keyerror_and_filenotfounderror(store):
    h = hash_bytes(b"never stored")
    assert issubclass(BlobNotFound, KeyError)
    assert issubclass(BlobNotFound, FileNotFoundError)
    with pytest.raises(KeyError):
        store.open(h)
    with pytest.raises(FileNotFoundError):
        store.open(h)
    with pytest.raises(BlobNotFound):
        store.size(h)
    assert not store.exists(h)
    assert h not in store


def test_delete_present_and_absent(store):
    blob = store.put(b"to delete")
    assert store.delete(blob.hash) is True
    assert not store.exists(blob.hash)
    assert store.delete(blob.hash) is False  # absent: no error
    assert store.delete(hash_bytes(b"never stored")) is False


def test_iteration_yields_every_stored_hash_and_skips_non_blobs(store):
    hashes = {store.put(b"blob %d" % i).hash for i in range(20)}
    # Things under blobs/ that are not blobs must not be listed.
    h = next(iter(hashes))
    wrong_shard = "00" if h.shard != "00" else "01"
    os.makedirs(os.path.join(store.blobs_dir, wrong_shard), exist_ok=True)
    open(os.path.join(store.blobs_dir, wrong_shard, h.hex), "wb").close()
    open(os.path.join(store.blobs_dir, h.shard, "README"), "wb").close()
    open(os.path.join(store.blobs_dir, h.shard, h.hex.upper()), "wb").close()
    open(os.path.join(store.blobs_dir, "stray-file"), "wb").close()
    listed = list(store)
    assert len(listed) == len(hashes)
    assert set(listed) == hashes


@pytest.mark.parametrize("bad", ["../../etc/passwd", hash_bytes(b"x").hex, b"\0" * 32, None])
def test_path_refuses_anything_but_a_hash(store, bad):
    with pytest.raises(TypeError):
        store.path(bad)
    with pytest.raises(TypeError):
        store.exists(bad)
    with pytest.raises(TypeError):
        store.open(bad)
    with pytest.raises(TypeError):
        store.delete(bad)


# -- verify ----------------------------------------------------------------

def test_verify_finds_a_blob_corrupted_on_disk(store):
    good = store.put(b"good blob")
    bad = store.put(b"soon corrupt")
    assert store.verify() == []
    path = store.path(bad.hash)
    os.chmod(path, 0o644)  # blobs are stored read-only
    with open(path, "r+b") as f:
        f.write(b"S")
    assert store.verify() == [bad.hash]
    assert store.exists(bad.hash)  # remove=False keeps it
    assert store.verify(remove=True) == [bad.hash]
    assert not store.exists(bad.hash)
    assert store.exists(good.hash)
    assert store.verify() == []


@pytest.mark.parametrize("workers", [1, 3])
def test_verify_with_several_threads_finds_every_corrupt_blob_and_reports_each_in_order(store, workers):
    blobs = [store.put(f"blob {i}".encode() * 1000) for i in range(40)]
    corrupt = {b.hash for b in blobs[::7]}
    for h in corrupt:
        os.chmod(store.path(h), 0o644)
        with open(store.path(h), "r+b") as f:
            f.write(b"X")
    seen = []
    assert set(store.verify(workers=workers, on_blob=lambda done, total, size: seen.append((done, total)))) == corrupt
    assert seen == [(i, 40) for i in range(1, 41)]


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_verify_refuses_a_bad_thread_count(store, workers):
    with pytest.raises(ValueError):
        store.verify(workers=workers)


# -- concurrency and crash safety ------------------------------------------

def test_threads_committing_the_same_content_leave_one_blob(store):
    data = os.urandom(256 * 1024)
    n = 16
    temps = [write_temp(store, data) for _ in range(n)]
    barrier = threading.Barrier(n)
    results: list[Blob | BaseException] = [None] * n  # type: ignore[list-item]

    def commit(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = store.commit(temps[i], hash_bytes(data) if i % 2 else None)
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [Blob(hash_bytes(data), len(data))] * n
    assert blob_files(store) == [store.path(hash_bytes(data))]
    assert store.temp_files() == []
    assert store.open(hash_bytes(data)).read() == data


_SAME_CONTENT_CHILD = r"""
import sys
from cachefetch.store import CAFS
store = CAFS(sys.argv[1])
with open(sys.argv[2], "rb") as f:
    data = f.read()
f, tmp = store.new_temp()
with f:
    f.write(data)
print("ready", flush=True)
sys.stdin.readline()          # the start gun: every child waits here
blob = store.commit(tmp)
print(blob.hash.hex, blob.size, flush=True)
"""


def test_eight_processes_committing_the_same_content(store, tmp_path):
    data = os.urandom(1 << 20)
    src = tmp_path / "content"
    src.write_bytes(data)
    procs = [subprocess.Popen([sys.executable, "-c", _SAME_CONTENT_CHILD, store.root, str(src)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env())
             for _ in range(8)]
    try:
        for p in procs:  # all eight have written their temp file
            assert p.stdout.readline() == b"ready\n"
        assert len(store.temp_files()) == 8
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=30)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0] * 8
    h = hash_bytes(data)
    assert outputs == [f"{h.hex} {len(data)}\n".encode()] * 8
    assert blob_files(store) == [store.path(h)]
    assert store.temp_files() == []
    assert store.open(h).read() == data
    assert store.verify() == []


_KILLED_PUTTER_CHILD = r"""
import os, sys
from cachefetch.store import CAFS
store = CAFS(sys.argv[1])
size, gated = int(sys.argv[2]), sys.argv[3] == "gated"
base = os.urandom(size)
out = sys.stdout.buffer

class Reader:
    # A binary file whose every put() has distinct content of the same size.
    def __init__(self, i):
        self.i, self.pos, self.reads = i, 0, 0
        self.data = memoryview(i.to_bytes(8, "big") + base[8:])
    def read(self, n):
        self.reads += 1
        if self.reads == 2:   # the first chunk is in the temp file now
            out.write(b"writing %d\n" % self.i)
            out.flush()
            if gated:         # go on only when the parent says so
                sys.stdin.buffer.readline()
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return bytes(chunk)

i = 0
while True:
    blob = store.put(Reader(i))
    out.write(b"done %d %s\n" % (i, blob.hash.hex.encode()))
    out.flush()
    i += 1
"""


@pytest.mark.parametrize("gated", [True, False], ids=["killed-while-blocked-mid-write", "killed-while-writing"])
def test_sigkill_mid_put_leaves_no_partial_or_corrupt_blob(store, gated):
    size = (4 << 20) + 4097  # five 1 MiB reads per put
    target = 3
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PUTTER_CHILD, store.root, str(size),
                             "gated" if gated else "free"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env())
    done = {}
    try:
        for i in range(target + 1):
            assert proc.stdout.readline() == b"writing %d\n" % i
            if i == target:
                # put number `target` has started writing: kill it now.
                os.kill(proc.pid, signal.SIGKILL)
                break
            if gated:
                proc.stdin.write(b"\n")
                proc.stdin.flush()
            line = proc.stdout.readline().split()
            assert line[:2] == [b"done", b"%d" % i]
            done[i] = Hash.from_hex(line[2].decode())
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()

    reopened = CAFS(store.root)
    assert reopened.verify() == []
    stored = set(reopened)
    assert set(done.values()) <= stored
    for h in stored:  # no partial blob: every blob is a complete put
        assert reopened.size(h) == size
        assert hash_file(reopened.path(h)) == (h, size)
    assert len(stored) >= target
    # Whatever was left is a temp file, never a file under blobs/ without a valid name.
    assert sorted(blob_files(reopened)) == sorted(reopened.path(h) for h in stored)
    temps = reopened.temp_files()
    assert len(temps) <= 1
    if gated:  # killed between two writes of put number `target`
        assert len(temps) == 1 and 0 < os.path.getsize(temps[0]) < size
        assert len(stored) == target
    assert reopened.remove_stale_temps(older_than=0) == temps
    assert reopened.temp_files() == []
