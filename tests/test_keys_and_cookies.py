"""Keys that cannot be poisoned, requests with cookies, and oversized headers (in process)."""
from __future__ import annotations

import pytest

from cachefetch import CacheFetch
from cachefetch.middleware.keys import HostKey, default_key, valid_host
from test_middleware import App, assert_clean, cache_status, client, settled

pytestmark = pytest.mark.usefixtures("now")






@pytest.mark.parametrize("host, ok", [
    ("example.com", True), ("example.com:8080", True), ("127.0.0.1:80", True), ("[::1]:8080", True),
    ("internal_name", True), ("victim.example/page/account", False), ("a b", False), ("h:99999", False),
    ("x" * 300, False), ("evil.com?x=1", False), ("", False), ("a@b", False)])
def test_valid_host(host, ok):
    assert valid_host(host) is ok


def test_a_host_carrying_a_path_is_never_cached(make):
    """Host: victim.example/page/account would have stored this page under the
    key of http://victim.example/page/account/r."""
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    for _ in range(2):
        r = c.get("/r", headers={"Host": "victim.example/page/account"}, buffered=True)
        assert r.status_code == 200 and "Cache-Status" not in r.headers
    assert app.calls == 2 and len(mw.index) == 0
    assert default_key({"HTTP_HOST": "victim.example/page/account", "PATH_INFO": "/r"}) is None
    assert_clean(mw)


def test_hosts_lists_the_names_that_are_cached(make):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app, hosts=["example.com"])
    c = client(mw)
    c.get("/r", headers={"Host": "example.com:8080"}, buffered=True)
    settled(mw)
    assert cache_status(c.get("/r", headers={"Host": "EXAMPLE.com:8080"}, buffered=True)).startswith("cachefetch; hit")
    r = c.get("/r", headers={"Host": "other.example"}, buffered=True)
    assert "Cache-Status" not in r.headers and r.data.startswith(b"call=2 ")
    assert_clean(mw)


@pytest.mark.parametrize("hosts", [["example.com:80"], ["a b"], [], "bad/host"])
def test_hosts_must_be_names(make, hosts):
    with pytest.raises(ValueError):
        HostKey(hosts)


def _cookie_get(c, cookie="session=1"):
    return c.get("/r", headers={"Cookie": cookie}, buffered=True)


def test_a_request_with_a_cookie_is_neither_stored_nor_served_from_the_cache(make):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    r = _cookie_get(c)
    assert cache_status(r) == "cachefetch; fwd=miss; detail=cookie" and len(mw.index) == 0
    c.get("/r", buffered=True)  # stored for cookie-less requests
    settled(mw)
    r = _cookie_get(c)
    assert not cache_status(r).startswith("cachefetch; hit") and r.data.startswith(b"call=3 ")
    assert_clean(mw)


@pytest.mark.parametrize("headers", [[("Cache-Control", "public, max-age=60")],
                                     [("Cache-Control", "max-age=60"), ("Vary", "Cookie")]])
def test_public_or_vary_cookie_responses_are_shared_with_cookie_requests(make, headers):
    app = App(headers=headers)
    mw = make(app)
    c = client(mw)
    _cookie_get(c)
    settled(mw)
    assert cache_status(_cookie_get(c)).startswith("cachefetch; hit")
    if ("Vary", "Cookie") in headers:
        assert not cache_status(_cookie_get(c, "session=2")).startswith("cachefetch; hit")
    assert_clean(mw)


def test_cookies_ignore_opts_out(make):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app, cookies="ignore")
    c = client(mw)
    _cookie_get(c)
    settled(mw)
    assert cache_status(_cookie_get(c, "other=2")).startswith("cachefetch; hit")
    with pytest.raises(ValueError):
        CacheFetch(app, mw.store, cookies="sometimes")
    assert_clean(mw)


def test_a_response_with_too_many_headers_passes_through_unstored(make):
    app = App(headers=[("Cache-Control", "max-age=60")] + [(f"X-H{i}", "v") for i in range(200)])
    mw = make(app)
    c = client(mw)
    assert cache_status(c.get("/r", buffered=True)) == "cachefetch; fwd=miss; detail=too-many-headers"
    assert len(mw.index) == 0
    assert_clean(mw)
