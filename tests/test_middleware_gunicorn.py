"""CacheFetch under a real gunicorn (-k gthread -w 2 --threads 32) on 127.0.0.1:
hits, privacy, disconnects, failures and killed workers."""
from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import curl, fetch, gunicorn, wait_until
from herd_app import body_for, calls, make_env

from cachefetch.store import CAFS


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path)


def open_gate(env, name):
    with open(os.path.join(env["CF_TEST_GATES"], name), "w"):
        pass


def assert_store_clean(env):
    """No blob that fails verification, no temp file, no journal left."""
    store = CAFS(env["CF_TEST_STORE"])
    assert store.verify() == []
    assert store.temp_files() == []
    inflight = os.path.join(env["CF_TEST_STORE"], "inflight")
    assert os.listdir(inflight) == []


def in_parallel(n, fn):
    with ThreadPoolExecutor(n) as pool:
        return [f.result() for f in [pool.submit(fn, i) for i in range(n)]]


def test_hit_uses_sendfile_and_answers_conditional_and_range_requests(env, tmp_path):
    path = "/big/hit?delay=0&trickle=0&size=1048576"
    expected = body_for("/big/hit", 1 << 20)
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        miss = fetch(server.port, path)
        assert miss.headers["Cache-Status"] == "cachefetch; fwd=miss; stored"
        assert miss.body == expected
        # The commit is asynchronous: the next request is a hit once it lands.
        hit = wait_until(lambda: (r := fetch(server.port, path)).headers["Cache-Status"].startswith("cachefetch; hit") and r,
                         what="the entry to be committed")
        assert hit.body == expected and hit.complete
        assert int(hit.headers["Age"]) >= 0
        etag = hit.headers["ETag"]
        assert etag.startswith('"') and len(etag) == 66
        assert len(calls(env)) == 1
        with open(env["CF_TEST_SENDFILE"]) as f:
            sends = [line.split() for line in f]
        assert any(int(count) == 1 << 20 for _, _, count in sends), sends

        not_modified = curl("-i", "-H", f"If-None-Match: {etag}", server.url + path)
        assert not_modified.stdout.startswith(b"HTTP/1.1 304"), not_modified.stdout[:200]
        ranged = curl("-r", "100-199", "-D", "-", "-o", str(tmp_path / "part"), server.url + path)
        assert ranged.stdout.startswith(b"HTTP/1.1 206"), ranged.stdout
        assert b"content-range: bytes 100-199/1048576" in ranged.stdout.lower()
        assert (tmp_path / "part").read_bytes() == expected[100:200]
        unsatisfiable = curl("-i", "-r", "2000000-", server.url + path)
        assert unsatisfiable.stdout.startswith(b"HTTP/1.1 416")
        head = fetch(server.port, path, method="HEAD")
        assert head.status == 200 and head.headers["Content-Length"] == str(1 << 20) and head.body == b""
        assert len(calls(env)) == 1
    assert_store_clean(env)


@pytest.mark.parametrize("path, headers", [
    ("/cookie", {}),
    ("/private", {}),
    ("/no-store", {}),
    ("/auth", {"Authorization": "Bearer alice"}),
])
def test_private_responses_are_never_served_to_a_second_client(env, tmp_path, path, headers):
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        bodies = in_parallel(8, lambda i: fetch(server.port, path, headers=headers).body)
        later = fetch(server.port, path, headers=headers)
        assert len(set(bodies + [later.body])) == 9, "a private response was shared"
        assert len(calls(env, path)) == 9
        assert not later.headers.get("Cache-Status", "").startswith("cachefetch; hit")
        if path == "/auth":  # another user must not see alice's answer either
            bob = fetch(server.port, path, headers={"Authorization": "Bearer bob"})
            assert b"alice" not in bob.body
    assert_store_clean(env)


def test_authorization_shares_only_public_responses(env, tmp_path):
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        first = fetch(server.port, "/auth-public", headers={"Authorization": "Bearer alice"})
        wait_until(lambda: fetch(server.port, "/auth-public").headers["Cache-Status"].startswith("cachefetch; hit"),
                   what="the public entry")
        assert fetch(server.port, "/auth-public", headers={"Authorization": "Bearer bob"}).body == first.body
        assert len(calls(env, "/auth-public")) == 1


def test_vary_gives_separate_entries(env, tmp_path):
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        en = fetch(server.port, "/vary", headers={"Accept-Language": "en"})
        # The en entry committed first, so fr is planned knowing the resource varies. (A
        # request planned before the first variant of a resource is in the index leads
        # the unvaried flight; a later request for its variant can then miss it and
        # fetch again: a coalescing gap in that one window, never a wrong answer.)
        en2 = wait_until(lambda: (r := fetch(server.port, "/vary", headers={"Accept-Language": "en"}))
                         .headers["Cache-Status"].startswith("cachefetch; hit") and r, what="the en entry")
        fr = fetch(server.port, "/vary", headers={"Accept-Language": "fr"})
        assert en.body.startswith(b"lang=en") and fr.body.startswith(b"lang=fr")
        fr2 = wait_until(lambda: (r := fetch(server.port, "/vary", headers={"Accept-Language": "fr"}))
                         .headers["Cache-Status"].startswith("cachefetch; hit") and r, what="the fr entry")
        seen = [r.headers["Cache-Status"] for r in (en, fr, en2, fr2)]
        assert en2.body == en.body and fr2.body == fr.body, seen
        assert en2.headers["Vary"] == "Accept-Language"
        assert len(calls(env, "/vary")) == 2, seen
    assert_store_clean(env)


def test_leader_hanging_up_does_not_stop_the_fetch(env, tmp_path):
    path = "/gated/hangup"
    size = 4 << 20
    expected = body_for(path, size)
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        with ThreadPoolExecutor(9) as pool:
            leader = pool.submit(fetch, server.port, f"{path}?size={size}&trickle=1", stop_after=1 << 20)
            wait_until(lambda: calls(env, path), what="the leader's app call")
            followers = [pool.submit(fetch, server.port, f"{path}?size={size}&trickle=1") for _ in range(8)]
            # Followers are attached once each has a journal descriptor open; the gate holds the body.
            wait_until(lambda: _open_journals(server) >= 9, what="8 followers to attach")
            open_gate(env, "hangup")
            hung = leader.result()
            results = [f.result() for f in followers]
        assert not hung.complete and len(hung.body) >= 1 << 20
        for r in results:
            assert r.complete and r.body == expected
            assert r.headers["Cache-Status"] == "cachefetch; fwd=miss; collapsed"
        hit = wait_until(lambda: (r := fetch(server.port, f"{path}?size={size}&trickle=1")).headers["Cache-Status"]
                         .startswith("cachefetch; hit") and r, what="the committed entry")
        assert hit.body == expected
        assert len(calls(env, path)) == 1
    assert_store_clean(env)


def _open_journals(server, pids=None) -> int:
    """How many descriptors workers hold on journal files (followers attached,
    plus the leader's own)."""
    count = 0
    for pid in pids or server.worker_pids():
        fd_dir = f"/proc/{pid}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(os.path.join(fd_dir, fd)).endswith(".lock"):
                        count += 1
                except OSError:
                    continue
        except OSError:
            continue
    return count


def test_app_raising_mid_body_drops_every_client_and_stores_nothing(env, tmp_path):
    path = "/fail-mid"
    size = 4 << 20
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        results = in_parallel(12, lambda i: fetch(server.port, f"{path}?size={size}&delay=0.5&trickle=1"))
        assert len(calls(env, path)) == 1
        for r in results:
            assert r.status == 200
            assert not r.complete
            assert len(r.body) < size
        assert_store_clean(env)
        assert list(CAFS(env["CF_TEST_STORE"])) == []
        again = fetch(server.port, f"{path}?size={size}&delay=0&trickle=0")
        assert not again.complete
        assert len(calls(env, path)) == 2
    assert_store_clean(env)


def test_uncacheable_response_releases_followers_to_the_app(env, tmp_path):
    path = "/gated/cookie"
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        with ThreadPoolExecutor(6) as pool:
            leader = pool.submit(fetch, server.port, f"{path}?cookie=1&size=1000&trickle=0")
            wait_until(lambda: calls(env, path), what="the leader's app call")
            others = [pool.submit(fetch, server.port, f"{path}?cookie=1&size=1000&trickle=0") for _ in range(5)]
            wait_until(lambda: len(calls(env, path)) == 6, what="each follower calling the app itself")
            open_gate(env, "cookie")
            results = [leader.result()] + [f.result() for f in others]
        cookies = {r.headers["Set-Cookie"] for r in results}
        assert len(cookies) == 6
        assert all(r.complete for r in results)
    assert_store_clean(env)


def test_killed_leader_worker_is_replaced_by_a_follower(env, tmp_path):
    path = "/gated/kill"
    size = 2 << 20
    expected = body_for(path, size)
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        with ThreadPoolExecutor(104) as pool:
            leader = pool.submit(fetch, server.port, f"{path}?size={size}&trickle=0.5")
            first_call = wait_until(lambda: calls(env, path), what="the leader's app call")[0]
            doomed = int(first_call[0])
            # The kernel picks the worker for each connection: add clients until
            # the surviving worker has followers attached to the doomed leader.
            clients = []
            while len(clients) < 100:
                clients += [pool.submit(fetch, server.port, f"{path}?size={size}&trickle=0.5") for _ in range(4)]
                wait_until(lambda: _open_journals(server) >= len(clients) + 1, what="the followers to attach")
                survivors = [p for p in server.worker_pids() if p != doomed]
                if _open_journals(server, survivors) >= 2:
                    break
            os.kill(doomed, signal.SIGKILL)
            # The survivors' new leader runs the app again; it waits at the same gate.
            wait_until(lambda: len(calls(env, path)) >= 2, what=f"a new leader; log: {server.log()}; calls: {calls(env)}")
            open_gate(env, "kill")
            results = [_result_or_none(leader)] + [_result_or_none(f) for f in clients]
        survivors = [r for r in results if r is not None and r.status == 200 and r.complete]
        assert survivors, "no client of the surviving worker got an answer"
        for r in survivors:
            assert r.body == expected
            assert int(r.headers["X-Worker"]) != doomed
        new_leaders = calls(env, path)[1:]
        assert len(new_leaders) == 1 and int(new_leaders[0][0]) != doomed
        hit = wait_until(lambda: (r := fetch(server.port, path + f"?size={size}&trickle=0.5")).headers["Cache-Status"]
                         .startswith("cachefetch; hit") and r, what="the committed entry")
        assert hit.body == expected
    assert_store_clean(env)


def _result_or_none(future):
    try:
        return future.result()
    except OSError:  # its worker was killed under it
        return None


def test_killed_worker_mid_body_drops_followers_and_next_request_refetches(env, tmp_path):
    path = "/gated/midkill"
    size = 8 << 20
    expected = body_for(path, size)
    store_tmp = os.path.join(env["CF_TEST_STORE"], "tmp")
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        with ThreadPoolExecutor(16) as pool:
            slow = {"X-Trickle": "20"}
            leader = pool.submit(fetch, server.port, f"{path}?size={size}", headers=slow)
            doomed = int(wait_until(lambda: calls(env, path), what="the leader's app call")[0][0])
            clients = [pool.submit(fetch, server.port, f"{path}?size={size}", headers=slow) for _ in range(15)]
            wait_until(lambda: _open_journals(server) >= 16, what="the followers to attach")
            open_gate(env, "midkill")
            wait_until(lambda: any(os.path.getsize(os.path.join(store_tmp, n)) > 0 for n in os.listdir(store_tmp)),
                       what="the body to start")
            os.kill(doomed, signal.SIGKILL)
            results = [_result_or_none(leader)] + [_result_or_none(f) for f in clients]
        for r in results:
            assert r is None or not r.complete, "a client saw a complete-looking body from a dead fetch"
        again = fetch(server.port, f"{path}?size={size}", headers={"X-Trickle": "0"})
        assert again.complete and again.body == expected
        assert len(calls(env, path)) == 2
        wait_until(lambda: fetch(server.port, f"{path}?size={size}").headers["Cache-Status"]
                   .startswith("cachefetch; hit"),
                   what="the committed entry")
    assert_store_clean(env)


@pytest.mark.parametrize("policy", ["passthrough", "504"])
def test_follower_wait_timeout(env, tmp_path, policy):
    path = f"/gated/wait-{policy}"
    env = {**env, "CF_TEST_WAIT": "0.3", "CF_TEST_WAIT_POLICY": policy}
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        with ThreadPoolExecutor(5) as pool:
            leader = pool.submit(fetch, server.port, f"{path}?size=1000&trickle=0")
            wait_until(lambda: calls(env, path), what="the leader's app call")
            followers = [pool.submit(fetch, server.port, f"{path}?size=1000&trickle=0") for _ in range(4)]
            if policy == "passthrough":  # each follower gives up and calls the app itself
                wait_until(lambda: len(calls(env, path)) == 5, what="the followers' own app calls")
                open_gate(env, f"wait-{policy}")
                results = [f.result() for f in followers]
            else:
                results = [f.result() for f in followers]
                open_gate(env, f"wait-{policy}")
            assert leader.result().complete
        for r in results:
            assert "detail=wait-timeout" in r.headers["Cache-Status"]
            if policy == "passthrough":
                assert r.status == 200 and r.complete and r.body == body_for(path, 1000)
            else:
                assert r.status == 504
        assert len(calls(env, path)) == (5 if policy == "passthrough" else 1)
    assert_store_clean(env)


def test_response_over_max_object_size_is_streamed_but_not_stored(env, tmp_path):
    env = {**env, "CF_TEST_MAX": str(1 << 20)}
    path = "/big/too-large?size=3145728&delay=0&trickle=0"
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        first = fetch(server.port, path)
        assert first.complete and first.body == body_for("/big/too-large", 3 << 20)
        second = fetch(server.port, path)
        assert second.complete and second.body == first.body
        assert len(calls(env, "/big/too-large")) == 2
    assert list(CAFS(env["CF_TEST_STORE"])) == []
    assert_store_clean(env)


def test_head_miss_stores_nothing_and_head_after_get_is_a_hit(env, tmp_path):
    path = "/big/head?size=5000&delay=0&trickle=0"
    with gunicorn("herd_wsgi:application", tmp_path, env=env) as server:
        head = fetch(server.port, path, method="HEAD")
        assert head.status == 200 and head.body == b""
        assert list(CAFS(env["CF_TEST_STORE"])) == []
        fetch(server.port, path)
        hit = wait_until(lambda: (r := fetch(server.port, path, method="HEAD")).headers["Cache-Status"]
                         .startswith("cachefetch; hit") and r, what="the GET's entry")
        assert hit.headers["Content-Length"] == "5000" and hit.body == b""
        assert len(calls(env, "/big/head")) == 2
    assert_store_clean(env)
