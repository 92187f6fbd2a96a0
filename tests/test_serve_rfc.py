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
