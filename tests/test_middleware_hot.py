"""The hot path (cachefetch.middleware.hot), in process: which requests it
answers, that its answers are the full path's to the byte, and that it never
answers from an entry the index no longer holds.

Time is an injected clock (``now[0]``), never a sleep.
"""
from __future__ import annotations

import os

import pytest
from test_middleware import HIT, App, assert_clean, cache_status, client, get, settled

KEY = "http://localhost/r"


def spy(mw):
    """Count what the hot path answers and the blobs opened, by the store or
    by the hot path itself (a large answer's blob): ``{"hot": n, "opened": n}``."""
    seen = {"hot": 0, "opened": 0}
    serve, open_blob, hot_open = mw.hot.serve, mw.store.open, mw.hot._open

    def counted_serve(environ, start_response, key):
        served = serve(environ, start_response, key)
        seen["hot"] += served is not None
        return served

    def counted(opener):
        def counted_open(*args, **kw):
            seen["opened"] += 1
            return opener(*args, **kw)
        return counted_open

    mw.hot.serve, mw.store.open, mw.hot._open = counted_serve, counted(open_blob), counted(hot_open)
    return seen


def warm(mw, c, path="/r", **kw):
    """Store the response at ``path``, then hit it once through the full path (which teaches the hot table)."""
    first = get(c, path, **kw)
    settled(mw)
    second = get(c, path, **kw)
    assert cache_status(second).startswith(HIT), cache_status(second)
    return first


def test_a_plain_get_hit_is_answered_from_memory_without_opening_the_store(make, now):
    app = App(headers=[("Cache-Control", "max-age=60")], size=4096)
    mw = make(app)
    c = client(mw)
    body = warm(mw, c).data
    seen = spy(mw)
    now[0] += 5
    for _ in range(3):
        r = get(c)
        assert r.status_code == 200 and r.data == body
        assert cache_status(r) == "cachefetch; hit; ttl=55" and r.headers["Age"] == "5"
    assert seen == {"hot": 3, "opened": 0}
    assert app.calls == 1 and len(mw.hot) == 1
    assert_clean(mw)


def _answer(r):
    return r.status_code, sorted(r.headers.items()), r.data


@pytest.mark.parametrize("status, headers, size", [
    ("200 OK", [("Cache-Control", "max-age=60")], 100),
    ("200 OK", [("Cache-Control", "public, max-age=60"), ("ETag", '"v1"'), ("X-Extra", "a b")], 4096),
    ("200 OK", [("Cache-Control", "max-age=60"), ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")], 0),
    ("200 OK", [("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")], 300),
    ("404 Not Found", [("Cache-Control", "max-age=60")], 10),
    ("200 OK", [("Cache-Control", "max-age=60")], 200_000),  # past memory_object_size: sent from its blob
])
def test_the_hot_answer_is_the_full_paths_answer(make, now, tmp_path, status, headers, size):
    app = App(status=status, headers=headers, size=size)
    hot = make(app)
    full = make(app, store=tmp_path / "store", memory_cache_bytes=0)  # the same store, the full path only
    c_hot, c_full = client(hot), client(full)
    request = {"headers": {"Accept-Language": "fr"}}
    warm(hot, c_hot, **request)
    seen = spy(hot)
    now[0] += 3
    assert _answer(get(c_hot, **request)) == _answer(get(c_full, **request))
    assert seen["hot"] == 1
    assert seen["opened"] == (1 if size > hot.hot.max_object_size else 0)
    assert app.calls == 1


def warm_large(make):
    """A CacheFetch with one large (200 kB, past ``memory_object_size``) hot
    answer at ``/r``, learnt: ``(app, mw, client, entry)``."""
    app = App(headers=[("Cache-Control", "max-age=60")], size=200_000)
    mw = make(app)
    c = client(mw)
    warm(mw, c)
    [entry] = mw.index.get(KEY)
    return app, mw, c, entry


def test_a_large_hit_reaches_the_server_as_a_file_wrapper_with_a_fileno(make):
    _, mw, c, _ = warm_large(make)
    wrapped = []

    def file_wrapper(filelike, block_size):
        wrapped.append(filelike.fileno())
        return iter(lambda: filelike.read(block_size), b"")

    seen = spy(mw)
    r = c.get("/r", environ_overrides={"wsgi.file_wrapper": file_wrapper}, buffered=True)
    assert r.status_code == 200 and len(r.data) == 200_000 and seen["hot"] == 1
    assert len(wrapped) == 1 and wrapped[0] > 2


@pytest.mark.parametrize("method, headers, expect_status, app_calls", [
    ("GET", {"If-None-Match": "*"}, 304, 1),
    ("GET", {"Range": "bytes=0-9"}, 206, 1),
    ("GET", {"If-Modified-Since": "Mon, 01 Jan 2124 00:00:00 GMT"}, 200, 1),  # no Last-Modified stored: ignored
    ("GET", {"Cache-Control": "max-age=0"}, 200, 1),  # age 0: still a hit, judged by the planner
    ("GET", {"Cache-Control": "min-fresh=3600"}, 200, 2),
    ("GET", {"Cache-Control": "no-cache"}, 200, 2),
    ("GET", {"Pragma": "no-cache"}, 200, 2),
    ("GET", {"Authorization": "Bearer x"}, 200, 2),
    ("GET", {"Cookie": "a=b"}, 200, 2),
    ("HEAD", {}, 200, 1),
])
def test_requests_needing_judgement_take_the_full_path(make, method, headers, expect_status, app_calls):
    app = App(headers=[("Cache-Control", "max-age=60")], size=100)
    mw = make(app)
    c = client(mw)
    warm(mw, c)
    seen = spy(mw)
    r = c.open("/r", method=method, headers=headers, buffered=True)
    assert r.status_code == expect_status
    assert seen["hot"] == 0
    assert app.calls == app_calls
    if method == "HEAD":
        assert r.data == b"" and cache_status(r).startswith(HIT)


def test_a_request_with_a_body_takes_the_full_path(make):
    app = App(headers=[("Cache-Control", "max-age=60")], size=100)
    mw = make(app)
    c = client(mw)
    warm(mw, c)
    seen = spy(mw)
    r = c.get("/r", data=b"x", buffered=True)
    assert seen["hot"] == 0 and app.calls == 2 and cache_status(r) == "cachefetch; fwd=bypass; detail=request-body"


def test_cookies_ignored_lets_a_request_with_a_cookie_take_the_hot_path(make):
    app = App(headers=[("Cache-Control", "max-age=60")], size=100)
    mw = make(app, cookies="ignore")
    c = client(mw)
    warm(mw, c)
    seen = spy(mw)
    assert cache_status(get(c, headers={"Cookie": "a=b"})).startswith(HIT)
    assert seen["hot"] == 1 and app.calls == 1


def test_a_stale_entry_is_never_answered_from_memory(make, now):
    app = App(headers=[("Cache-Control", "max-age=10")], size=100)
    mw = make(app)
    c = client(mw)
    warm(mw, c)
    seen = spy(mw)
    now[0] += 9.5
    assert cache_status(get(c)) == "cachefetch; hit; ttl=0"
    now[0] += 0.5  # exactly at expiry: stale (ttl is not > 0)
    r = get(c)
    assert cache_status(r) == "cachefetch; fwd=stale; stored" and r.data.startswith(b"call=2 ")
    assert seen["hot"] == 1 and app.calls == 2


def test_age_and_ttl_of_hot_answers_change_at_the_instants_they_should(make, now):
    """A hot answer's fields are built once per second, yet at every instant
    its ``Age`` and ``ttl`` are what the entry says then, up to its expiry.
    Heuristic freshness (a tenth of 37 s since Last-Modified) makes the two
    tick at different fractions of a second; the body came 0.3 s after its
    ``Date``, so its age started at 0.3."""
    from email.utils import formatdate

    app = App(headers=[("Date", formatdate(now[0], usegmt=True)),
                       ("Last-Modified", formatdate(now[0] - 37, usegmt=True))], size=100)
    mw = make(app)
    c = client(mw)
    now[0] += 0.3
    warm(mw, c)
    [entry] = mw.index.get(KEY)
    assert entry.expires_at - entry.stored_at + entry.initial_age == pytest.approx(3.7)
    seen = spy(mw)
    served = 0
    while now[0] + 0.05 < entry.expires_at:
        now[0] += 0.05
        r = get(c)
        served += 1
        ttl = int(entry.expires_at - now[0])
        assert (r.headers["Age"], cache_status(r)) == (str(entry.age(now[0])), f"cachefetch; hit; ttl={ttl}"), now[0]
    assert served >= 60 and seen["hot"] == served and app.calls == 1
    now[0] -= 2.5  # the clock steps back: the fields follow it
    r = get(c)
    assert (r.headers["Age"], cache_status(r)) == (str(entry.age(now[0])),
                                                   f"cachefetch; hit; ttl={int(entry.expires_at - now[0])}")


def test_a_no_cache_response_is_never_kept(make):
    app = App(headers=[("Cache-Control", "no-cache"), ("ETag", '"e"')], size=100)
    mw = make(app)
    c = client(mw)
    get(c)
    settled(mw)
    for _ in range(2):
        get(c)
        settled(mw)
    assert len(mw.hot) == 0 and app.calls == 3  # each use revalidated (this app answers 200, not 304)


def test_an_entry_replaced_through_another_instance_is_not_served_from_memory(make, tmp_path):
    """Two CacheFetch on one store, as two workers are: each has its own index
    memo and hot table; the generation file tells one what the other changed."""
    app = App(headers=[("Cache-Control", "max-age=60")], size=100)
    a = make(app)
    b = make(app, store=tmp_path / "store")
    ca, cb = client(a), client(b)
    warm(a, ca)
    seen = spy(a)
    assert get(ca).data.startswith(b"call=1 ") and seen["hot"] == 1
    assert get(cb, headers={"Cache-Control": "no-cache"}).data.startswith(b"call=2 ")  # b refetches
    settled(b)
    r = get(ca)
    assert r.data.startswith(b"call=2 ") and cache_status(r).startswith(HIT)
    assert seen["hot"] == 1  # the new entry came through the full path first
    assert get(ca).data.startswith(b"call=2 ") and seen["hot"] == 2


def test_an_entry_invalidated_through_another_instance_is_not_served_from_memory(make, tmp_path):
    app = App(headers=[("Cache-Control", "max-age=60")], size=100)
    a = make(app)
    b = make(app, store=tmp_path / "store")
    ca, cb = client(a), client(b)
    warm(a, ca)
    seen = spy(a)
    get(ca)
    assert cb.post("/r").status_code == 200  # an unsafe method invalidates /r
    r = get(ca)
    assert cache_status(r) == "cachefetch; fwd=miss; stored" and r.data.startswith(b"call=3 ")
    assert seen["hot"] == 1 and app.calls == 3
    assert len(a.hot) == 0  # the stale copy was dropped when the index no longer held it


def test_the_table_stays_within_its_byte_budget(make):
    app = App(headers=[("Cache-Control", "max-age=60")], size=10_000)
    mw = make(app, memory_cache_bytes=35_000, memory_object_size=16_384)
    c = client(mw)
    for i in range(6):
        warm(mw, c, f"/r{i}")
        assert mw.hot.size <= 35_000
    assert len(mw.hot) == 3  # the oldest learnt went first
    seen = spy(mw)
    assert get(c, "/r5").data.startswith(b"call=6 ") and get(c, "/r0").data.startswith(b"call=1 ")
    assert seen["hot"] == 1  # /r5 is kept, /r0 was dropped (served by the full path)


def test_disabled_table_keeps_nothing(make):
    app = App(headers=[("Cache-Control", "max-age=60")], size=100)
    mw = make(app, memory_cache_bytes=0)
    c = client(mw)
    warm(mw, c)
    seen = spy(mw)
    assert cache_status(get(c)).startswith(HIT)
    assert seen == {"hot": 0, "opened": 1} and len(mw.hot) == 0


@pytest.mark.parametrize("kw", [{"memory_cache_bytes": -1}, {"memory_object_size": 1.5},
                                {"memory_cache_bytes": True}])
def test_invalid_memory_options_raise_at_construction(tmp_path, kw):
    from cachefetch import CacheFetch

    with pytest.raises(ValueError):
        CacheFetch(lambda e, s: [], tmp_path, **kw)


def test_a_missing_blob_behind_a_large_hot_answer_goes_to_the_full_path(make):
    app, mw, c, entry = warm_large(make)
    mw.store.delete(entry.hash)
    r = get(c)
    assert r.status_code == 200 and r.data.startswith(b"call=2 ")  # dropped and fetched again
    assert app.calls == 2


def test_a_blob_of_another_size_behind_a_large_hot_answer_goes_to_the_full_path(make):
    _, mw, c, entry = warm_large(make)
    path = mw.store.path(entry.hash)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.truncate(150_000)
    seen = spy(mw)
    r = get(c)
    assert r.status_code == 200
    assert seen["hot"] == 0 and seen["opened"] == 2  # the hot path's look, then the full path's


def test_large_hot_answers_close_their_blob(make):
    _, mw, c, _ = warm_large(make)
    before = sorted(os.listdir("/proc/self/fd"))
    seen = spy(mw)
    for _ in range(20):
        assert len(get(c).data) == 200_000
    assert seen == {"hot": 20, "opened": 20}
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_hot_hits_are_recorded_as_uses_for_eviction(make, now):
    app = App(headers=[("Cache-Control", "max-age=600")], size=100)
    mw = make(app)
    c = client(mw)
    warm(mw, c)
    mw.uses.flush()
    seen = spy(mw)
    now[0] += 100
    get(c)
    mw.uses.flush()
    assert seen["hot"] == 1
    [(last_used, freq)] = mw.index._connect().execute("SELECT last_used, freq FROM entries").fetchall()
    assert last_used == now[0] and freq == 2  # the full path's hit, then this one


# -- Vary'd answers ------------------------------------------------------------

VARIED = [("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")]


def count_checks(mw):
    """Count the hot path's full checks of an answer against the index (``_check``)."""
    seen = {"checks": 0}
    check = mw.hot._check

    def counted(*args):
        seen["checks"] += 1
        return check(*args)

    mw.hot._check = counted
    return seen


def test_each_variant_is_answered_from_memory_by_its_request_values_without_a_full_check(make):
    app = App(headers=VARIED, size=300)
    mw = make(app)
    c = client(mw)
    for lang in ("en", "fr"):
        warm(mw, c, headers={"Accept-Language": lang})
    seen, checks = spy(mw), count_checks(mw)
    for _ in range(3):
        for lang in ("en", "fr", "en"):
            r = get(c, headers={"Accept-Language": lang})
            assert r.data.startswith(f"call={1 if lang == 'en' else 2} ".encode()) and f"lang={lang}".encode() in r.data
            assert cache_status(r).startswith(HIT)
    assert seen["hot"] == 9 and app.calls == 2
    assert checks["checks"] <= 2  # once per variant; then the request's values find the answer


def test_a_varied_answer_replaced_through_another_instance_is_not_served_from_memory(make, tmp_path):
    app = App(headers=VARIED, size=100)
    a = make(app)
    b = make(app, store=tmp_path / "store")
    ca, cb = client(a), client(b)
    en, fr = {"Accept-Language": "en"}, {"Accept-Language": "fr"}
    warm(a, ca, headers=en)
    warm(a, ca, headers=fr)
    assert get(ca, headers=en).data.startswith(b"call=1 ") and get(ca, headers=fr).data.startswith(b"call=2 ")
    assert get(cb, headers={**en, "Cache-Control": "no-cache"}).data.startswith(b"call=3 ")  # b refetches en
    settled(b)
    assert get(ca, headers=en).data.startswith(b"call=3 ")
    assert get(ca, headers=fr).data.startswith(b"call=2 ")
    assert get(ca, headers=en).data.startswith(b"call=3 ")


def test_the_varied_shortcut_keeps_few_request_values_and_only_short_ones(make):
    from cachefetch.middleware import hot

    app = App(headers=VARIED, size=100)
    mw = make(app)
    c = client(mw)
    long = "en-GB;q=0.9, " * 40  # past the shortcut's length limit: always the full check
    warm(mw, c, headers={"Accept-Language": "en"})
    warm(mw, c, headers={"Accept-Language": long})
    checks = count_checks(mw)
    spellings = ["en", " en", "en ", "  en", "en  "]  # one variant (whitespace is folded)
    for value in (spellings + [long]) * 2:
        r = get(c, headers={"Accept-Language": value})
        assert r.data.startswith(b"call=1 " if value in spellings else b"call=2 ")
        assert cache_status(r).startswith(HIT)
    assert checks["checks"] >= 2 + 3  # each long one, and the spellings past the first two
    known = mw.hot._table["http://localhost/r"]
    remembered = known.varied[2] if known.varied else {}
    assert 0 < len(remembered) <= hot._VARIED_SLOTS * len(known.answers)
    assert all(len("".join(values)) <= hot.SHORT_VALUES_CHARS for values in remembered)
    assert app.calls == 2
