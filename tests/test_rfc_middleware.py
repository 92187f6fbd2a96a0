"""CacheFetch as an RFC 9111 shared cache, in process, with an injected clock:
revalidation, invalidation, freshness, targeted fields, Range on a miss."""
from __future__ import annotations

import os
import threading

import pytest

from test_middleware import WAIT, App, assert_clean, cache_status, client, get, open_store_files, settled, wait_for

LM = "Tue, 14 Nov 2023 22:13:20 GMT"  # T0 as an HTTP-date
DATE = "Tue, 14 Nov 2023 22:13:20 GMT"


class Origin(App):
    """An app that answers conditionals as an origin would: 304 when the
    request's If-None-Match holds its current ETag."""

    def __init__(self, etag='"v1"', headers=(), **kw) -> None:
        super().__init__(headers=[("ETag", etag), *headers], **kw)
        self.etag = etag
        self.not_modified = 0

    def __call__(self, environ, start_response):
        inm = environ.get("HTTP_IF_NONE_MATCH", "")
        if self.etag in [t.strip() for t in inm.split(",")] and self.error is None:
            with self._lock:
                self.calls += 1
                self.not_modified += 1
                self.environs.append(environ)
            start_response("304 Not Modified", [("ETag", self.etag), *[h for h in self.headers if h[0] != "ETag"]])
            return []
        return super().__call__(environ, start_response)


class SlowOrigin(Origin):
    """An origin whose conditional requests wait on ``gate`` (``entered`` says one came)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.entered, self.gate = threading.Event(), threading.Event()

    def __call__(self, environ, start_response):
        if "HTTP_IF_NONE_MATCH" in environ:
            self.entered.set()
            assert self.gate.wait(WAIT)
        return super().__call__(environ, start_response)






def warm(make, app, **options):
    """A CacheFetch over ``app`` whose ``/r`` has been fetched and stored: ``(mw, client, first answer)``."""
    mw = make(app, **options)
    c = client(mw)
    first = get(c)
    settled(mw)
    return mw, c, first


def blobs(mw):
    return sorted(h.hex for h in mw.store)


# -- revalidation ---------------------------------------------------------------

def test_stale_entry_is_revalidated_and_a_304_refreshes_it_without_rewriting_the_blob(make, now):
    app = Origin(headers=[("Cache-Control", "max-age=10"), ("Last-Modified", LM)])
    mw, c, first = warm(make, app)
    before = blobs(mw)
    blob_path = mw.store.path(next(iter(mw.store)))
    inode = os.stat(blob_path).st_ino
    now[0] += 20
    r = get(c)
    assert r.status_code == 200 and r.data == first.data
    assert cache_status(r) == "cachefetch; fwd=stale; fwd-status=304; ttl=10; stored"
    seen = app.environs[-1]
    assert seen["HTTP_IF_NONE_MATCH"] == '"v1"' and seen["HTTP_IF_MODIFIED_SINCE"] == LM
    assert app.calls == 2 and app.not_modified == 1
    assert blobs(mw) == before and os.stat(blob_path).st_ino == inode
    r = get(c)  # fresh again for another 10 s
    assert cache_status(r).startswith("cachefetch; hit; ttl=10") and app.calls == 2
    assert_clean(mw)


def test_a_conditional_client_gets_its_own_304_after_a_revalidation(make, now):
    app = Origin(headers=[("Cache-Control", "max-age=10")])
    mw, c, _ = warm(make, app)
    now[0] += 20
    r = get(c, headers={"If-None-Match": '"v1"'})
    assert r.status_code == 304 and r.data == b"" and r.headers["ETag"] == '"v1"'
    assert app.not_modified == 1
    assert_clean(mw)


def test_a_200_on_revalidation_replaces_the_entry(make, now):
    app = Origin(headers=[("Cache-Control", "max-age=10")])
    mw, c, _ = warm(make, app)
    now[0] += 20
    app.etag = '"v2"'
    app.headers = [("ETag", '"v2"'), ("Cache-Control", "max-age=10")]
    r = get(c)
    assert r.data.startswith(b"call=2 ") and cache_status(r) == "cachefetch; fwd=stale; stored"
    settled(mw)
    r = get(c)
    assert r.data.startswith(b"call=2 ") and r.headers["ETag"] == '"v2"' and cache_status(r).startswith("cachefetch; hit")
    assert_clean(mw)


def test_must_revalidate_revalidates_instead_of_refetching(make, now):
    app = Origin(headers=[("Cache-Control", "max-age=10, must-revalidate")])
    mw = make(app, stale_if_error=3600)
    c = client(mw)
    get(c)
    settled(mw)
    now[0] += 20
    assert get(c).status_code == 200 and app.not_modified == 1
    now[0] += 20
    app.error = RuntimeError("down")
    with pytest.raises(RuntimeError):  # must-revalidate: never stale, even when the origin fails
        get(c)
    assert_clean(mw)


def test_revalidation_failure_serves_stale_where_stale_if_error_allows(make, now):
    app = Origin(headers=[("Cache-Control", "max-age=10, stale-if-error=60")])
    mw, c, first = warm(make, app)
    now[0] += 20
    app.error = RuntimeError("down")
    r = get(c)
    assert r.data == first.data and "detail=stale-if-error" in cache_status(r)
    assert_clean(mw)


def test_response_no_cache_is_stored_and_revalidated_before_every_reuse(make, now):
    app = Origin(headers=[("Cache-Control", "no-cache, max-age=3600")])
    mw = make(app)
    c = client(mw)
    first = get(c)
    assert cache_status(first) == "cachefetch; fwd=miss; stored"
    settled(mw)
    for n in range(3):
        r = get(c)
        assert r.data == first.data and "fwd-status=304" in cache_status(r)
    assert app.calls == 4 and app.not_modified == 3
    assert_clean(mw)


def test_no_freshness_with_a_validator_is_stored_and_revalidated(make, now):
    app = Origin()  # an ETag, nothing else
    mw, c, first = warm(make, app)
    assert len(mw.index) == 1
    r = get(c)
    assert r.data == first.data and "fwd-status=304" in cache_status(r)
    assert_clean(mw)


def test_request_no_cache_revalidates_a_fresh_entry(make, now):
    app = Origin(headers=[("Cache-Control", "max-age=600")])
    mw, c, _ = warm(make, app)
    r = get(c, headers={"Cache-Control": "No-Cache"})  # directive names are case-insensitive
    assert cache_status(r).startswith("cachefetch; fwd=request; fwd-status=304")
    assert app.not_modified == 1
    assert_clean(mw)


def test_herd_on_a_stale_key_sends_one_conditional_request(make, now):
    app = SlowOrigin(headers=[("Cache-Control", "max-age=10")])
    entered, gate = app.entered, app.gate
    mw = make(app)
    first = get(client(mw))
    settled(mw)
    now[0] += 20
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(get(client(mw)))) for _ in range(10)]
    for t in threads:
        t.start()
    assert entered.wait(WAIT)
    wait_for(lambda: sum(t.startswith(mw.flights.dir) for t in open_store_files(mw)) >= 10,
             "nine followers on the revalidation (and its leader)")
    gate.set()
    for t in threads:
        t.join(WAIT)
    assert len(answers) == 10 and all(r.data == first.data and r.status_code == 200 for r in answers)
    assert app.calls == 2 and app.not_modified == 1
    statuses = sorted(cache_status(r) for r in answers)
    assert statuses.count("cachefetch; fwd=stale; fwd-status=304; collapsed") == 9
    assert_clean(mw)


def test_stale_while_revalidate_answers_at_once_and_refreshes_once_in_the_background(make, now):
    app = SlowOrigin(headers=[("Cache-Control", "max-age=10, stale-while-revalidate=60")])
    entered, gate = app.entered, app.gate
    mw = make(app)
    first = get(client(mw))
    settled(mw)
    now[0] += 20
    c = client(mw)
    answers = [get(c) for _ in range(5)]  # all answered while the revalidation is held
    assert entered.wait(WAIT)
    for r in answers:
        assert r.data == first.data and cache_status(r) == "cachefetch; hit; ttl=-10; detail=stale-while-revalidate"
    gate.set()
    settled(mw)
    assert app.not_modified == 1 and app.calls == 2
    assert cache_status(get(c)).startswith("cachefetch; hit; ttl=10")
    assert_clean(mw)


# -- freshness and age -----------------------------------------------------------

def test_a_hit_keeps_the_origin_date_and_gets_a_recomputed_age(make, now):
    app = App(headers=[("Cache-Control", "max-age=600"), ("Date", DATE), ("Age", "30")])
    mw = make(app)
    c = client(mw)
    first = get(c)
    assert first.headers["Date"] == DATE and first.headers["Age"] == "30"
    settled(mw)
    now[0] += 100
    r = get(c)
    assert r.headers.getlist("Date") == [DATE]
    assert r.headers["Age"] == "130"
    assert cache_status(r) == "cachefetch; hit; ttl=470"
    assert_clean(mw)


def test_heuristic_freshness_is_a_tenth_of_the_last_modified_age_capped(make, now):
    app = App(headers=[("Last-Modified", "Tue, 14 Nov 2023 19:26:40 GMT"), ("Date", DATE)])  # 10,000 s old
    mw = make(app, heuristic_max=600)
    c = client(mw)
    get(c)
    settled(mw)
    now[0] += 599
    assert cache_status(get(c)).startswith("cachefetch; hit; ttl=1")
    now[0] += 2
    assert not cache_status(get(c)).startswith("cachefetch; hit")  # past the cap: revalidated
    assert_clean(mw)


@pytest.mark.parametrize("expires", ["0", "Tue, 14 Nov 23 22:13:20 GMT", "Tue, 14 Nov 2030 22:13:20 +0000", "soon"])
def test_an_invalid_expires_means_already_expired(make, now, expires):
    app = App(headers=[("Expires", expires), ("Date", DATE)])
    mw = make(app)
    c = client(mw)
    r = get(c)
    assert cache_status(r) == "cachefetch; fwd=miss; detail=already-stale"
    assert get(c).data.startswith(b"call=2 ")
    assert_clean(mw)


def test_only_if_cached_is_a_504_when_nothing_is_stored(make, now):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw = make(app)
    c = client(mw)
    r = get(c, headers={"Cache-Control": "only-if-cached"})
    assert r.status_code == 504 and app.calls == 0
    get(c)
    settled(mw)
    assert get(c, headers={"Cache-Control": "only-if-cached"}).status_code == 200
    assert_clean(mw)


def test_request_max_age_and_min_fresh_refuse_an_entry_that_is_too_old(make, now):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw, c, _ = warm(make, app)
    now[0] += 30
    assert cache_status(get(c, headers={"Cache-Control": "max-age=40"})).startswith("cachefetch; hit")
    assert cache_status(get(c, headers={"Cache-Control": "max-age=20"})).startswith("cachefetch; fwd=request")
    settled(mw)
    now[0] += 30
    assert cache_status(get(c, headers={"Cache-Control": "min-fresh=40"})).startswith("cachefetch; fwd=request")
    settled(mw)
    assert_clean(mw)


def test_cdn_cache_control_takes_precedence(make, now):
    app = App(headers=[("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=60")])
    mw, c, _ = warm(make, app)
    assert cache_status(get(c)).startswith("cachefetch; hit; ttl=60")
    assert_clean(mw)


_TARGETED = [("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=60"), ("X-Ours", "max-age=5")]


def test_targeted_fields_can_be_turned_off(make, now):
    mw = make(App(headers=_TARGETED), targeted_fields=())
    assert "detail=no-store" in cache_status(get(client(mw)))
    assert_clean(mw)


def test_an_own_targeted_field_comes_first(make, now):
    mw = make(App(headers=_TARGETED), targeted_fields=("X-Ours", "CDN-Cache-Control"))
    c = client(mw)
    get(c)
    settled(mw)
    assert cache_status(get(c)).startswith("cachefetch; hit; ttl=5")
    assert_clean(mw)


def test_no_cache_and_private_field_names_are_not_stored(make, now):
    app = App(headers=[("Cache-Control", 'max-age=60, no-cache="X-Secret", private="X-User"'),
                       ("X-Secret", "s"), ("X-User", "u"), ("X-Kept", "k")])
    mw, c, _ = warm(make, app)
    r = get(c)
    assert cache_status(r).startswith("cachefetch; hit")
    assert "X-Secret" not in r.headers and "X-User" not in r.headers and r.headers["X-Kept"] == "k"
    assert_clean(mw)


# -- conditionals and ranges on hits and misses ------------------------------------

def test_client_conditionals_on_a_hit(make, now):
    app = App(headers=[("Cache-Control", "max-age=60"), ("ETag", 'W/"w1"'), ("Last-Modified", LM)])
    mw, c, _ = warm(make, app)
    assert get(c, headers={"If-None-Match": '"w1"'}).status_code == 304  # weak comparison
    assert get(c, headers={"If-Modified-Since": LM}).status_code == 304
    assert get(c, headers={"If-Modified-Since": "Tue, 14 Nov 2023 22:13:19 GMT"}).status_code == 200
    assert get(c, headers={"If-Match": '"w1"'}).status_code == 412  # strong comparison fails on a weak tag
    assert get(c, headers={"If-Unmodified-Since": "Tue, 14 Nov 2023 22:13:19 GMT"}).status_code == 412
    assert get(c, headers={"Range": "bytes=0-3", "If-Range": 'W/"w1"'}).status_code == 200  # never weak
    assert get(c, headers={"Range": "bytes=0-3", "If-Range": LM}).status_code == 206
    assert app.calls == 1
    assert_clean(mw)


def test_a_cold_range_request_gets_its_206_and_the_whole_body_is_stored(make, now):
    app = App(headers=[("Cache-Control", "max-age=60"), ("Content-Length", "300000")], size=300_000, chunks=10)
    mw = make(app)
    c = client(mw)
    r = get(c, headers={"Range": "bytes=100000-100099"})
    assert r.status_code == 206 and len(r.data) == 100
    assert r.headers["Content-Range"] == "bytes 100000-100099/300000"
    settled(mw)
    whole = get(c)
    assert cache_status(whole).startswith("cachefetch; hit") and len(whole.data) == 300_000
    assert whole.data[100000:100100] == r.data
    assert app.calls == 1
    assert_clean(mw)


def test_a_get_with_a_body_is_never_cached(make, now):
    app = App(headers=[("Cache-Control", "max-age=60")])
    mw, c, _ = warm(make, app)
    r = c.get("/r", data=b"q=1", buffered=True)
    assert r.data.startswith(b"call=2 ") and "detail=request-body" in cache_status(r)
    assert len(mw.index) == 1
    assert_clean(mw)


# -- invalidation ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "PURGE-ISH"])
def test_an_unsafe_method_invalidates_the_target(make, now, method):
    app = App(headers=[("Cache-Control", "max-age=600")])
    mw, c, _ = warm(make, app)
    assert cache_status(get(c)).startswith("cachefetch; hit")
    r = c.open("/r", method=method, buffered=True)
    assert r.status_code == 200
    after = get(c)
    assert after.data.startswith(b"call=3 ") and cache_status(after) == "cachefetch; fwd=miss; stored"
    assert_clean(mw)


def test_an_error_answer_to_an_unsafe_method_invalidates_nothing(make, now):
    app = App(headers=[("Cache-Control", "max-age=600")])
    mw, c, _ = warm(make, app)
    app.status = "500 Internal Server Error"
    c.post("/r", buffered=True)
    app.status = "200 OK"
    assert cache_status(get(c)).startswith("cachefetch; hit")
    assert_clean(mw)


def stored_then_posted(make, paths: tuple[str, ...], answer_headers: list[tuple[str, str]]):
    """Store ``paths``, then POST ``/new`` to an app that answers 201 with ``answer_headers``."""
    app = App(headers=[("Cache-Control", "max-age=600")])
    mw = make(app)
    c = client(mw)
    for path in paths:
        get(c, path)
    settled(mw)

    def poster(environ, start_response):
        start_response("201 Created", [*answer_headers, ("Content-Type", "text/plain")])
        return [b"made"]

    real = mw.app
    mw._ctx.app = poster
    c.post("/new", buffered=True)
    mw._ctx.app = real
    return mw, c


def test_same_origin_location_and_content_location_are_invalidated_too(make, now):
    mw, c = stored_then_posted(make, ("/a", "/b", "/c"),
                               [("Location", "/a"), ("Content-Location", "http://localhost/b")])
    assert not cache_status(get(c, "/a")).startswith("cachefetch; hit")
    assert not cache_status(get(c, "/b")).startswith("cachefetch; hit")
    assert cache_status(get(c, "/c")).startswith("cachefetch; hit")
    settled(mw)
    assert_clean(mw)


def test_a_location_spelling_the_default_port_invalidates_the_entry_stored_without_it(make, now):
    """``http://localhost:80/a`` is the origin ``http://localhost`` (RFC 6454): its entry goes."""
    mw, c = stored_then_posted(make, ("/a", "/b"), [("Location", "HTTP://LOCALHOST:80/a#made")])
    assert not cache_status(get(c, "/a")).startswith("cachefetch; hit")
    assert cache_status(get(c, "/b")).startswith("cachefetch; hit")
    settled(mw)
    assert_clean(mw)


def test_another_origin_in_location_is_not_invalidated(make, now):
    mw, c = stored_then_posted(make, ("/a",), [("Location", "http://other.example/a")])
    assert cache_status(get(c, "/a")).startswith("cachefetch; hit")
    assert_clean(mw)
