"""CacheFetch under a real gunicorn (gthread, 2 workers x 32 threads): the herd."""
from __future__ import annotations

import statistics
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import fetch, gunicorn
from herd_app import body_for, calls, make_env

from cachefetch.store import CAFS

SIZE = 10 << 20


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path)


def herd(port, path, n, headers=None):
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        return fetch(port, path, headers=headers)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_herd_of_48_calls_app_once_and_followers_stream(env, tmp_path):
    path = "/big/herd"
    expected = body_for(path, SIZE)
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        results = herd(server.port, path, 48)
        assert len(calls(env, path)) == 1, server.log()
        for r in results:
            assert r.status == 200
            assert r.complete
            assert r.body == expected
        kinds = [r.headers["Cache-Status"] for r in results]
        leaders = [r for r in results if r.headers["Cache-Status"].endswith("stored")]
        followers = [r for r in results if r.headers["Cache-Status"].endswith("collapsed")]
        # A client that one worker accepted but had no thread for until the body
        # was complete is answered as a hit: never by the app.
        late = [r for r in results if r.headers["Cache-Status"].startswith("cachefetch; hit")]
        assert len(leaders) == 1, kinds
        assert len(followers) + len(late) == 47 and len(followers) >= 40, kinds
        leader_ttfb = leaders[0].ttfb
        median = statistics.median(f.ttfb for f in followers)
        print(f"leader ttfb {leader_ttfb:.3f}s, follower median {median:.3f}s, max {max(f.ttfb for f in followers):.3f}s")
        assert median <= leader_ttfb * 1.2
        # Followers streamed: they had their first byte long before the 1 s trickle ended.
        assert median < leader_ttfb + 0.5
        # Both workers served clients, so the coalescing crossed processes.
        workers = {r.headers["X-Worker"] for r in results}
        assert len(workers) == 2, f"all 48 clients landed on one worker: {workers}"
        hit = fetch(server.port, path)
        assert hit.headers["Cache-Status"].startswith("cachefetch; hit")
        assert hit.body == expected
    store = CAFS(env["CF_TEST_STORE"])
    assert store.verify() == []
    assert store.temp_files() == []
