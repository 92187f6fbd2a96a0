"""Issue 8's attacks on keys and on the fetch's bounds, against real gunicorn
(CacheFetch around tests/attack_app.py) and a real ``cachefetch serve``.

Keys: a Host carrying a path stores nothing under another URL's key;
``hosts=`` caches only its names; the proxy keys the exact upstream URL; a
request with a body, or with a Cookie, is neither served from the cache nor
stored in it. Bounds: with the leader's client gone, an endless body ends at
``--max-object-size``, a trickle at the idle bound, a 1 byte/s upstream at
the total bound; nothing is stored, no temp file is left."""
from __future__ import annotations

import http.client
import os
import time
from dataclasses import dataclass

import pytest

from attack_app import PacedOrigin, attack_env
from harness import cachefetch_serve, fetch, gunicorn, wait_until
from herd_app import calls as events
from origin import Origin, Resource

from cachefetch.index import SQLiteIndex


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """gunicorn (2 workers) serving attack_app under CacheFetch with idle 1.5 s, total 4 s."""
    tmp = tmp_path_factory.mktemp("attacks")
    env = attack_env(tmp, idle=1.5, total=4)
    with gunicorn("attack_app:application", tmp, env=env, threads=8) as server:
        server.extra["env"] = env
        server.extra["store"] = env["CF_ATTACK_STORE"]
        yield server


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def send(port: int, path: str, method: str = "GET", body: bytes | None = None, **headers: str) -> Answer:
    """One request on a fresh connection (``Content_Length`` spells ``Content-Length``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
        resp = conn.getresponse()
        return Answer(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def cache_status(r: Answer) -> str:
    return r.headers["Cache-Status"] or ""


def is_hit(r: Answer) -> bool:
    return cache_status(r).startswith("cachefetch; hit")


def hit(port: int, path: str, **headers: str) -> Answer:
    """Ask until the answer is a hit (a commit lands just after its response), and return it."""
    return wait_until(lambda: (r := send(port, path, **headers)) if is_hit(r := send(port, path, **headers)) else None,
                      timeout=10, what=f"{path} to be a hit")


# -- keys ---------------------------------------------------------------------

def test_a_host_carrying_a_path_stores_nothing_under_another_urls_key(app):
    # Under the old key, scheme://victim.example/page + /account named the victim's URL.
    attack = send(app.port, "/account", Host="victim.example/page")
    assert attack.status == 200 and b"host=victim.example/page " in attack.body
    assert not is_hit(attack), cache_status(attack)

    victim = send(app.port, "/page/account", Host="victim.example")
    assert victim.status == 200 and not is_hit(victim), cache_status(victim)
    assert victim.body.startswith(b"page path=/page/account host=victim.example cookie= ")
    assert hit(app.port, "/page/account", Host="victim.example").body.startswith(
        b"page path=/page/account host=victim.example cookie= ")
    # the attacker's requests are never answered from the cache either
    for _ in range(3):
        again = send(app.port, "/account", Host="victim.example/page")
        assert not is_hit(again) and b"host=victim.example/page " in again.body


@pytest.mark.parametrize("host", ["victim.example/x", "victim.example?x", "victim.example#x", "victim.example:99999",
                                  "user@victim.example", "victim.example\\x", "victim.example x"])
def test_a_host_that_is_not_host_and_port_passes_through_uncached(app, host):
    answers = [send(app.port, "/page/odd-host", Host=host) for _ in range(3)]
    for r in answers:
        assert r.status == 200 and not is_hit(r), (r.status, cache_status(r))
    assert len({r.body for r in answers}) == 3  # the app answered each: nothing stored


def test_hosts_option_caches_only_its_names(app):
    mine = hit(app.port, "/restricted/a", Host="site.example")
    assert b"host=site.example " in mine.body
    for _ in range(3):
        other = send(app.port, "/restricted/a", Host="evil.example")
        assert other.status == 200 and b"host=evil.example " in other.body
        assert not is_hit(other), cache_status(other)
    assert hit(app.port, "/restricted/a", Host="site.example").body == mine.body  # ours was not replaced


def test_a_get_with_a_body_is_neither_served_from_nor_stored_in_the_cache(app):
    bodied = send(app.port, "/echo/x", body=b"evil")
    assert bodied.status == 200 and bodied.body.startswith(b"echo body=evil "), bodied.body
    assert "fwd=bypass" in cache_status(bodied), cache_status(bodied)
    plain = hit(app.port, "/echo/x")
    assert plain.body.startswith(b"echo body= nonce="), plain.body  # the bodied answer was never stored
    again = send(app.port, "/echo/x", body=b"again")
    assert again.body.startswith(b"echo body=again ") and not is_hit(again)  # nor served from the cache
    assert hit(app.port, "/echo/x").body == plain.body


def test_a_request_with_a_cookie_gets_no_shared_page_and_leaves_none(app):
    shared = hit(app.port, "/page/cookie-1")
    mine = send(app.port, "/page/cookie-1", Cookie="session=alice")
    assert b"cookie=session=alice " in mine.body and not is_hit(mine), cache_status(mine)
    assert hit(app.port, "/page/cookie-1").body == shared.body

    personal = send(app.port, "/page/cookie-2", Cookie="session=bob")
    assert b"cookie=session=bob " in personal.body
    assert b"bob" not in hit(app.port, "/page/cookie-2").body


def test_the_proxy_keys_the_exact_upstream_url(tmp_path):
    with Origin() as origin:
        origin.files["/file/report%3Fsize=5"] = Resource(b"the file named report?size=5")
        origin.files["/file/report?size=5"] = Resource(b"report, with a query")
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url,
                              "--store", str(tmp_path / "store"), "--workers", "1", "--threads", "4") as server:
            encoded = send(server.port, "/file/report%3Fsize=5")
            query = send(server.port, "/file/report?size=5")
            assert encoded.body == b"the file named report?size=5", encoded.body
            assert query.body == b"report, with a query", query.body
            # each is a hit of its own body: two keys, as the upstream has two resources
            assert hit(server.port, "/file/report%3Fsize=5").body == encoded.body
            assert hit(server.port, "/file/report?size=5").body == query.body
    assert set(origin.hits) == {"/file/report%3Fsize=5", "/file/report?size=5"}  # fetched as asked, nothing else


# -- bounds on a fetch nobody reads ---------------------------------------------

def stored_keys(store: str) -> list[str]:
    index = SQLiteIndex(os.path.join(store, "index.sqlite3"))
    try:
        return [entry.key for entry in index]
    finally:
        index.close()


def temp_files(store: str) -> list[str]:
    tmp = os.path.join(store, "tmp")
    return os.listdir(tmp) if os.path.isdir(tmp) else []


def test_an_endless_body_whose_client_left_ends_at_max_object_size(tmp_path):
    limit = 4 << 20
    store = str(tmp_path / "store")
    with PacedOrigin() as origin:
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url, "--store", store,
                              "--max-object-size", "4M", "--workers", "1", "--threads", "4") as server:
            left = fetch(server.port, "/endless/a", stop_after=100_000)
            assert left.status == 200 and not left.complete
            assert origin.log.ended_event("/endless/a").wait(30), "the fetch went on after its client left"
            sent = origin.log.sent["/endless/a"]
            print(f"the upstream sent {sent} bytes before the fetch let go (limit {limit})")
            # past the limit the fill holds at most 8 MiB for a reader, plus the sockets' buffers
            assert limit < sent < limit + (24 << 20)
            wait_until(lambda: temp_files(store) == [], timeout=10, what="the temp file to be removed")
            assert not any("/endless/" in key for key in stored_keys(store))
            assert fetch(server.port, "/-/healthz").status == 200


def test_a_trickle_whose_client_left_ends_at_the_idle_bound_and_a_slow_drip_at_the_total_bound(app):
    env, store = app.extra["env"], app.extra["store"]
    started = time.monotonic()
    # idle: a byte every 3 s against idle_timeout=1.5; total: a byte a second against fetch_timeout=4;
    # either app would go on for 30 s
    for path in ("/trickle/idle?every=3&limit=30", "/trickle/total?every=1&limit=30"):
        r = fetch(app.port, path, stop_after=1)
        assert r.status == 200 and r.body == b"x" and not r.complete
    closed = wait_until(lambda: (c := {e[2]: int(e[3]) for e in events(env, "closed")}).keys() >= {
        "/trickle/idle", "/trickle/total"} and c, timeout=20, what="both fetches to end")
    elapsed = time.monotonic() - started
    print(f"ended after {elapsed:.1f}s; bytes the apps sent: {closed}")
    assert elapsed < 10
    assert closed["/trickle/idle"] <= 2 and 3 <= closed["/trickle/total"] <= 6
    assert not events(env, "finished")
    log = app.log()
    assert "no byte from the upstream for 1.5s" in log and "the fetch took more than 4s" in log, log[-3000:]
    wait_until(lambda: not any(name.startswith("cf-") for name in temp_files(store)), timeout=10,
               what="the temp files to be removed")
    assert not any("/trickle/" in key for key in stored_keys(store))
