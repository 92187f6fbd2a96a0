"""cachefetch.policy: the RFC 9111 shared-cache rules, as pure functions."""
from __future__ import annotations

import pytest

from cachefetch import policy
from cachefetch.policy import (allows_stale, freshness_lifetime, request_directives, response_is_storable,
                               stored_headers, variant_of, vary_names)

OK = (200,)


def storable(headers, status=200, statuses=OK, authorized=False):
    return response_is_storable(status, list(headers), statuses, authorized)


# -- request_directives ------------------------------------------------------

def test_request_without_directives():
    d = request_directives({})
    assert not d.no_cache
    assert not d.no_store


def test_request_cache_control_no_cache():
    d = request_directives({"HTTP_CACHE_CONTROL": "no-cache"})
    assert d.no_cache
    assert not d.no_store


def test_request_cache_control_no_store():
    d = request_directives({"HTTP_CACHE_CONTROL": "no-store"})
    assert d.no_store
    assert not d.no_cache


def test_request_other_cache_control_is_neither():
    d = request_directives({"HTTP_CACHE_CONTROL": "max-age=0"})
    assert not d.no_cache and not d.no_store
    assert d.max_age == 0


@pytest.mark.parametrize("pragma", ["no-cache", "No-Cache"])
def test_pragma_no_cache_without_cache_control(pragma):
    assert request_directives({"HTTP_PRAGMA": pragma}).no_cache


def test_pragma_ignored_when_cache_control_present():
    d = request_directives({"HTTP_PRAGMA": "no-cache", "HTTP_CACHE_CONTROL": "max-age=10"})
    assert not d.no_cache
    assert d.max_age == 10


def test_other_pragma_is_not_no_cache():
    assert not request_directives({"HTTP_PRAGMA": "x-foo"}).no_cache


# -- response_is_storable ----------------------------------------------------

def test_plain_response_is_storable():
    assert storable([("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")]) is None
    assert storable([]) is None


@pytest.mark.parametrize("status", [201, 204, 206, 301, 404, 500, 503])
def test_status_outside_cache_statuses(status):
    assert storable([], status=status) == f"status {status}"


def test_status_inside_custom_cache_statuses():
    assert storable([], status=404, statuses=(200, 404)) is None
    assert storable([], status=200, statuses=(404,)) == "status 200"


@pytest.mark.parametrize("name", ["Set-Cookie", "set-cookie", "Set-Cookie2"])
def test_set_cookie_is_not_storable(name):
    assert storable([(name, "a=b"), ("Cache-Control", "public, max-age=60")]) == "set-cookie"


@pytest.mark.parametrize("cc, reason", [
    ("private", "private"),
    ('private="x"', "private"),
    ("max-age=60, private", "private"),
    ("no-store", "no-store"),
    ("public, no-store", "no-store"),
    ("no-cache", "no-cache"),
    ('no-cache="Set-Cookie"', "no-cache"),
])
def test_cache_control_that_forbids_storing(cc, reason):
    assert storable([("Cache-Control", cc)]) == reason


def test_cache_control_split_over_two_headers():
    assert storable([("Cache-Control", "max-age=60"), ("Cache-Control", "private")]) == "private"


@pytest.mark.parametrize("vary", ["*", "Accept, *", " * "])
def test_vary_star_is_not_storable(vary):
    assert storable([("Vary", vary)]) == "vary-star"


def test_vary_names_are_storable():
    assert storable([("Vary", "Accept-Language")]) is None


def test_authorization_without_permission_is_not_storable():
    assert storable([], authorized=True) == "authorization"
    assert storable([("Cache-Control", "max-age=60")], authorized=True) == "authorization"


@pytest.mark.parametrize("cc", ["public", "s-maxage=30", "must-revalidate", "max-age=60, public"])
def test_authorization_with_permission_is_storable(cc):
    assert storable([("Cache-Control", cc)], authorized=True) is None
    assert storable([("Cache-Control", cc)], authorized=False) is None


def test_public_does_not_override_other_prohibitions():
    assert storable([("Cache-Control", "public"), ("Set-Cookie", "s=1")], authorized=True) == "set-cookie"
    assert storable([("Cache-Control", "public, private")], authorized=True) == "private"
    assert storable([("Cache-Control", "public")], status=500, authorized=True) == "status 500"


# -- freshness_lifetime ------------------------------------------------------

DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
DATE_PLUS_100 = "Sun, 06 Nov 1994 08:51:17 GMT"
DATE_EPOCH = 784111777.0


def test_s_maxage_beats_max_age_and_expires():
    headers = [("Cache-Control", "max-age=60, s-maxage=30"), ("Date", DATE), ("Expires", DATE_PLUS_100)]
    assert freshness_lifetime(headers, 5) == 30.0


def test_max_age_beats_expires():
    headers = [("Cache-Control", "max-age=60"), ("Date", DATE), ("Expires", DATE_PLUS_100)]
    assert freshness_lifetime(headers, 5) == 60.0


def test_max_age_zero():
    assert freshness_lifetime([("Cache-Control", "max-age=0")], 5) == 0.0


def test_expires_minus_date_beats_default():
    headers = [("Date", DATE), ("Expires", DATE_PLUS_100)]
    assert freshness_lifetime(headers, 5) == pytest.approx(100.0)


def test_expires_without_date_is_measured_from_now():
    assert freshness_lifetime([("Expires", DATE_PLUS_100)], 5, now=DATE_EPOCH + 40) == pytest.approx(60.0)


def test_expires_in_the_past_is_negative():
    assert freshness_lifetime([("Date", DATE_PLUS_100), ("Expires", DATE)], None) == pytest.approx(-100.0)


@pytest.mark.parametrize("expires", ["0", "-1", "not a date", ""])
def test_invalid_expires_means_already_stale(expires):
    assert freshness_lifetime([("Date", DATE), ("Expires", expires)], 5) == 0.0


def test_default_ttl_when_nothing_is_stated():
    assert freshness_lifetime([("Content-Type", "text/plain")], 42) == 42
    assert freshness_lifetime([("Cache-Control", "public")], 42) == 42
    assert freshness_lifetime([], None) is None


# -- allows_stale ------------------------------------------------------------

@pytest.mark.parametrize("cc, allowed", [
    (None, True),
    ("max-age=60", True),
    ("public, max-age=60", True),
    ("must-revalidate", False),
    ("max-age=60, must-revalidate", False),
    ("proxy-revalidate", False),
    ("s-maxage=60", False),
])
def test_allows_stale(cc, allowed):
    headers = [] if cc is None else [("Cache-Control", cc)]
    assert allows_stale(headers) is allowed


# -- stored_headers ----------------------------------------------------------

def test_stored_headers_drops_hop_by_hop_and_cache_set_headers_keeping_order():
    headers = [
        ("Content-Type", "text/html"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "dropped because Connection names it"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Trailer", "X-Sum"),
        ("Upgrade", "h2c"),
        ("Proxy-Authenticate", "Basic"),
        ("Proxy-Connection", "keep-alive"),
        ("Set-Cookie", "a=b"),
        ("Set-Cookie", "c=d"),
        ("Content-Length", "10"),
        ("Age", "3"),
        ("Date", DATE),
        ("Server", "gunicorn"),
        ("Cache-Status", "other; hit"),
        ("Cache-Control", "max-age=60"),
        ("ETag", '"v1"'),
        ("content-encoding", "gzip"),
        ("Vary", "Accept-Encoding"),
        ("Last-Modified", DATE),
        ("Content-Disposition", "attachment"),
        ("X-Custom", "1"),
        ("X-Custom", "2"),
    ]
    assert stored_headers(headers) == [
        ("Content-Type", "text/html"),
        ("Cache-Control", "max-age=60"),
        ("ETag", '"v1"'),
        ("content-encoding", "gzip"),
        ("Vary", "Accept-Encoding"),
        ("Last-Modified", DATE),
        ("Content-Disposition", "attachment"),
        ("X-Custom", "1"),
        ("X-Custom", "2"),
    ]


def test_connection_named_headers_are_case_insensitive():
    headers = [("connection", " X-A ,x-b"), ("x-a", "1"), ("X-B", "2"), ("X-C", "3")]
    assert stored_headers(headers) == [("X-C", "3")]


def test_stored_headers_does_not_modify_its_input():
    headers = [("Set-Cookie", "a=b"), ("X", "1")]
    stored_headers(headers)
    assert headers == [("Set-Cookie", "a=b"), ("X", "1")]


# -- vary_names / variant_of -------------------------------------------------

def test_vary_names():
    assert vary_names([]) == ()
    assert vary_names([("Vary", "")]) == ()
    assert vary_names([("Vary", "Accept-Language")]) == ("accept-language",)
    assert vary_names([("Vary", "User-Agent, accept-language"), ("vary", "Accept-Language, ,Accept")]) == (
        "accept", "accept-language", "user-agent")


def test_variant_of_nothing_is_empty():
    assert variant_of({"HTTP_ACCEPT_LANGUAGE": "en"}, ()) == ""


def test_variant_same_values_same_variant():
    names = ("accept-language", "accept-encoding")
    a = {"HTTP_ACCEPT_LANGUAGE": "en", "HTTP_ACCEPT_ENCODING": "gzip", "HTTP_USER_AGENT": "x"}
    b = {"HTTP_ACCEPT_LANGUAGE": "en", "HTTP_ACCEPT_ENCODING": "gzip", "HTTP_USER_AGENT": "y"}
    assert variant_of(a, names) == variant_of(b, names)
    assert variant_of(a, names) != ""


def test_variant_different_values_different_variant():
    names = ("accept-language",)
    en = variant_of({"HTTP_ACCEPT_LANGUAGE": "en"}, names)
    de = variant_of({"HTTP_ACCEPT_LANGUAGE": "de"}, names)
    missing = variant_of({}, names)
    assert len({en, de, missing}) == 3


def test_variant_depends_on_the_header_names_too():
    env = {"HTTP_ACCEPT_LANGUAGE": "en", "HTTP_ACCEPT": "en"}
    assert variant_of(env, ("accept-language",)) != variant_of(env, ("accept",))


def test_variant_folds_whitespace():
    names = ("accept-language",)
    assert (variant_of({"HTTP_ACCEPT_LANGUAGE": "en,  de"}, names)
            == variant_of({"HTTP_ACCEPT_LANGUAGE": "  en,\tde "}, names))
    assert (variant_of({"HTTP_ACCEPT_LANGUAGE": "en, de"}, names)
            != variant_of({"HTTP_ACCEPT_LANGUAGE": "en,de"}, names))


def test_variant_reads_content_type_and_length_without_http_prefix():
    names = ("content-type",)
    json_ = variant_of({"CONTENT_TYPE": "application/json"}, names)
    form = variant_of({"CONTENT_TYPE": "application/x-www-form-urlencoded"}, names)
    assert json_ != form
    # HTTP_CONTENT_TYPE is not where a WSGI server puts it: it is ignored.
    assert variant_of({"HTTP_CONTENT_TYPE": "application/json"}, names) == variant_of({}, names)
    assert variant_of({"CONTENT_LENGTH": "1"}, ("content-length",)) != variant_of(
        {"CONTENT_LENGTH": "2"}, ("content-length",))


def test_header_helper_joins_values():
    assert policy.header([("A", "1"), ("a", "2"), ("B", "3")], "A") == "1, 2"
    assert policy.header([], "A") is None
