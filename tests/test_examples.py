"""The examples, served by a real gunicorn with examples/gunicorn.conf.py: miss, then hit."""
from __future__ import annotations

import os

import pytest

from harness import REPO_ROOT, fetch, gunicorn, wait_until

from cachefetch.store import CAFS

EXAMPLES = os.path.join(REPO_ROOT, "examples")
CONFIG = os.path.join(EXAMPLES, "gunicorn.conf.py")


def check_miss_then_hit(port, path):
    miss = fetch(port, path)
    assert miss.status == 200 and miss.complete
    assert miss.headers["Cache-Status"] == "cachefetch; fwd=miss; stored"
    hit = wait_until(lambda: (r := fetch(port, path)).headers["Cache-Status"].startswith("cachefetch; hit") and r,
                     what="the entry to be committed")
    assert hit.body == miss.body and hit.complete
    assert hit.headers["ETag"] and "Age" in hit.headers
    return miss


def check_private(port, path):
    first, second = fetch(port, path), fetch(port, path)
    assert first.status == second.status == 200
    assert first.body != second.body
    assert "Set-Cookie" in first.headers
    assert not second.headers.get("Cache-Status", "").startswith("cachefetch; hit")


@pytest.mark.parametrize("app, cwd, cacheable, private", [
    ("flask_app:app", EXAMPLES, "/artifact/demo?size=300000", "/me"),
    ("mysite.wsgi:application", os.path.join(EXAMPLES, "django_site"), "/report/q3?size=300000", "/whoami"),
], ids=["flask", "django"])
def test_example_served_by_gunicorn(tmp_path, app, cwd, cacheable, private):
    store_dir = tmp_path / "store"
    with gunicorn(app, tmp_path, env={"CACHEFETCH_STORE": str(store_dir)}, cwd=cwd, config=CONFIG) as server:
        miss = check_miss_then_hit(server.port, cacheable)
        assert len(miss.body) == 300000
        check_private(server.port, private)
    assert server.proc.returncode == 0, server.log()
    store = CAFS(store_dir)
    assert len(list(store)) == 1 and store.verify() == [] and store.temp_files() == []
