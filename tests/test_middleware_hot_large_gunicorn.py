"""The hot path's large answers under a real gunicorn (-k gthread -w 2
--threads 32): sent from the blob with sendfile, every byte right, every
descriptor closed after its answer, and a blob removed behind the answer
(as eviction removes one) never answered from memory."""
from __future__ import annotations

import os

from harness import fetch, gunicorn, wait_until
from hot_large_wsgi import SIZE, body

from cachefetch.index import SQLiteIndex
from cachefetch.store import CAFS


def open_blob_fds(pid: int, blob: str) -> list[str]:
    """The descriptors of process ``pid`` open on ``blob``."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(blob):  # " (deleted)" once unlinked
                out.append(fd)
        except FileNotFoundError:  # closed meanwhile
            pass
    return out


def test_large_hot_answers_are_right_and_leave_no_descriptor_open(tmp_path):
    store, calls = tmp_path / "store", tmp_path / "calls"
    calls.write_text("")
    expected = body()
    with gunicorn("hot_large_wsgi:application", tmp_path,
                  env={"CF_TEST_STORE": str(store), "CF_TEST_CALLS": str(calls)}, workers=2) as server:
        hot_by: dict[str, int] = {}

        def both_hot_a_few_times() -> bool:
            r = fetch(server.port, "/big")
            assert r.status == 200 and len(r.body) == SIZE and r.body == expected, (r.status, len(r.body))
            assert r.headers["Content-Length"] == str(SIZE)
            if r.headers.get("X-Hot") == "1":
                worker = r.headers["X-Worker"]
                hot_by[worker] = hot_by.get(worker, 0) + 1
            return len(hot_by) == 2 and min(hot_by.values()) >= 5

        wait_until(both_hot_a_few_times, what="both workers to answer /big from memory five times")
        assert calls.read_text().count("\n") == 1  # one app call: every other answer was a hit

        key = f"http://127.0.0.1:{server.port}/big"
        index = SQLiteIndex(CAFS(str(store)).layout.index_path)
        try:
            [entry] = index.get(key)
        finally:
            index.close()
        blob = CAFS(str(store)).path(entry.hash)
        workers = [int(w) for w in hot_by]
        # Each answer's descriptor is closed once gunicorn is done with it
        # (just after the client has the last byte).
        wait_until(lambda: not any(open_blob_fds(pid, blob) for pid in workers),
                   what="the workers to close every descriptor of the blob")

        # The blob goes (as eviction removes one, index row first or not): no
        # worker may answer from memory; the full path drops the entry and
        # asks the app again.
        os.unlink(blob)
        for _ in range(6):  # both workers, through both their hot tables
            r = fetch(server.port, "/big")
            assert r.status == 200 and r.body == expected
            assert r.headers.get("X-Hot") is None, dict(r.headers)
            if calls.read_text().count("\n") >= 2:
                break
        assert calls.read_text().count("\n") >= 2
