"""cachefetch.middleware.CacheFetch, in process: werkzeug's test Client and
real threads calling the WSGI app directly. (The gunicorn tests are elsewhere.)

Time is an injected clock (``now[0]``), never a sleep.
"""
from __future__ import annotations

import math
import os
import threading
import time

import pytest
from werkzeug.test import Client, EnvironBuilder

from cachefetch import policy
from cachefetch.index import SQLiteIndex
from cachefetch.inflight import Flights
from cachefetch.middleware import CacheFetch, default_key
from cachefetch.store import CAFS

WAIT = 10.0
HIT = "cachefetch; hit"
STORED = "cachefetch; fwd=miss; stored"
COLLAPSED = "cachefetch; fwd=miss; collapsed"


class App:
    """A WSGI app that counts its calls and numbers its bodies (``call=N``).

    :param status: the status line it answers with.
    :param headers: headers added after ``Content-Type: text/plain``.
    :param chunks: how many pieces the body is sent in.
    :param error: raised instead of answering, when set.
    """

    def __init__(self, status: str = "200 OK", headers=(), chunks: int = 1, size: int = 0) -> None:
        self.status = status
        self.headers = list(headers)
        self.chunks = chunks
        self.size = size  # pad the body to at least this many bytes
        self.error: BaseException | None = None
        self.calls = 0
        self.environs: list[dict] = []
        self._lock = threading.Lock()

    def body(self, n: int, environ) -> bytes:
        text = f"call={n} path={environ.get('PATH_INFO')} lang={environ.get('HTTP_ACCEPT_LANGUAGE', '-')}\n"
        return text.encode().ljust(self.size, b".")

    def __call__(self, environ, start_response):
        with self._lock:
            self.calls += 1
            n = self.calls
            self.environs.append(environ)
        if self.error is not None:
            raise self.error
        body = self.body(n, environ)
        start_response(self.status, [("Content-Type", "text/plain")] + self.headers)
        step = max(1, math.ceil(len(body) / self.chunks))
        return [body[i:i + step] for i in range(0, len(body), step)]






def client(mw: CacheFetch) -> Client:
    return Client(mw, use_cookies=False)


def get(c: Client, path: str = "/r", **kw):
    return c.get(path, buffered=True, **kw)


def open_store_files(mw: CacheFetch) -> list[str]:
    """Files under the store this process still holds open (the index's aside)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        name = target.removesuffix(" (deleted)")
        if name.startswith(mw.store.root + os.sep) and not os.path.basename(name).startswith("index.sqlite3"):
            held.append(target)
    return held


def assert_clean(mw: CacheFetch) -> None:
    """No commit pending; no temp file, flight or open descriptor left behind."""
    mw.committer.flush(WAIT)
    assert os.listdir(mw.store.temp_dir) == []
    assert os.listdir(mw.flights.dir) == []
    assert mw.store.verify() == []
    assert open_store_files(mw) == []


def cache_status(r) -> str | None:
    return r.headers.get("Cache-Status")


def stored_then_flush(mw: CacheFetch, c: Client, path: str = "/r", **kw):
    r = get(c, path, **kw)
    mw.committer.flush(WAIT)
    return r


def wait_for(condition, what: str) -> None:
    """Poll ``condition`` (state another thread changes) until true, at most WAIT s."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def settled(mw: CacheFetch) -> None:
    """Wait until every flight has ended (a detached fetch may still be
    finishing after its client got a 304 or a range), then for the commits."""
    wait_for(lambda: not os.listdir(mw.flights.dir), "the flights to end")
    mw.committer.flush(WAIT)


# -- construction --------------------------------------------------------------

def _app(environ, start_response):  # pragma: no cover - never called
    raise AssertionError


@pytest.mark.parametrize("kw, exc", [
    ({"app": "not callable"}, TypeError),
    ({"store": 42}, TypeError),
    ({"index": object()}, TypeError),
    ({"key": "not callable"}, TypeError),
    ({"clock": 12.0}, TypeError),
    ({"default_ttl": -1}, ValueError),
    ({"default_ttl": "10"}, ValueError),
    ({"default_ttl": float("nan")}, ValueError),
    ({"wait_timeout": -0.1}, ValueError),
    ({"wait_timeout": "30"}, ValueError),
    ({"wait_timeout": float("nan")}, ValueError),
    ({"on_wait_timeout": "wait"}, ValueError),
    ({"on_wait_timeout": 504}, ValueError),
    ({"max_object_size": -1}, ValueError),
    ({"max_object_size": 1.5}, ValueError),
    ({"cache_statuses": ()}, ValueError),
    ({"cache_statuses": (206,)}, ValueError),
    ({"cache_statuses": (200, 199)}, ValueError),
    ({"cache_statuses": (600,)}, ValueError),
    ({"cache_statuses": ("200",)}, ValueError),
    ({"stale_if_error": -5}, ValueError),
    ({"stale_if_error": "5"}, ValueError),
    ({"stale_if_error": float("nan")}, ValueError),
    ({"cache_status": "off"}, TypeError),
    ({"cache_status": 0}, TypeError),
])
def test_invalid_options_raise_at_construction(tmp_path, kw, exc):
    kw = dict(kw)
    app = kw.pop("app", _app)
    store = kw.pop("store", tmp_path / "store")
    with pytest.raises(exc):
        CacheFetch(app, store, fsync=False, **kw)


def test_valid_construction_with_a_cafs_and_an_index(tmp_path):
    store = CAFS(tmp_path / "s", fsync=False)
    index = SQLiteIndex(tmp_path / "elsewhere.sqlite3")
    mw = CacheFetch(App(), store, index=index, default_ttl=0, wait_timeout=0, on_wait_timeout="504",
                    max_object_size=0, cache_statuses=[200, 404, 410], stale_if_error=0)
    try:
        assert mw.store is store and mw.index is index
        assert mw.rules.cache_statuses == frozenset({200, 404, 410})
        assert not os.path.exists(os.path.join(store.root, "index.sqlite3"))
    finally:
        mw.close()


def test_default_key_is_the_url_for_get_and_head():
    g = EnvironBuilder(path="/a/b", query_string="x=1", base_url="https://example.org").get_environ()
    h = EnvironBuilder(path="/a/b", query_string="x=1", base_url="https://example.org", method="HEAD").get_environ()
    assert default_key(g) == default_key(h) == "https://example.org/a/b?x=1"


# -- what passes straight through -------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_pass_through_untouched(make, method):
    app = App(headers=[("Cache-Control", "public, max-age=600")])
    mw = make(app)
    c = client(mw)
    for n in (1, 2):
        r = c.open("/r", method=method, data=b"payload", buffered=True)
        assert r.status_code == 200
        assert "Cache-Status" not in r.headers
        assert r.data.startswith(f"call={n} ".encode())
    assert app.calls == 2
    assert app.environs[0]["wsgi.input"].read() == b"payload"  # the app got the request as is
    r = get(c)
    assert cache_status(r) == STORED  # nothing was stored by those
    assert app.calls == 3
    assert_clean(mw)


def test_key_function_returning_none_disables_caching(make):
    app = App(headers=[("Cache-Control", "max-age=600")])
    mw = make(app, key=lambda environ: None)
    c = client(mw)
    for n in (1, 2, 3):
        r = stored_then_flush(mw, c)
        assert r.data.startswith(f"call={n} ".encode())
        assert "Cache-Status" not in r.headers
    assert len(mw.index) == 0
    assert_clean(mw)


def test_custom_key_function(make):
    app = App(headers=[("Cache-Control", "max-age=600")])
    mw = make(app, key=lambda environ: "k:" + environ["PATH_INFO"])  # ignores the query
    c = client(mw)
    assert cache_status(stored_then_flush(mw, c, "/a?x=1")) == STORED
    r = get(c, "/a?x=2")
    assert cache_status(r).startswith(HIT)
    assert r.data.startswith(b"call=1 ")
    assert [e.key for e in mw.index] == ["k:/a"]
    assert_clean(mw)


def test_key_function_returning_a_non_str_is_a_type_error(make):
    mw = make(App(), key=lambda environ: 42)
    with pytest.raises(TypeError):
        get(client(mw))
    assert_clean(mw)


# -- miss, hit, validators, ranges ------------------------------------------

def test_miss_then_hit(make, now):
    app = App(headers=[("Cache-Control", "max-age=60"), ("X-Custom", "yes")], size=5000, chunks=4)
    mw = make(app)
    c = client(mw)
    r1 = stored_then_flush(mw, c)
    assert r1.status_code == 200
    assert cache_status(r1) == STORED
    assert "Age" not in r1.headers
    body = r1.data
    assert len(body) == 5000 and body.startswith(b"call=1 ")

    now[0] += 7
    r2 = get(c)
    assert r2.status_code == 200
    assert cache_status(r2).startswith(HIT)
    assert cache_status(r2) == "cachefetch; hit; ttl=53"
    assert r2.data == body
    assert r2.headers["Age"] == "7"
    assert r2.headers["Content-Type"] == "text/plain"
    assert r2.headers["Content-Length"] == "5000"
    assert r2.headers["X-Custom"] == "yes"
    assert r2.headers["Cache-Control"] == "max-age=60"
    [entry] = mw.index.get("http://localhost/r")
    assert r2.headers["ETag"] == f'"{entry.hash.hex}"'
    assert app.calls == 1

    now[0] += 3
    assert get(c).headers["Age"] == "10"

    r304 = get(c, headers={"If-None-Match": r2.headers["ETag"]})
    assert r304.status_code == 304
    assert r304.data == b""
    assert cache_status(r304).startswith(HIT)

    r206 = get(c, headers={"Range": "bytes=10-19"})
    assert r206.status_code == 206
    assert r206.data == body[10:20]
    assert r206.headers["Content-Range"] == "bytes 10-19/5000"
    assert app.calls == 1
    assert_clean(mw)


def test_head_miss_passes_through_and_never_stores(make):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    r = c.head("/r", buffered=True)
    mw.committer.flush(WAIT)
    assert r.status_code == 200
    assert cache_status(r) == "cachefetch; fwd=miss"
    assert app.calls == 1
    assert len(mw.index) == 0
    r = get(c)
    assert cache_status(r) == STORED
    assert app.calls == 2
    assert_clean(mw)


def test_head_after_get_is_a_hit_without_body(make):
    app = App(headers=[("Cache-Control", "max-age=60")], size=300)
    mw = make(app)
    c = client(mw)
    stored_then_flush(mw, c)
    r = c.head("/r", buffered=True)
    assert r.status_code == 200
    assert cache_status(r).startswith(HIT)
    assert r.data == b""
    assert r.headers["Content-Length"] == "300"
    assert app.calls == 1
    assert_clean(mw)


def test_app_etag_is_replayed_and_used_for_if_none_match(make):
    app = App(headers=[("Cache-Control", "max-age=60"), ("ETag", '"v1"')])
    mw = make(app)
    c = client(mw)
    r1 = stored_then_flush(mw, c)
    assert r1.headers.getlist("ETag") == ['"v1"']
    r2 = get(c)
    assert cache_status(r2).startswith(HIT)
    assert r2.headers.getlist("ETag") == ['"v1"']
    r304 = get(c, headers={"If-None-Match": '"v1"'})
    assert r304.status_code == 304
    assert r304.headers["ETag"] == '"v1"'
    other = get(c, headers={"If-None-Match": '"v0"'})
    assert other.status_code == 200 and other.data == r1.data
    assert app.calls == 1
    assert_clean(mw)


# -- request directives --------------------------------------------------------

def test_request_no_store_bypasses_the_cache(make):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    for n in (1, 2):
        r = stored_then_flush(mw, c, headers={"Cache-Control": "no-store"})
        assert r.data.startswith(f"call={n} ".encode())
        assert cache_status(r) == "cachefetch; fwd=request"
    assert len(mw.index) == 0
    assert cache_status(stored_then_flush(mw, c)) == STORED  # now stored
    r = get(c, headers={"Cache-Control": "no-store"})  # not answered from the cache either
    assert r.data.startswith(b"call=4 ")
    assert app.calls == 4
    assert_clean(mw)


@pytest.mark.parametrize("headers", [{"Cache-Control": "no-cache"}, {"Pragma": "no-cache"}])
def test_request_no_cache_refetches_and_stores(make, headers):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    stored_then_flush(mw, c)
    assert cache_status(get(c)).startswith(HIT)
    r = stored_then_flush(mw, c, headers=headers)
    assert app.calls == 2
    assert r.data.startswith(b"call=2 ")
    assert cache_status(r) == "cachefetch; fwd=request; stored"  # RFC 9211: the request forced it
    r = get(c)
    assert cache_status(r).startswith(HIT)
    assert r.data.startswith(b"call=2 ")  # the refetched response replaced the old one
    assert app.calls == 2
    assert_clean(mw)


def test_pragma_is_ignored_when_cache_control_is_present(make):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    stored_then_flush(mw, c)
    r = get(c, headers={"Pragma": "no-cache", "Cache-Control": "max-age=3600"})
    assert cache_status(r).startswith(HIT)
    assert app.calls == 1
    assert_clean(mw)


# -- responses that are never shared -----------------------------------------

@pytest.mark.parametrize("status, headers", [
    ("200 OK", [("Set-Cookie", "session=abc"), ("Cache-Control", "public, max-age=60")]),
    ("200 OK", [("Cache-Control", "private, max-age=60")]),
    ("200 OK", [("Cache-Control", "no-store")]),
    ("200 OK", [("Vary", "*"), ("Cache-Control", "max-age=60")]),
    ("200 OK", [("Cache-Control", "max-age=0")]),
    ("200 OK", []),  # no freshness, no validator: nothing to revalidate with
    ("500 Internal Server Error", []),
    ("302 Found", [("Location", "/elsewhere")]),  # not heuristically cacheable, no explicit freshness
], ids=["set-cookie", "private", "no-store", "vary-star", "max-age-0", "no-freshness", "500", "302"])
def test_uncacheable_responses_are_never_served_to_a_second_request(make, status, headers):
    app = App(status=status, headers=headers)
    mw = make(app)
    c = client(mw)
    r1 = stored_then_flush(mw, c)
    r2 = stored_then_flush(mw, c)
    assert r1.status == r2.status == status
    assert r1.data.startswith(b"call=1 ")
    assert r2.data.startswith(b"call=2 ")
    for r in (r1, r2):
        assert cache_status(r).startswith("cachefetch; fwd=miss; detail=")
    assert r1.headers.getlist("Set-Cookie") == [v for k, v in headers if k == "Set-Cookie"]  # given as is
    assert len(mw.index) == 0
    assert app.calls == 2
    assert_clean(mw)


def test_authorization_is_not_served_a_plain_stored_response(make):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    stored_then_flush(mw, c)
    r = stored_then_flush(mw, c, headers={"Authorization": "Bearer alice"})
    assert r.data.startswith(b"call=2 ")
    assert not cache_status(r).startswith(HIT)
    # ... and the authorized response did not replace the shared one.
    r = get(c)
    assert cache_status(r).startswith(HIT) and r.data.startswith(b"call=1 ")
    assert app.calls == 2
    assert_clean(mw)


def test_authorized_plain_response_is_not_stored(make):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    for n in (1, 2):
        r = stored_then_flush(mw, c, headers={"Authorization": "Bearer alice"})
        assert r.data.startswith(f"call={n} ".encode())
        assert cache_status(r) == "cachefetch; fwd=miss; detail=authorization"
    assert len(mw.index) == 0
    r = get(c)
    assert r.data.startswith(b"call=3 ")
    assert_clean(mw)


@pytest.mark.parametrize("cc", ["public, max-age=60", "s-maxage=60", "max-age=60, must-revalidate"])
def test_authorization_may_share_public_s_maxage_must_revalidate(make, cc):
    app = App(headers=[("Cache-Control", cc)])
    mw = make(app)
    c = client(mw)
    r1 = stored_then_flush(mw, c, headers={"Authorization": "Bearer alice"})
    assert cache_status(r1) == STORED
    r2 = get(c, headers={"Authorization": "Bearer bob"})
    assert cache_status(r2).startswith(HIT)
    assert r2.data == r1.data
    assert cache_status(get(c)).startswith(HIT)
    assert app.calls == 1
    assert_clean(mw)


# -- Vary -----------------------------------------------------------------------

def test_vary_gives_separate_entries(make):
    app = App(headers=[("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")])
    mw = make(app)
    c = client(mw)
    en = stored_then_flush(mw, c, headers={"Accept-Language": "en"})
    de = stored_then_flush(mw, c, headers={"Accept-Language": "de"})
    assert cache_status(en) == cache_status(de) == STORED
    assert b"lang=en" in en.data and b"lang=de" in de.data
    assert app.calls == 2
    for lang, first in (("en", en), ("de", de), ("en", en)):
        r = get(c, headers={"Accept-Language": lang})
        assert cache_status(r).startswith(HIT)
        assert r.data == first.data
        assert r.headers["Vary"] == "Accept-Language"
    r = get(c, headers={"Accept-Language": "  de "})  # the same value, other whitespace
    assert cache_status(r).startswith(HIT) and r.data == de.data
    r = stored_then_flush(mw, c, headers={"Accept-Language": "fr"})
    assert b"lang=fr" in r.data and cache_status(r) == STORED
    assert app.calls == 3
    assert len(mw.index.get("http://localhost/r")) == 3
    assert_clean(mw)


def test_a_variant_stored_between_plan_and_lead_moves_the_fetch_to_its_own_variants_flight(make, monkeypatch):
    """Planned before any variant was stored, a request would lead the unvaried
    flight; if one is stored before it leads, it leads its own variant's, the
    flight the next request for that variant will look for."""
    app = App(headers=[("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")])
    mw = make(app)
    c = client(mw)
    led: list[str] = []
    original = Flights.lead

    def lead(flights, key):
        led.append(key.rpartition("\n")[2])
        if len(led) == 1:  # fr has planned with nothing stored: en is stored now
            stored_then_flush(mw, client(mw), headers={"Accept-Language": "en"})
        return original(flights, key)

    monkeypatch.setattr(Flights, "lead", lead)
    fr = get(c, headers={"Accept-Language": "fr"})
    monkeypatch.setattr(Flights, "lead", original)
    mw.committer.flush(WAIT)
    assert b"lang=fr" in fr.data and cache_status(fr) == STORED
    assert led[0] == "" and led[-1] == policy.variant_of({"HTTP_ACCEPT_LANGUAGE": "fr"}, ("accept-language",))
    assert app.calls == 2
    assert cache_status(get(c, headers={"Accept-Language": "fr"})).startswith(HIT)
    assert_clean(mw)


# -- freshness -----------------------------------------------------------------

def test_max_age_expiry_refetches(make, now):
    app = App(headers=[("Cache-Control", "max-age=10")])
    mw = make(app)
    c = client(mw)
    stored_then_flush(mw, c)
    now[0] += 9.5
    assert cache_status(get(c)).startswith(HIT)
    now[0] += 1
    r = stored_then_flush(mw, c)
    assert app.calls == 2
    assert r.data.startswith(b"call=2 ")
    assert cache_status(r).endswith("; stored")
    r = get(c)
    assert cache_status(r).startswith(HIT) and r.data.startswith(b"call=2 ")
    assert r.headers["Age"] == "0"
    assert_clean(mw)


def test_age_from_upstream_counts_against_freshness(make, now):
    app = App(headers=[("Cache-Control", "max-age=10"), ("Age", "8")])
    mw = make(app)
    c = client(mw)
    stored_then_flush(mw, c)
    now[0] += 1
    r = get(c)
    assert cache_status(r).startswith(HIT) and r.headers["Age"] == "9"
    now[0] += 1.5
    get(c)
    assert app.calls == 2
    assert_clean(mw)


def test_default_ttl_applies_when_the_response_states_none(make, now):
    app = App()
    mw = make(app, default_ttl=30)
    c = client(mw)
    stored_then_flush(mw, c)
    now[0] += 29
    assert cache_status(get(c)).startswith(HIT)
    now[0] += 2
    stored_then_flush(mw, c)
    assert app.calls == 2
    assert_clean(mw)


def test_stated_freshness_beats_default_ttl(make, now):
    app = App(headers=[("Cache-Control", "max-age=100")])
    mw = make(app, default_ttl=30)
    c = client(mw)
    stored_then_flush(mw, c)
    now[0] += 60
    assert cache_status(get(c)).startswith(HIT)
    assert app.calls == 1
    assert_clean(mw)


def test_default_ttl_forever_never_expires(make, now):
    app = App()
    mw = make(app, default_ttl="forever")
    c = client(mw)
    stored_then_flush(mw, c)
    now[0] += 10 * 365 * 86400
    r = get(c)
    assert cache_status(r) == HIT  # no ttl to report
    assert r.headers["Age"] == str(10 * 365 * 86400)
    assert app.calls == 1
    assert_clean(mw)


# -- stale-if-error --------------------------------------------------------------

def _stored_then_expired(make, now, cc="max-age=10", **kw):
    app = App(headers=[("Cache-Control", cc)])
    # Only 200s are stored here: the app's 503s carry its max-age too.
    mw = make(app, cache_statuses=(200,), **kw)
    c = client(mw)
    first = stored_then_flush(mw, c)
    now[0] += 20  # 10 s past expiry
    return app, mw, c, first


def test_stale_if_error_when_the_app_raises(make, now):
    app, mw, c, first = _stored_then_expired(make, now, stale_if_error=60)
    app.error = RuntimeError("database down")
    r = get(c)
    assert r.status_code == 200
    assert r.data == first.data
    assert "stale-if-error" in cache_status(r)
    assert r.headers["Age"] == "20"
    assert app.calls == 2
    assert_clean(mw)


def test_stale_if_error_when_the_app_answers_503(make, now):
    app, mw, c, first = _stored_then_expired(make, now, stale_if_error=60)
    app.status = "503 Service Unavailable"
    r = get(c)
    assert r.status_code == 200
    assert r.data == first.data
    assert "stale-if-error" in cache_status(r)
    # Recovery: a good answer is stored again.
    app.status = "200 OK"
    r = stored_then_flush(mw, c)
    assert r.data.startswith(b"call=3 ") and cache_status(r).endswith("; stored")
    assert cache_status(get(c)).startswith(HIT)
    assert_clean(mw)


def test_without_stale_if_error_the_error_goes_through(make, now):
    app, mw, c, _ = _stored_then_expired(make, now)
    app.error = RuntimeError("database down")
    with pytest.raises(RuntimeError, match="database down"):
        get(c)
    app.error = None
    app.status = "503 Service Unavailable"
    r = get(c)
    assert r.status_code == 503
    assert r.data.startswith(b"call=3 ")
    assert_clean(mw)


def test_stale_if_error_window_is_bounded(make, now):
    app, mw, c, _ = _stored_then_expired(make, now, stale_if_error=5)  # 10 s stale > 5
    app.status = "503 Service Unavailable"
    assert get(c).status_code == 503
    app.error = RuntimeError("down")
    with pytest.raises(RuntimeError):
        get(c)
    assert_clean(mw)


def test_must_revalidate_forbids_stale(make, now):
    app, mw, c, _ = _stored_then_expired(make, now, cc="max-age=10, must-revalidate", stale_if_error=3600)
    app.status = "503 Service Unavailable"
    r = get(c)
    assert r.status_code == 503
    assert "stale-if-error" not in (cache_status(r) or "")
    app.error = RuntimeError("down")
    with pytest.raises(RuntimeError):
        get(c)
    assert_clean(mw)


# -- sizes, statuses, WSGI corners ------------------------------------------------

@pytest.mark.parametrize("with_length", [False, True])
def test_larger_than_max_object_size_is_streamed_but_not_stored(make, with_length):
    app = App(headers=[("Cache-Control", "max-age=60")], size=10_000, chunks=10)
    if with_length:
        app.headers.append(("Content-Length", "10000"))
    mw = make(app, max_object_size=4096)
    c = client(mw)
    r1 = stored_then_flush(mw, c)
    assert r1.status_code == 200
    assert len(r1.data) == 10_000 and r1.data.startswith(b"call=1 ")
    assert len(mw.index) == 0
    assert list(mw.store) == []
    r2 = stored_then_flush(mw, c)
    assert r2.data.startswith(b"call=2 ")
    assert app.calls == 2
    assert_clean(mw)


def test_max_object_size_exactly_is_stored(make):
    app = App(headers=[("Cache-Control", "max-age=60")], size=4096, chunks=3)
    mw = make(app, max_object_size=4096)
    c = client(mw)
    stored_then_flush(mw, c)
    assert cache_status(get(c)).startswith(HIT)
    assert app.calls == 1
    assert_clean(mw)


def test_cache_statuses_can_store_a_404(make):
    app = App(status="404 Not Found", headers=[("Cache-Control", "max-age=60")])
    mw = make(app, cache_statuses=(200, 404))
    c = client(mw)
    r1 = stored_then_flush(mw, c)
    assert r1.status_code == 404 and cache_status(r1) == STORED
    r2 = get(c)
    assert r2.status_code == 404
    assert cache_status(r2).startswith(HIT)
    assert r2.data == r1.data
    # Not a 200: replayed as is, no Range.
    r3 = get(c, headers={"Range": "bytes=0-1"})
    assert r3.status_code == 404 and r3.data == r1.data
    assert app.calls == 1
    assert_clean(mw)


def test_app_calling_start_response_lazily(make):
    calls = []

    def app(environ, start_response):
        calls.append(1)

        def body():
            start_response("200 OK", [("Content-Type", "text/x-lazy"), ("Cache-Control", "max-age=60")])
            yield b"first,"
            yield b"second"
        return body()

    mw = make(app)
    c = client(mw)
    r1 = stored_then_flush(mw, c)
    assert r1.status_code == 200 and r1.data == b"first,second"
    assert cache_status(r1) == STORED
    r2 = get(c)
    assert cache_status(r2).startswith(HIT)
    assert r2.data == b"first,second" and r2.headers["Content-Type"] == "text/x-lazy"
    assert len(calls) == 1
    assert_clean(mw)


def test_legacy_write_callable(make):
    calls = []

    def app(environ, start_response):
        calls.append(1)
        write = start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")])
        write(b"written-1,")
        write(b"written-2,")
        return [b"returned"]

    mw = make(app)
    c = client(mw)
    r1 = stored_then_flush(mw, c)
    assert r1.data == b"written-1,written-2,returned"
    assert cache_status(r1) == STORED
    r2 = get(c)
    assert cache_status(r2).startswith(HIT) and r2.data == r1.data
    assert len(calls) == 1
    assert_clean(mw)


def test_legacy_write_on_an_uncacheable_response(make):
    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain"), ("Set-Cookie", "a=b")])
        write(b"head,")
        return [b"tail"]

    mw = make(app)
    r = get(client(mw))
    assert r.data == b"head,tail"
    assert_clean(mw)


def test_app_iterable_is_closed(make):
    closed = []

    class Body:
        def __iter__(self):
            yield b"x" * 100

        def close(self):
            closed.append(1)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")])
        return Body()

    mw = make(app)
    stored_then_flush(mw, client(mw))
    assert closed == [1]
    assert_clean(mw)


def test_blob_deleted_behind_the_index_refetches(make):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    stored_then_flush(mw, c)
    [entry] = mw.index.get("http://localhost/r")
    assert mw.store.delete(entry.hash)
    r = stored_then_flush(mw, c)
    assert r.status_code == 200
    assert r.data.startswith(b"call=2 ")
    assert cache_status(r) == STORED
    r = get(c)
    assert r.status_code == 200 and cache_status(r).startswith(HIT) and r.data.startswith(b"call=2 ")
    assert app.calls == 2
    assert_clean(mw)


def test_app_raising_on_a_miss_propagates_and_leaves_nothing(make):
    app = App(headers=[("Cache-Control", "max-age=60")])
    app.error = ValueError("boom")
    mw = make(app)
    c = client(mw)
    with pytest.raises(ValueError, match="boom"):
        get(c)
    app.error = None
    assert cache_status(stored_then_flush(mw, c)) == STORED
    assert app.calls == 2
    assert_clean(mw)


# -- threads: coalescing ----------------------------------------------------------

class Recorder:
    """Call the middleware like a WSGI server does, from any thread."""

    def __init__(self, mw: CacheFetch, path: str, method: str = "GET", headers=None) -> None:
        self.mw, self.path = mw, path
        self.method, self.request_headers = method, headers or {}
        self.status: str | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.error: BaseException | None = None
        self.environ: dict = {}  # the request's, as the middleware left it

    def start_response(self, status, headers, exc_info=None):
        self.status, self.headers = status, dict(headers)
        return lambda data: None

    def run(self) -> None:
        environ = self.environ = EnvironBuilder(path=self.path, base_url="http://example.org", method=self.method,
                                                headers=self.request_headers).get_environ()
        try:
            app_iter = self.mw(environ, self.start_response)
            try:
                body = bytearray()
                for chunk in app_iter:
                    body += chunk
                self.body = bytes(body)
            finally:
                close = getattr(app_iter, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:
            self.error = exc


class FollowCounter:
    """Wraps Flights.follow: counts the calls that attached to a flight."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        self.cond = threading.Condition()
        original = Flights.follow

        def follow(flights, key):
            result = original(flights, key)
            if result is not None:
                with self.cond:
                    self.count += 1
                    self.cond.notify_all()
            return result

        monkeypatch.setattr(Flights, "follow", follow)

    def wait_for(self, n: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.count >= n, WAIT)


def start(target) -> threading.Thread:
    t = threading.Thread(target=target)
    t.start()
    return t


def join_all(threads) -> None:
    for t in threads:
        t.join(WAIT * 2)
    assert not any(t.is_alive() for t in threads)


def leader_and_follower(mw: CacheFetch, path: str, entered: threading.Event, gate: threading.Event,
                        monkeypatch) -> tuple["Recorder", "Recorder"]:
    """Two requests for ``path``, run to the end: the second attached to the
    first's flight while the app holds the first (it sets ``entered``, then
    waits for ``gate``)."""
    follows = FollowCounter(monkeypatch)
    leader, follower = Recorder(mw, path), Recorder(mw, path)
    threads = [start(leader.run)]
    try:
        assert entered.wait(WAIT)
        threads.append(start(follower.run))
        assert follows.wait_for(1)
    finally:
        gate.set()
        join_all(threads)
    return leader, follower


def test_twenty_concurrent_requests_call_the_app_once(make, monkeypatch):
    chunks = [bytes([i]) * 65536 for i in range(24)]  # 1.5 MiB
    entered, gate = threading.Event(), threading.Event()
    calls = []

    def app(environ, start_response):
        calls.append(1)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Cache-Control", "max-age=600")])

        def body():
            entered.set()
            assert gate.wait(WAIT)  # the first byte waits for every follower
            yield from chunks
        return body()

    mw = make(app)
    follows = FollowCounter(monkeypatch)
    recorders = [Recorder(mw, "/big") for _ in range(20)]
    threads = [start(recorders[0].run)]
    try:
        assert entered.wait(WAIT)  # the leader is inside the app, before its first byte
        threads += [start(r.run) for r in recorders[1:]]
        assert follows.wait_for(19)  # every other request has attached to the leader's flight
    finally:
        gate.set()
        join_all(threads)
    assert len(calls) == 1
    assert follows.count == 19
    expected = b"".join(chunks)
    for r in recorders:
        assert r.error is None
        assert r.status == "200 OK"
        assert r.body == expected
        assert r.headers["Content-Type"] == "application/octet-stream"
        assert r.headers["Cache-Control"] == "max-age=600"
    statuses = [r.headers["Cache-Status"] for r in recorders]
    assert statuses[0] == STORED
    assert statuses.count(STORED) == 1
    # The fetch runs at the app's pace: a follower whose first look at the
    # journal comes after the body is complete is answered as a hit instead.
    hits = sum(1 for s in statuses if s.startswith(HIT))
    assert statuses.count(COLLAPSED) + hits == 19 and statuses.count(COLLAPSED) >= 1
    mw.committer.flush(WAIT)
    last = Recorder(mw, "/big")
    last.run()
    assert last.headers["Cache-Status"].startswith(HIT) and last.body == expected
    assert len(calls) == 1
    assert_clean(mw)


def test_followers_of_an_uncacheable_response_call_the_app_themselves(make, monkeypatch):
    entered, gate = threading.Event(), threading.Event()
    calls = []
    lock = threading.Lock()

    def app(environ, start_response):
        with lock:
            calls.append(1)
            n = len(calls)
        if n == 1:
            entered.set()
            assert gate.wait(WAIT)  # before the leader's status is known
        start_response("200 OK", [("Content-Type", "text/plain"), ("Set-Cookie", f"user={n}")])
        return [f"private body {n}".encode()]

    mw = make(app)
    leader, follower = leader_and_follower(mw, "/me", entered, gate, monkeypatch)
    assert leader.error is None and follower.error is None
    assert leader.body == b"private body 1" and leader.headers["Set-Cookie"] == "user=1"
    assert follower.body == b"private body 2" and follower.headers["Set-Cookie"] == "user=2"
    assert follower.headers["Cache-Status"] == "cachefetch; fwd=miss; detail=uncacheable"
    assert len(calls) == 2
    assert_clean(mw)


def test_app_failing_mid_body_drops_leader_and_followers(make, monkeypatch):
    entered, gate = threading.Event(), threading.Event()
    calls = []

    def app(environ, start_response):
        calls.append(1)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")])

        def body():
            yield b"a" * 1000
            if len(calls) == 1:
                entered.set()
                assert gate.wait(WAIT)
                raise OSError("the app died mid-body")
            yield b"b" * 1000
        return body()

    mw = make(app)
    follows = FollowCounter(monkeypatch)
    recorders = [Recorder(mw, "/f") for _ in range(4)]
    threads = [start(recorders[0].run)]
    try:
        assert entered.wait(WAIT)
        threads += [start(r.run) for r in recorders[1:]]
        assert follows.wait_for(3)
    finally:
        gate.set()
        join_all(threads)
    leader, *rest = recorders
    assert leader.status == "200 OK" and leader.error is not None  # the leader's connection drops
    for r in rest:
        # Never a complete-looking body: a follower that had started answering is
        # dropped like the leader; one that had not yet (the body file was gone
        # when it looked) is told 502.
        if r.error is None:
            assert r.status.startswith("502 ")
            assert r.headers["Cache-Status"] == "cachefetch; fwd=miss; collapsed; detail=fetch-failed"
        else:
            assert len(r.body) < 2000
    assert len(mw.index) == 0
    assert_clean(mw)
    again = Recorder(mw, "/f")
    again.run()
    assert again.error is None and again.body == b"a" * 1000 + b"b" * 1000
    assert again.headers["Cache-Status"] == STORED
    assert len(calls) == 2
    assert_clean(mw)


@pytest.mark.parametrize("policy_, status", [("passthrough", 200), ("504", 504)])
def test_follower_wait_timeout(make, monkeypatch, policy_, status):
    entered, gate = threading.Event(), threading.Event()
    calls = []
    lock = threading.Lock()

    def app(environ, start_response):
        with lock:
            calls.append(1)
            n = len(calls)
        if n == 1:
            entered.set()
            assert gate.wait(WAIT)  # the leader's response starts only after the follower gave up
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")])
        return [f"call={n}".encode()]

    mw = make(app, wait_timeout=0.05, on_wait_timeout=policy_)
    follows = FollowCounter(monkeypatch)
    leader, follower = Recorder(mw, "/slow"), Recorder(mw, "/slow")
    threads = [start(leader.run)]
    try:
        assert entered.wait(WAIT)
        follower.run()  # in this thread: it returns once its wait_timeout has passed
    finally:
        gate.set()
        join_all(threads)
    assert follows.count == 1
    assert follower.error is None
    assert int(follower.status[:3]) == status
    if policy_ == "passthrough":
        assert follower.body == b"call=2"
        assert follower.headers["Cache-Status"] == "cachefetch; fwd=miss; detail=wait-timeout"
        assert len(calls) == 2
    else:
        assert follower.headers["Cache-Status"] == "cachefetch; fwd=miss; collapsed; detail=wait-timeout"
        assert len(calls) == 1
    assert leader.error is None and leader.body == b"call=1" and leader.headers["Cache-Status"] == STORED
    assert_clean(mw)
    assert len(mw.index) == 1


def _join_detached_fetches() -> None:
    """Join the threads that fetch bodies (they run on whether or not a client reads)."""
    for t in threading.enumerate():
        if t.name == "cachefetch-fill":
            t.join(WAIT)
            assert not t.is_alive()


def test_leader_client_hanging_up_still_completes_for_followers_and_cache(make, monkeypatch):
    chunks = [bytes([65 + i]) * 10_000 for i in range(10)]
    entered, gate = threading.Event(), threading.Event()
    calls = []

    def app(environ, start_response):
        calls.append(1)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")])

        def body():
            entered.set()
            assert gate.wait(WAIT)
            yield from chunks
        return body()

    mw = make(app)
    follows = FollowCounter(monkeypatch)
    leader_out: dict = {}

    def impatient_leader() -> None:  # reads one chunk, then hangs up
        environ = EnvironBuilder(path="/big", base_url="http://example.org").get_environ()
        app_iter = mw(environ, lambda status, headers, exc_info=None: None)
        try:
            leader_out["first"] = next(iter(app_iter))
        finally:
            app_iter.close()

    followers = [Recorder(mw, "/big") for _ in range(3)]
    threads = [start(impatient_leader)]
    try:
        assert entered.wait(WAIT)
        threads += [start(r.run) for r in followers]
        assert follows.wait_for(3)
    finally:
        gate.set()
        join_all(threads)
    _join_detached_fetches()
    assert leader_out["first"] and b"".join(chunks).startswith(leader_out["first"])
    for r in followers:
        assert r.error is None and r.body == b"".join(chunks)
        # A follower that first looks once the fill has the whole body waits for
        # the commit and is answered as a hit: either way, never by the app.
        assert r.headers["Cache-Status"] == COLLAPSED or r.headers["Cache-Status"].startswith(HIT)
    assert_clean(mw)
    r = Recorder(mw, "/big")
    r.run()
    assert r.headers["Cache-Status"].startswith(HIT) and r.body == b"".join(chunks)
    assert len(calls) == 1
    assert_clean(mw)


# -- a request arriving after the body is complete, before the entry is recorded ---

def _following_fds(mw: CacheFetch) -> int:
    """How many descriptors of this process have a flight journal open."""
    return sum(1 for t in open_store_files(mw) if t.startswith(mw.flights.dir))


@pytest.mark.parametrize("hold", ["commit", "index"])
@pytest.mark.parametrize("ask, expect_status, expect_body", [
    ({}, 200, None),
    ({"Range": "bytes=10-19"}, 206, slice(10, 20)),
    ({"If-None-Match": '"v1"'}, 304, slice(0, 0)),
    ({"Cache-Control": "max-age=0"}, 200, "refetch"),
], ids=["plain", "range", "conditional", "request-max-age"])
def test_request_between_body_end_and_entry_is_answered_as_a_hit(make, monkeypatch, hold, ask, expect_status,
                                                                  expect_body, now):
    """``commit``: the temp file is complete but not yet renamed; ``index``: the
    blob is committed but the entry not yet recorded. A request arriving then
    waits for the commit and is answered as a hit in every respect: its Range,
    its conditionals and its own freshness requirements apply."""
    app = App(headers=[("Cache-Control", "max-age=60"), ("ETag", '"v1"')], size=50_000, chunks=5)
    mw = make(app)
    held, gate = threading.Event(), threading.Event()
    target = mw.store if hold == "commit" else mw.index
    name = "commit" if hold == "commit" else "put"
    original = getattr(target, name)

    def holding(*args, **kwargs):
        held.set()
        assert gate.wait(WAIT)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, holding)
    c = client(mw)
    answers = []
    try:
        first = get(c)
        assert first.status_code == 200 and cache_status(first) == STORED
        assert held.wait(WAIT)  # the commit thread is now held
        now[0] += 5  # the second request comes later: its Age shows it
        second = threading.Thread(target=lambda: answers.append(get(client(mw), headers=ask)))
        second.start()
        wait_for(lambda: _following_fds(mw) > 0, "the second request to attach to the flight")
        assert not answers  # it waits for the commit rather than answering from the flight
    finally:
        gate.set()
    second.join(WAIT)
    (r,) = answers
    assert r.status_code == expect_status
    if expect_body == "refetch":  # max-age=0 refuses a 5 s old response: revalidated with the app
        assert cache_status(r).startswith("cachefetch; fwd=request") and app.calls == 2
    else:
        assert cache_status(r).startswith(HIT) and r.headers["Age"] == "5"
        assert r.data == (first.data if expect_body is None else first.data[expect_body])
        assert app.calls == 1
    settled(mw)
    assert_clean(mw)


def _gated_app(chunks, headers=(("Cache-Control", "max-age=60"),)):
    """An app whose first call waits on ``gate`` after its first chunk (the
    response has started); it records each call's environ."""
    entered, gate = threading.Event(), threading.Event()
    environs = []
    lock = threading.Lock()

    def app(environ, start_response):
        with lock:
            environs.append(environ)
            n = len(environs)
        start_response("200 OK", [("Content-Type", "text/plain"), *headers])

        def body():
            lang = environ.get("HTTP_ACCEPT_LANGUAGE", "-").encode()
            yield lang + b":" + chunks[0]
            if n == 1:
                entered.set()
                assert gate.wait(WAIT)
            yield from chunks[1:]
        return body()

    return app, entered, gate, environs


def test_head_joins_a_get_flight(make, monkeypatch):
    app, entered, gate, environs = _gated_app([b"x" * 1000, b"y" * 1000])
    mw = make(app)
    follows = FollowCounter(monkeypatch)
    leader = Recorder(mw, "/h")
    threads = [start(leader.run)]
    try:
        assert entered.wait(WAIT)
        head = Recorder(mw, "/h", method="HEAD")
        head.run()
        assert follows.count == 1
    finally:
        gate.set()
        join_all(threads)
    assert head.error is None and head.body == b""
    assert head.status == "200 OK"
    assert head.headers["Cache-Status"] == COLLAPSED
    assert head.headers["Cache-Control"] == "max-age=60"
    assert len(environs) == 1
    assert leader.error is None and leader.body == b"-:" + b"x" * 1000 + b"y" * 1000
    assert_clean(mw)


def test_authorized_request_never_follows_a_flight(make, monkeypatch):
    app, entered, gate, environs = _gated_app([b"x" * 10, b"y" * 10])
    mw = make(app)
    follows = FollowCounter(monkeypatch)
    leader = Recorder(mw, "/a")
    threads = [start(leader.run)]
    try:
        assert entered.wait(WAIT)
        r = get(client(mw), "/a", base_url="http://example.org", headers={"Authorization": "Bearer bob"})
    finally:
        gate.set()
        join_all(threads)
    assert follows.count == 0
    assert len(environs) == 2
    assert environs[1].get("HTTP_AUTHORIZATION") == "Bearer bob"
    assert r.status_code == 200 and r.data == b"-:" + b"x" * 10 + b"y" * 10
    assert cache_status(r) == "cachefetch; fwd=miss"
    assert leader.headers["Cache-Status"] == STORED
    assert_clean(mw)


def test_a_follower_of_another_variant_gets_its_own(make, monkeypatch):
    app, entered, gate, environs = _gated_app([b"x" * 10, b"y" * 10],
                                              headers=(("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")))
    mw = make(app)
    follows = FollowCounter(monkeypatch)
    en = Recorder(mw, "/v", headers={"Accept-Language": "en"})
    de = Recorder(mw, "/v", headers={"Accept-Language": "de"})
    threads = [start(en.run)]
    try:
        assert entered.wait(WAIT)  # en's response has started: its Vary is known
        threads.append(start(de.run))
        assert follows.wait_for(1)  # de attached to en's flight (no entry says it varies yet)
    finally:
        gate.set()
        join_all(threads)
    full = b":" + b"x" * 10 + b"y" * 10
    assert en.error is None and en.body == b"en" + full
    assert de.error is None and de.body == b"de" + full  # never the English body
    assert sorted(e.get("HTTP_ACCEPT_LANGUAGE") for e in environs) == ["de", "en"]
    assert_clean(mw)
    assert len(mw.index.get("http://example.org/v")) == 2
    for lang, r in (("en", en), ("de", de)):
        again = Recorder(mw, "/v", headers={"Accept-Language": lang})
        again.run()
        assert again.headers["Cache-Status"].startswith(HIT) and again.body == r.body
    assert len(environs) == 2
    assert_clean(mw)


def test_leader_asks_the_app_for_the_whole_unconditional_response(make):
    """The cache answers conditionals and ranges itself: the app is asked for the
    full 200 so that it can be stored and shared with followers (...and the
    whole body is stored although the client wanted none of it)."""
    app = App(headers=[("Cache-Control", "max-age=60"), ("ETag", '"v1"')])
    mw = make(app)
    c = client(mw)
    r = get(c, headers={"If-None-Match": '"v1"', "Range": "bytes=0-3",
                        "If-Modified-Since": "Wed, 21 Oct 2015 07:28:00 GMT"})
    # The client's own conditional is answered from the new response...
    assert r.status_code == 304 and r.headers["ETag"] == '"v1"' and r.data == b""
    settled(mw)
    seen = app.environs[0]
    assert not {"HTTP_IF_NONE_MATCH", "HTTP_RANGE", "HTTP_IF_MODIFIED_SINCE"} & seen.keys()
    hit = get(c, headers={"Range": "bytes=0-3"})
    assert hit.status_code == 206 and hit.data == b"call"
    assert app.calls == 1
    assert_clean(mw)


def test_announced_length_over_max_object_size_is_not_stored_and_says_so(make):
    app = App(headers=[("Cache-Control", "max-age=60"), ("Content-Length", "2048")], size=2048)
    mw = make(app, max_object_size=1024)
    c = client(mw)
    r = stored_then_flush(mw, c)
    assert len(r.data) == 2048
    assert cache_status(r) == "cachefetch; fwd=miss; detail=too-large"
    assert get(c).data.startswith(b"call=2 ")
    assert list(mw.store) == []
    assert_clean(mw)


@pytest.mark.parametrize("kw", [{"max_object_size": True}, {"wait_timeout": False}, {"default_ttl": True},
                                {"cache_statuses": (True,)}])
def test_booleans_are_not_numbers(tmp_path, kw):
    with pytest.raises(ValueError):
        CacheFetch(_app, tmp_path / "store", **kw)


def test_head_that_finds_no_flight_looks_at_the_index_once_more(make, monkeypatch):
    """A HEAD cannot lead: when its first look found nothing and the flight has
    ended by the time it looks for one, the entry that flight committed answers it."""
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    stored_then_flush(mw, c)
    real_get = mw.index.get
    looks = []

    def first_look_misses(key):  # the commit lands just after the first look
        looks.append(key)
        return [] if len(looks) == 1 else real_get(key)

    monkeypatch.setattr(mw.index, "get", first_look_misses)
    r = c.head("/r")
    assert r.status_code == 200 and r.data == b""
    assert cache_status(r).startswith(HIT)
    assert app.calls == 1 and len(looks) == 2
    assert_clean(mw)


# -- cache_status=False ----------------------------------------------------------

def test_without_cache_status_no_answer_carries_the_field_and_the_environ_still_does(make, now):
    """RFC 9211 §6: the field tells any client what the cache holds; a
    deployment may keep it to its logs. Every kind of answer, checked."""
    app = App(headers=[("Cache-Control", "max-age=60"), ("ETag", '"v1"')], size=5000)
    mw = make(app, cache_status=False, stale_if_error=600)

    def ask(path="/r", method="GET", headers=None):
        r = Recorder(mw, path, method, headers)
        r.run()
        assert r.error is None, r.error
        assert [k for k in r.headers if k.lower() == "cache-status"] == [], r.headers
        return r.status[:3], str(r.environ.get("cachefetch.cache_status")), r.body

    assert ask()[:2] == ("200", STORED)
    settled(mw)
    assert ask(headers={"If-None-Match": '"v1"'})[:2] == ("304", "cachefetch; hit; ttl=60")
    assert ask(headers={"Range": "bytes=0-9"})[0] == "206"
    assert ask(method="HEAD")[:2] == ("200", "cachefetch; hit; ttl=60")
    full, hot = ask(), ask()  # the first plain GET teaches the hot table, the second is answered from it
    assert full[:2] == hot[:2] == ("200", "cachefetch; hit; ttl=60") and len(mw.hot) == 1
    assert ask(headers={"Authorization": "Basic eDp5"})[1].startswith("cachefetch; fwd=")
    assert ask("/cold", headers={"Cache-Control": "only-if-cached"})[0] == "504"
    now[0] += 120
    app.error = RuntimeError("the app is down")
    status, seen, body = ask()
    assert status == "200" and "stale-if-error" in seen and body.startswith(b"call=1 ")
    assert_clean(mw)


def test_without_cache_status_a_follower_gets_no_field(make, monkeypatch):
    entered, gate = threading.Event(), threading.Event()

    def app(environ, start_response):
        entered.set()
        assert gate.wait(WAIT)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")])
        return [b"body"]

    mw = make(app, cache_status=False)
    leader, follower = leader_and_follower(mw, "/f", entered, gate, monkeypatch)
    assert leader.body == follower.body == b"body"
    assert "Cache-Status" not in leader.headers and "Cache-Status" not in follower.headers
    assert_clean(mw)
