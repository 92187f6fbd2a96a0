"""The hot path under a real gunicorn (-k gthread -w 2 --threads 32): an entry
invalidated or replaced through one worker is never answered from the other
worker's memory."""
from __future__ import annotations

import blake3

from harness import fetch, gunicorn, wait_until

from cachefetch.index import SQLiteIndex
from cachefetch.store import CAFS

SIZE = 4096  # hot_wsgi's bodies


def body_of(version: int) -> bytes:
    return f"version={version}\n".encode().ljust(SIZE, b".")


def test_a_change_through_one_worker_is_never_hidden_by_the_others_memory(tmp_path):
    store, version_file = tmp_path / "store", tmp_path / "version"
    env = {"CF_TEST_STORE": str(store), "CF_TEST_VERSION": str(version_file)}

    def publish(version: int) -> None:
        version_file.write_text(str(version))

    def answered_from_memory_by_both_workers(version: int) -> None:
        """GET on fresh connections until each worker has answered from its
        hot table; every answer on the way must be ``version``'s body."""
        hot_by: set[str] = set()

        def both() -> bool:
            r = fetch(server.port, "/v")
            assert r.status == 200 and r.body == body_of(version), (r.status, r.body[:20], dict(r.headers))
            if r.headers.get("X-Hot") == "1":
                hot_by.add(r.headers["X-Worker"])
            return len(hot_by) == 2

        wait_until(both, what=f"both workers to answer version {version} from memory")

    publish(0)
    with gunicorn("hot_wsgi:application", tmp_path, env=env, workers=2) as server:
        answered_from_memory_by_both_workers(0)

        # Invalidated through one worker (an unsafe method: the entry is gone
        # before its 204 is sent); the other's copy must never answer again.
        publish(1)
        assert fetch(server.port, "/v", method="POST").status == 204
        answered_from_memory_by_both_workers(1)

        # Replaced through one worker (a request that forces a refetch); once
        # the index holds the new entry, no worker may answer with the old one.
        publish(2)
        forced = fetch(server.port, "/v", headers={"Cache-Control": "no-cache"})
        assert forced.body == body_of(2)
        index = SQLiteIndex(CAFS(str(store)).layout.index_path)
        try:
            wait_until(lambda: [e.hash.hex for e in index.get(f"http://127.0.0.1:{server.port}/v")]
                       == [blake3.blake3(body_of(2)).hexdigest()], what="the refetched entry to be committed")
        finally:
            index.close()
        answered_from_memory_by_both_workers(2)
