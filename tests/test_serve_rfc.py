"""RFC 9111 behaviour through the real ``cachefetch serve`` (our gunicorn worker)."""
from __future__ import annotations

import time

from harness import cachefetch_serve, fetch, wait_until
from origin import Origin, Resource


def test_a_hit_replays_the_origin_date_with_its_age(tmp_path):
    with Origin() as origin:
        origin.files["/f/a.bin"] = Resource(b"a" * 1000, headers={"Cache-Control": "max-age=600"})
        with cachefetch_serve(tmp_path, "--upstream", origin.url + "/f", "--store", str(tmp_path / "s")) as server:
            first = fetch(server.port, "/a.bin")
            hit = wait_until(lambda: (r := fetch(server.port, "/a.bin")).headers["Cache-Status"]
                             .startswith("cachefetch; hit") and r, what="the entry")
            time.sleep(1.1)  # what is tested is the passing of time: the replayed Date must not move
            later = fetch(server.port, "/a.bin")
    assert first.headers["Date"] == hit.headers["Date"] == later.headers["Date"]
    assert int(later.headers["Age"]) >= 1
    assert origin.hits["/f/a.bin"] == 1


def _serve(tmp_path, origin):
    return cachefetch_serve(tmp_path, "--upstream", origin.url + "/f", "--store", str(tmp_path / "s"))


def test_serve_revalidates_a_stale_entry_with_one_conditional_request(tmp_path):
    """serve's default (``--default-ttl rfc``): a stale entry with an ETag is
    revalidated; the origin's 304 costs no body, and the client gets the stored one."""
    data = b"v" * 100_000
    with Origin() as origin:
        # Age 100 > max-age 1: stale as soon as stored.
        origin.files["/f/page"] = Resource(data, headers={"ETag": '"p1"', "Cache-Control": "max-age=1", "Age": "100"})
        with _serve(tmp_path, origin) as server:
            first = fetch(server.port, "/page")
            assert first.body == data and first.headers["Cache-Status"] == "cachefetch; fwd=miss; stored"
            again = wait_until(lambda: (r := fetch(server.port, "/page")).headers["Cache-Status"]
                               .startswith("cachefetch; fwd=stale; fwd-status=304") and r, what="a revalidated answer")
    assert again.status == 200 and again.body == data
    conditional = [h for m, p, h, _ in origin.requests if p == "/f/page" and "If-None-Match" in h]
    assert conditional and all(h["If-None-Match"] == '"p1"' for h in conditional)


def test_serve_stores_nothing_an_origin_gives_no_freshness_and_no_validator(tmp_path):
    with Origin() as origin:
        origin.files["/f/plain"] = Resource(b"plain")
        with _serve(tmp_path, origin) as server:
            for _ in range(2):
                r = fetch(server.port, "/plain")
                assert r.body == b"plain" and r.headers["Cache-Status"] == "cachefetch; fwd=miss; detail=no-freshness"
    assert origin.hits["/f/plain"] == 2


def test_serve_invalidates_on_an_unsafe_method(tmp_path):
    with Origin() as origin:
        origin.files["/f/doc"] = Resource(b"doc", headers={"Cache-Control": "max-age=600"})
        with _serve(tmp_path, origin) as server:
            fetch(server.port, "/doc")
            wait_until(lambda: fetch(server.port, "/doc").headers["Cache-Status"].startswith("cachefetch; hit"),
                       what="the entry")
            assert fetch(server.port, "/doc", method="POST").status == 200
            after = fetch(server.port, "/doc")
    assert after.headers["Cache-Status"].startswith("cachefetch; fwd=miss")
    assert origin.hits["/f/doc"] == 3  # GET, POST, the GET after it (the hit never reached the origin)
