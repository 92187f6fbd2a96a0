"""cachefetch.policy: the shared-cache rules of RFC 9111, 9110, 5861, 9213 and 9211.

Pure tests: no files, no sockets, no clock. Every time is an explicit number
around :data:`NOW`, and a stored response is a tiny frozen :class:`Stored`
(the :class:`~cachefetch.policy.StoredResponse` protocol). One test, or one
parametrized case, per rule; the RFC section it checks is named in its
docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from cachefetch.hashing import hash_bytes
from cachefetch.index import Entry
from cachefetch.policy import (ANY_STALENESS, DELTA_MAX, FOREVER, HEURISTIC_STATUSES, Action, Answer, CacheRules,
                               CacheStatus, Outcome, RequestFacts, allows_stale, conditional_fields,
                               corrected_initial_age, evaluate, format_http_date, freshness_lifetime,
                               invalidates, invalidation_targets, parse_age, parse_cache_control,
                               parse_http_date, parse_targeted, plan_request, plan_store, read_request,
                               select_for_update, shareable, stale_if_error_allows, updated_headers)

#: A fixed clock reading (2025-06-15): tests pass every time explicitly.
NOW = 1_750_000_000.0
RULES = CacheRules()
GET = RequestFacts()
ETAG = ("ETag", '"v1"')


def date(offset: float) -> str:
    """The HTTP-date ``offset`` seconds from :data:`NOW`."""
    return format_http_date(NOW + offset)


def lifetime(headers, status=200, rules=RULES):
    return freshness_lifetime(status, list(headers), rules, NOW)


def store(headers, status=200, request=GET, rules=RULES, *, request_time=NOW, response_time=NOW, **kw):
    return plan_store(status, list(headers), request, rules, request_time=request_time,
                      response_time=response_time, **kw)


def req(cache_control: str | None = None, **kw) -> RequestFacts:
    return RequestFacts(directives=parse_cache_control(cache_control), **kw)


@dataclass(frozen=True)
class Stored:
    """A stored response, as :class:`cachefetch.index.Entry` computes age and ttl."""

    headers: tuple[tuple[str, str], ...] = ()
    status: int = 200
    stored_at: float = NOW
    expires_at: float | None = None
    initial_age: float = 0.0

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.stored_at)

    def ttl(self, now: float) -> float | None:
        return None if self.expires_at is None else self.expires_at - now


def stored(*headers: tuple[str, str], ttl: float | None = 60.0, age: float = 0.0, status: int = 200,
           stored_at: float = NOW) -> Stored:
    """A response with ``ttl`` seconds of freshness left at :data:`NOW`
    (negative: stale for that long; ``None``: fresh until evicted) and
    ``age`` seconds old at :data:`NOW`."""
    expires_at = None if ttl is None else NOW + ttl
    return Stored(tuple(headers), status, stored_at, expires_at, age - max(0.0, NOW - stored_at))


# == directives (RFC 9111 §5.2) ==============================================

@pytest.mark.parametrize("value", ["No-Cache", "NO-CACHE", "no-cache", "nO-cAcHe"])
def test_directive_names_are_case_insensitive(value):
    """§5.2: cache directive names are case-insensitive (werkzeug's parser is not)."""
    d = parse_cache_control(value)
    assert d.no_cache and "no-cache" in d


def test_upper_case_max_age_is_read():
    assert parse_cache_control("MAX-AGE=30, S-MaxAge=10").max_age == 30
    assert parse_cache_control("MAX-AGE=30, S-MaxAge=10").s_maxage == 10


@pytest.mark.parametrize("value", ['max-age=60', 'max-age="60"', 'max-age = 60', ' max-age=60 ,'])
def test_delta_seconds_token_or_quoted(value):
    """§5.2: recipients accept both the token and the quoted-string form of an argument."""
    assert parse_cache_control(value).max_age == 60


def test_quoted_argument_may_hold_commas_and_escapes():
    d = parse_cache_control(r'x-ext="a, b\"c", max-age=3')
    assert d.argument("x-ext") == 'a, b"c'
    assert d.max_age == 3


def test_several_field_lines_are_one_list():
    """RFC 9110 §5.3: several Cache-Control field lines combine into one list."""
    d = parse_cache_control(["no-cache", "max-age=60"])
    assert d.no_cache and d.max_age == 60


def test_identical_duplicate_is_not_a_conflict():
    """§4.2.1: with several values, the first may be used; equal ones do not conflict."""
    assert parse_cache_control("max-age=60, max-age=60").max_age == 60


@pytest.mark.parametrize("value", ["max-age=60, max-age=70", ["max-age=60", "max-age=3600"]])
def test_conflicting_duplicate_max_age_is_stale(value):
    """§4.2.1: several different max-age values: the response is considered stale."""
    d = parse_cache_control(value)
    assert "max-age" in d.conflicts
    assert d.max_age == 0
    assert lifetime([("Cache-Control", v) for v in ([value] if isinstance(value, str) else value)]).seconds == 0


@pytest.mark.parametrize("value", ["max-age=abc", "max-age=1.5", "max-age=-1", "max-age=+5", "max-age=0x10",
                                   "max-age", "max-age=", "max-age=5 junk", 'max-age="5'])
def test_invalid_delta_seconds_is_stale(value):
    """§1.2.2 (delta-seconds is 1*DIGIT) and §4.2.1: invalid freshness
    information is treated as stale — not as absent, which would let an
    Expires or a heuristic lifetime apply instead."""
    headers = [("Cache-Control", value), ("Last-Modified", date(-100 * 86400)), ("Date", date(0))]
    assert parse_cache_control(value).max_age == 0
    assert lifetime(headers).seconds == 0


@pytest.mark.parametrize("value", ["max-age=2147483648", "max-age=99999999999999999999"])
def test_overflowing_delta_seconds_saturates(value):
    """§1.2.2: a delta-seconds too large to represent is read as 2147483648."""
    assert parse_cache_control(value).max_age == DELTA_MAX == 2**31


def test_malformed_part_keeps_the_parsable_directives():
    d = parse_cache_control("no-store, =junk, public")
    assert d.no_store and d.public and d.malformed


@pytest.mark.parametrize("value,fields", [('private="X-Secret"', ("x-secret",)),
                                          ('private="a, B ,c"', ("a", "b", "c")),
                                          ("no-cache=x-token", ("x-token",))])
def test_qualified_field_lists(value, fields):
    """§5.2.2.4, §5.2.2.7: the qualified forms list field names (case-insensitive)."""
    name = value.split("=")[0]
    assert parse_cache_control(value).fields(name) == fields


def test_qualified_no_cache_and_private_are_not_unqualified():
    d = parse_cache_control('no-cache="x-a", private="x-b"')
    assert not d.no_cache and not d.private


def test_max_stale_with_and_without_value():
    """§5.2.1.2: max-stale without a value accepts any staleness."""
    assert parse_cache_control("max-stale").max_stale == ANY_STALENESS
    assert parse_cache_control("max-stale=30").max_stale == 30
    assert parse_cache_control("max-age=3").max_stale is None


# == targeted fields (RFC 9213) ==============================================

def test_targeted_field_parses_an_sf_dictionary():
    d = parse_targeted('max-age=600, private, x-ext="a,b";p=1')
    assert d is not None and d.max_age == 600 and d.private and d.argument("x-ext") == "a,b"


@pytest.mark.parametrize("value", [None, "", "   ", "Max-Age=600", "max-age=60,,", 'max-age="60', "max-age=60 junk"])
def test_invalid_or_empty_targeted_field_is_none(value):
    """RFC 9213 §2.1: an invalid (or empty) targeted field is ignored."""
    assert parse_targeted(value) is None


def test_targeted_false_boolean_is_not_set():
    d = parse_targeted("no-store=?0, max-age=5")
    assert d is not None and not d.no_store and d.max_age == 5


def test_cdn_cache_control_takes_precedence_over_cache_control():
    """RFC 9213 §2.2: the first valid targeted field governs; Cache-Control is ignored."""
    headers = [("Cache-Control", "max-age=60"), ("CDN-Cache-Control", "max-age=600")]
    assert lifetime(headers).seconds == 600
    assert not store([("Cache-Control", "max-age=60"), ("CDN-Cache-Control", "no-store")]).store


def test_targeted_field_makes_expires_ignored():
    """RFC 9213 §2.2: a cache using a targeted field ignores Expires too."""
    headers = [("CDN-Cache-Control", "public"), ("Expires", date(3600)), ("Date", date(0))]
    assert lifetime(headers).source == "none"
    plan = store(headers)
    assert not plan.store and plan.why == "no-freshness"


def test_invalid_targeted_field_falls_back_to_cache_control():
    """RFC 9213 §2.2: with no valid targeted field, Cache-Control and Expires apply."""
    assert lifetime([("CDN-Cache-Control", "Max-Age=600"), ("Cache-Control", "max-age=60")]).seconds == 60
    assert lifetime([("CDN-Cache-Control", ""), ("Expires", date(300)), ("Date", date(0))]).seconds == 300


def test_targeted_fields_empty_disables_them():
    rules = CacheRules(targeted_fields=())
    assert lifetime([("Cache-Control", "max-age=60"), ("CDN-Cache-Control", "max-age=600")], rules=rules).seconds == 60


def test_own_targeted_field_first_in_order():
    """RFC 9213 §2.2: fields are tried in the cache's target-list order."""
    rules = CacheRules(targeted_fields=("x-edge-cache-control", "cdn-cache-control"))
    both = [("CDN-Cache-Control", "max-age=600"), ("X-Edge-Cache-Control", "max-age=6")]
    assert lifetime(both, rules=rules).seconds == 6
    assert lifetime([("CDN-Cache-Control", "max-age=600")], rules=rules).seconds == 600


# == HTTP-date (RFC 9110 §5.6.7) =============================================

IMF = "Sun, 06 Nov 1994 08:49:37 GMT"
IMF_EPOCH = 784111777.0


@pytest.mark.parametrize("value", [IMF, "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994",
                                   "Sun Nov 06 08:49:37 1994", "  " + IMF + " "])
def test_three_http_date_forms_are_accepted(value):
    """RFC 9110 §5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms."""
    assert parse_http_date(value, now=NOW) == IMF_EPOCH


@pytest.mark.parametrize("value", [
    "Sun, 06 Nov 94 08:49:37 GMT",       # two-digit year in the IMF form
    "Sun, 06 Nov 1994 08:49:37 +0000",   # numeric zone
    "Sun, 06 Nov 1994 08:49:37 UTC",     # not GMT
    "Sun, 06 Nov 1994 08:49:37",         # no zone
    "Sun, 6 Nov 1994 08:49:37 GMT",      # one-digit day
    "sun, 06 nov 1994 08:49:37 gmt",     # names are case-sensitive
    "Tue, 31 Feb 2026 00:00:00 GMT",     # no such day
    "Thu, 29 Feb 2027 00:00:00 GMT",     # not a leap year
    "Sun, 06 Nov 1994 24:00:00 GMT",
    "0", "-1", "", "garbage", "1750000000",
])
def test_invalid_http_dates(value):
    """RFC 9110 §5.6.7: anything else is not an HTTP-date."""
    assert parse_http_date(value, now=NOW) is None


def test_rfc850_two_digit_year_is_not_more_than_50_years_ahead():
    """RFC 9110 §5.6.7: a two-digit year that looks more than 50 years in the future is in the past century."""
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", now=NOW) == IMF_EPOCH  # 1994, not 2094
    assert format_http_date(parse_http_date("Monday, 01-Jan-40 00:00:00 GMT", now=NOW)).endswith("2040 00:00:00 GMT")


def test_format_http_date_round_trips():
    assert format_http_date(IMF_EPOCH) == IMF
    assert parse_http_date(date(0)) == NOW


# == Age (RFC 9111 §5.1, §4.2.3) =============================================

@pytest.mark.parametrize("value,age", [("30", 30), ("30, 60", 30), (" 7 ", 7), (None, 0), ("abc", 0),
                                       ("-5", 0), ("1.5", 0), ("", 0), ("99999999999999", DELTA_MAX)])
def test_parse_age(value, age):
    """§5.1: the first member of a list; an invalid value is ignored; overflow saturates."""
    assert parse_age(value) == age


def test_overflowing_age_is_stale():
    """§5.1: an Age too large to represent means the response is (very) stale."""
    plan = store([("Cache-Control", "max-age=3600"), ("Age", "99999999999999"), ETAG])
    assert plan.store and plan.expires_at < NOW


@pytest.mark.parametrize("headers,request_time,age", [
    ([("Date", date(-100)), ("Age", "30")], NOW - 2, 100),   # apparent_age wins
    ([("Date", date(-10)), ("Age", "50")], NOW - 2, 52),     # Age + response_delay wins
    ([], NOW - 3, 3),                                         # only the response delay
    ([("Date", date(+500))], NOW, 0),                        # a Date ahead of us: apparent_age is 0
    ([("Date", "garbage"), ("Age", "5")], NOW, 5),
])
def test_corrected_initial_age(headers, request_time, age):
    """§4.2.3: max(apparent_age, Age + response_delay)."""
    assert corrected_initial_age(headers, request_time, NOW) == age


def test_initial_age_shortens_remaining_freshness():
    """§4.2: fresh while freshness_lifetime > current_age; the origin's Age counts."""
    plan = store([("Cache-Control", "max-age=60"), ("Age", "50")], request_time=NOW - 1)
    assert plan.initial_age == 51
    assert plan.expires_at == NOW + 60 - 51


# == freshness lifetime (RFC 9111 §4.2.1, §5.3) ==============================

def test_s_maxage_over_max_age_over_expires():
    """§4.2.1: s-maxage (shared caches), then max-age, then Expires − Date."""
    expires = [("Expires", date(1000)), ("Date", date(0))]
    assert lifetime([("Cache-Control", "max-age=100, s-maxage=10")] + expires).seconds == 10
    assert lifetime([("Cache-Control", "max-age=100")] + expires).seconds == 100
    assert lifetime(expires).seconds == 1000
    assert lifetime(expires).source == "expires"


def test_expires_without_date_counts_from_response_time():
    assert lifetime([("Expires", date(90))]).seconds == 90


@pytest.mark.parametrize("value", ["Sun, 06 Nov 94 08:49:37 GMT", date(3600).replace("GMT", "+0000"), "0",
                                   "-1", "garbage", "Tue, 31 Feb 2099 00:00:00 GMT", ""])
def test_invalid_expires_means_already_expired(value):
    """§5.3: an invalid date, especially "0", is a time in the past."""
    lt = lifetime([("Expires", value), ("Date", date(0)), ("Last-Modified", date(-86400 * 30))])
    assert lt.seconds == 0 and lt.source == "expires"


@pytest.mark.parametrize("value", ["Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"])
def test_obsolete_expires_forms_are_valid(value):
    """§5.3 via RFC 9110 §5.6.7: RFC 850 and asctime dates are HTTP-dates."""
    headers = [("Expires", value), ("Date", "Sun, 06 Nov 1994 08:48:37 GMT")]
    assert lifetime(headers).seconds == 60


def test_several_differing_expires_are_stale():
    """§4.2.1: several Expires values: the response is considered stale."""
    assert lifetime([("Expires", date(100)), ("Expires", date(200)), ("Date", date(0))]).seconds == 0
    assert lifetime([("Expires", date(100)), ("Expires", date(100)), ("Date", date(0))]).seconds == 100


def test_expires_in_the_past_is_zero_not_negative():
    assert lifetime([("Expires", date(-100)), ("Date", date(0))]).seconds == 0


def test_conflicting_max_age_is_stale_even_with_expires():
    """§4.2.1: max-age, even a conflicting one, takes precedence over Expires."""
    assert lifetime([("Cache-Control", "max-age=5, max-age=50"), ("Expires", date(1000))]).seconds == 0


def test_explicit_flag():
    assert lifetime([("Cache-Control", "max-age=1")]).explicit
    assert lifetime([("Expires", "0")]).explicit
    assert not lifetime([("Last-Modified", date(-1000))]).explicit
    assert not lifetime([]).explicit


# == heuristic freshness (RFC 9111 §4.2.2, RFC 9110 §15.1) ===================

def test_heuristic_is_a_tenth_of_time_since_last_modified():
    """§4.2.2: a typical heuristic is 10% of the time since Last-Modified."""
    lt = lifetime([("Last-Modified", date(-1000)), ("Date", date(0))])
    assert lt.seconds == 100 and lt.source == "heuristic"


def test_heuristic_counts_from_response_time_without_date():
    assert lifetime([("Last-Modified", date(-2000))]).seconds == 200


def test_heuristic_is_capped():
    """§4.2.2: the cap is the cache's choice (default one day)."""
    headers = [("Last-Modified", date(-365 * 86400)), ("Date", date(0))]
    assert lifetime(headers).seconds == 86400
    assert lifetime(headers, rules=CacheRules(heuristic_max=600)).seconds == 600
    assert lifetime(headers, rules=CacheRules(heuristic_fraction=0.0)).seconds == 0


def test_heuristic_with_future_last_modified_is_zero():
    assert lifetime([("Last-Modified", date(500)), ("Date", date(0))]).seconds == 0


@pytest.mark.parametrize("status", sorted(HEURISTIC_STATUSES))
def test_heuristic_statuses(status):
    """RFC 9110 §15.1: the heuristically cacheable statuses."""
    assert lifetime([("Last-Modified", date(-1000))], status=status).seconds == 100


@pytest.mark.parametrize("status", [201, 202, 302, 303, 307, 400, 403, 500, 502, 503])
def test_no_heuristic_for_other_statuses(status):
    lt = lifetime([("Last-Modified", date(-1000))], status=status)
    assert lt.seconds == 0 and lt.source == "none"


def test_heuristic_statuses_are_exactly_rfc9110s():
    assert HEURISTIC_STATUSES == {200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501}


def test_heuristic_not_used_with_explicit_freshness():
    """§4.2.2: no heuristic when an explicit expiration time is present."""
    assert lifetime([("Last-Modified", date(-100000)), ("Cache-Control", "max-age=0")]).seconds == 0


def test_invalid_last_modified_gives_no_heuristic():
    assert lifetime([("Last-Modified", "yesterday")]).source == "none"


# == default_ttl ============================================================

def test_default_ttl_seconds():
    rules = CacheRules(default_ttl=300)
    lt = lifetime([], rules=rules)
    assert lt.seconds == 300 and lt.source == "default"
    plan = store([], rules=rules)
    assert plan.store and plan.expires_at == NOW + 300


def test_default_ttl_does_not_override_explicit_freshness():
    assert lifetime([("Cache-Control", "max-age=5")], rules=CacheRules(default_ttl=300)).seconds == 5


def test_default_ttl_replaces_the_heuristic():
    """CacheRules: default_ttl is the freshness of any response that states none."""
    assert lifetime([("Last-Modified", date(-1000))], rules=CacheRules(default_ttl=300)).seconds == 300


def test_default_ttl_forever_stays_fresh_until_evicted():
    plan = store([], rules=CacheRules(default_ttl=FOREVER))
    assert plan.store and plan.lifetime.seconds == FOREVER and plan.expires_at is None


# == what is stored (RFC 9111 §3, §3.5, §5.2.2) ===============================

def test_plain_fresh_response_is_stored():
    plan = store([("Cache-Control", "max-age=60"), ("Content-Type", "text/plain"), ("Content-Length", "5")])
    assert plan.store and plan.why is None
    assert plan.lifetime.seconds == 60 and plan.expires_at == NOW + 60 and plan.content_length == 5


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501])
def test_default_statuses_heuristically_cacheable_are_stored(status):
    """§3, RFC 9110 §15.1: heuristically cacheable statuses are stored without explicit freshness."""
    assert store([("Last-Modified", date(-1000))], status=status).store


@pytest.mark.parametrize("status", [201, 302, 307, 403, 500, 503, 599])
def test_default_statuses_other_final_status_with_explicit_freshness(status):
    """§3: any final status may be stored by a shared cache with explicit freshness (max-age, s-maxage, Expires)."""
    assert store([("Cache-Control", "max-age=60")], status=status).store
    assert store([("Cache-Control", "s-maxage=60")], status=status).store
    assert store([("Expires", date(60)), ("Date", date(0))], status=status).store


@pytest.mark.parametrize("status", [302, 500])
def test_default_statuses_other_status_without_explicit_freshness(status):
    plan = store([("Last-Modified", date(-1000)), ETAG], status=status)
    assert not plan.store and plan.why == f"status-{status}"


@pytest.mark.parametrize("statuses", [None, frozenset({200, 206})])
def test_206_is_never_stored(statuses):
    """A partial response is not a complete one; this cache stores only complete responses (§3.3 not implemented)."""
    plan = store([("Cache-Control", "max-age=60"), ("Content-Range", "bytes 0-1/10")], status=206,
                 rules=CacheRules(cache_statuses=statuses))
    assert not plan.store and plan.why == "status-206"


@pytest.mark.parametrize("statuses", [None, frozenset({200, 304})])
def test_304_is_never_stored_as_a_response(statuses):
    """RFC 9110 §15.4.5: a 304 has no content; it only updates stored
    responses (RFC 9111 §4.3.4). Stored as an entry, it would be replayed to
    clients that never asked conditionally."""
    plan = store([("Cache-Control", "max-age=60"), ETAG], status=304, rules=CacheRules(cache_statuses=statuses))
    assert not plan.store


@pytest.mark.parametrize("status", [100, 101, 199, 600])
def test_non_final_or_bogus_status_is_not_stored(status):
    """§3: only a final status code may be stored."""
    assert not store([("Cache-Control", "max-age=60")], status=status, rules=CacheRules(cache_statuses=None)).store


def test_explicit_cache_statuses_restrict():
    rules = CacheRules(cache_statuses=frozenset({200}))
    assert store([("Cache-Control", "max-age=60")], rules=rules).store
    plan = store([("Cache-Control", "max-age=60")], status=404, rules=rules)
    assert not plan.store and plan.why == "status-404"


@pytest.mark.parametrize("name", ["Set-Cookie", "set-cookie", "Set-Cookie2"])
def test_set_cookie_is_never_stored(name):
    plan = store([("Cache-Control", "max-age=60, public"), (name, "id=1")])
    assert not plan.store and plan.why == "set-cookie"


@pytest.mark.parametrize("cc,why", [("private", "private"), ("Private, max-age=60", "private"),
                                    ("no-store", "no-store"), ("max-age=60, NO-STORE", "no-store")])
def test_private_and_no_store_are_not_stored(cc, why):
    """§5.2.2.5 no-store; §5.2.2.7 a shared cache must not store a private response."""
    plan = store([("Cache-Control", cc)])
    assert not plan.store and plan.why == why


@pytest.mark.parametrize("directive", ['private="X-Secret"', 'no-cache="x-secret"', "no-cache=X-Secret"])
def test_qualified_private_or_no_cache_stores_without_those_fields(directive):
    """§5.2.2.4, §5.2.2.7: the named fields are not stored; the rest may be."""
    plan = store([("Cache-Control", f"max-age=60, {directive}"), ("X-Secret", "s"), ("X-Public", "p")])
    assert plan.store
    names = [k.lower() for k, _ in plan.headers]
    assert "x-secret" not in names and "x-public" in names


def test_qualified_private_with_several_fields():
    plan = store([("Cache-Control", 'max-age=60, private="x-a, x-b"'), ("X-A", "1"), ("X-B", "2"), ("X-C", "3")])
    assert [k for k, _ in plan.headers if k.startswith("X-")] == ["X-C"]


def test_must_understand_overrides_no_store_for_understood_status():
    """§5.2.2.3: a cache that understands the status ignores no-store."""
    plan = store([("Cache-Control", "max-age=60, must-understand, no-store")])
    assert plan.store


def test_must_understand_refuses_status_not_understood():
    """§5.2.2.3: a cache that does not understand the status must not store it."""
    plan = store([("Cache-Control", "max-age=60, must-understand, no-store")], status=299)
    assert not plan.store and plan.why == "must-understand"
    assert not store([("Cache-Control", "max-age=60, must-understand")], status=299).store


def test_vary_star_is_not_stored():
    """§4.1: Vary: * always fails to match."""
    plan = store([("Cache-Control", "max-age=60"), ("Vary", "Accept, *")])
    assert not plan.store and plan.why == "vary-star"


def test_vary_names_are_normalised():
    plan = store([("Cache-Control", "max-age=60"), ("Vary", "User-Agent, accept-encoding"),
                  ("Vary", "Accept-Encoding")])
    assert plan.vary == ("accept-encoding", "user-agent")


def test_a_variant_is_the_same_however_it_is_worked_out():
    """Short values are remembered, long or odd ones hashed each time: the id
    must not depend on which, and whitespace is folded either way (§4.1)."""
    from cachefetch.policy import variant_of

    names = ("accept-encoding", "accept-language")
    short = variant_of({"HTTP_ACCEPT_ENCODING": "gzip,  br", "HTTP_ACCEPT_LANGUAGE": "en"}, names)
    assert short == variant_of({"HTTP_ACCEPT_ENCODING": " gzip, br ", "HTTP_ACCEPT_LANGUAGE": "en"}, list(names))
    assert short != variant_of({"HTTP_ACCEPT_ENCODING": "gzip, br"}, names)  # an absent field is a value too
    long = "x" * 300
    assert variant_of({"HTTP_ACCEPT_LANGUAGE": long}, ("accept-language",)) == \
        variant_of({"HTTP_ACCEPT_LANGUAGE": " " + long + "  "}, ("accept-language",))
    assert variant_of({"CONTENT_TYPE": 7}, ("content-type",)) == variant_of({"CONTENT_TYPE": "7"}, ("content-type",))
    assert variant_of({"HTTP_ACCEPT": "a"}, ()) == ""
    # Stored entries carry these ids: they must never change between releases.
    assert short == hash_bytes(b"accept-encoding:gzip, br\naccept-language:en").hex[:32]


@pytest.mark.parametrize("cc,stored", [("max-age=60", False), ("max-age=60, public", True),
                                       ("s-maxage=60", True), ("max-age=60, must-revalidate", True)])
def test_authorization_needs_public_s_maxage_or_must_revalidate(cc, stored):
    """§3.5: a shared cache stores a response to an authorized request only
    with public, s-maxage or must-revalidate."""
    plan = store([("Cache-Control", cc)], request=RequestFacts(authorized=True))
    assert plan.store is stored
    assert plan.why == (None if stored else "authorization")


@pytest.mark.parametrize("cc,ok", [("max-age=60", False), ("public, max-age=60", True),
                                   ("s-maxage=60", True), ("must-revalidate", True)])
def test_shareable_with_authorization(cc, ok):
    """§3.5: the same rule when a stored response would answer an authorized request."""
    entry = stored(("Cache-Control", cc))
    assert shareable(entry, RequestFacts(authorized=True), RULES) is ok
    assert shareable(entry, GET, RULES)


def test_no_freshness_and_no_validator_is_not_stored():
    """§4.2.2/§4.3: with no freshness and nothing to revalidate with, storing is useless."""
    plan = store([("Content-Type", "text/plain")])
    assert not plan.store and plan.why == "no-freshness"


def test_already_stale_without_validator_is_not_stored():
    plan = store([("Cache-Control", "max-age=0")])
    assert not plan.store and plan.why == "already-stale"


@pytest.mark.parametrize("validator", [ETAG, ("Last-Modified", date(0))])
def test_no_freshness_with_validator_is_stored_stale(validator):
    plan = store([validator])
    assert plan.store and plan.lifetime.seconds == 0 and plan.expires_at <= NOW


def test_no_cache_response_is_stored():
    """§5.2.2.4: no-cache allows storing; every reuse is validated first."""
    plan = store([("Cache-Control", "no-cache, max-age=600"), ETAG])
    assert plan.store


@pytest.mark.parametrize("request_facts,why", [(RequestFacts(method="HEAD"), "method"),
                                               (RequestFacts(method="POST"), "method"),
                                               (RequestFacts(has_body=True), "request-body")])
def test_only_bodyless_get_is_stored(request_facts, why):
    plan = store([("Cache-Control", "max-age=60")], request=request_facts)
    assert not plan.store and plan.why == why


def test_too_large_is_not_stored():
    headers = [("Cache-Control", "max-age=60"), ("Content-Length", "101")]
    assert store(headers, max_object_size=100).why == "too-large"
    assert store(headers, max_object_size=101).store


def test_stored_headers_drop_hop_by_hop_and_cache_set_fields():
    """RFC 9110 §7.6.1 hop-by-hop fields (and those Connection names) are not stored;
    Age is recomputed, the origin's Date is kept (RFC 9111 §4)."""
    plan = store([("Cache-Control", "max-age=60"), ("Connection", "close, X-Hop"), ("X-Hop", "1"),
                  ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("Age", "3"),
                  ("Date", date(0)), ("Content-Length", "4"), ("X-Kept", "1")])
    names = {k.lower() for k, _ in plan.headers}
    assert names == {"cache-control", "date", "x-kept"}
    assert plan.content_length == 4


# == request plans (RFC 9111 §4, §5.2.1; RFC 5861) ===========================

VALIDATED = (("Cache-Control", "max-age=60"), ETAG)


def plan(request=GET, entry=None, rules=RULES, now=NOW):
    return plan_request(request, entry, now, rules)


def test_read_request():
    facts = read_request({"REQUEST_METHOD": "GET", "HTTP_CACHE_CONTROL": "Max-Age=5",
                          "HTTP_AUTHORIZATION": "Basic eA==", "CONTENT_LENGTH": ""})
    assert facts.method == "GET" and facts.directives.max_age == 5 and facts.authorized and not facts.has_body


@pytest.mark.parametrize("environ,body", [({"CONTENT_LENGTH": "3"}, True), ({"CONTENT_LENGTH": "0"}, False),
                                          ({"HTTP_TRANSFER_ENCODING": "chunked"}, True), ({}, False)])
def test_read_request_body(environ, body):
    assert read_request(environ).has_body is body


def test_pragma_no_cache_only_without_cache_control():
    """§5.4: Pragma: no-cache counts only when there is no Cache-Control."""
    assert read_request({"HTTP_PRAGMA": "no-cache"}).no_cache
    assert not read_request({"HTTP_PRAGMA": "no-cache", "HTTP_CACHE_CONTROL": "max-age=10"}).no_cache


def test_request_no_store_bypasses():
    """§5.2.1.5: a request no-store: nothing served from or stored in the cache."""
    p = plan(req("no-store"), stored(*VALIDATED))
    assert p.action is Action.BYPASS and str(p.status) == "cachefetch; fwd=request"


def test_request_with_body_bypasses():
    p = plan(req(has_body=True), stored(*VALIDATED))
    assert p.action is Action.BYPASS and str(p.status) == "cachefetch; fwd=bypass; detail=request-body"


def test_nothing_stored_is_a_miss():
    p = plan(GET, None)
    assert p.action is Action.MISS and str(p.status) == "cachefetch; fwd=miss"


def test_fresh_is_a_hit():
    entry = stored(*VALIDATED, ttl=30)
    p = plan(GET, entry)
    assert p.action is Action.HIT and p.entry is entry and str(p.status) == "cachefetch; hit; ttl=30"


def test_fresh_forever_is_a_hit_without_ttl():
    p = plan(GET, stored(ttl=None))
    assert p.action is Action.HIT and p.status.ttl is None


@pytest.mark.parametrize("age,action", [(5, Action.HIT), (6, Action.REVALIDATE)])
def test_request_max_age(age, action):
    """§5.2.1.1: the client wants a response no older than max-age."""
    p = plan(req("max-age=5"), stored(*VALIDATED, ttl=30, age=age))
    assert p.action is action
    if action is Action.REVALIDATE:
        assert p.status.fwd == "request"


@pytest.mark.parametrize("ttl,action", [(20, Action.HIT), (19, Action.REVALIDATE)])
def test_request_min_fresh(ttl, action):
    """§5.2.1.3: the client wants at least min-fresh seconds of freshness left."""
    assert plan(req("min-fresh=20"), stored(*VALIDATED, ttl=ttl)).action is action


@pytest.mark.parametrize("cc,action", [("max-stale=60", Action.HIT), ("max-stale=29", Action.REVALIDATE),
                                       ("max-stale", Action.HIT), (None, Action.REVALIDATE)])
def test_request_max_stale(cc, action):
    """§5.2.1.2: max-stale accepts a stale response up to the given staleness, any without a value."""
    p = plan(req(cc), stored(*VALIDATED, ttl=-30))
    assert p.action is action
    if action is Action.HIT:
        assert p.status.detail == "max-stale" and p.status.outcome == "stale"


def test_max_stale_still_bound_by_request_max_age():
    assert plan(req("max-stale, max-age=10"), stored(*VALIDATED, ttl=-30, age=90)).action is Action.REVALIDATE


def test_only_if_cached_with_nothing_stored_is_504():
    """§5.2.1.7: only-if-cached and nothing stored: 504."""
    p = plan(req("only-if-cached"), None)
    assert p.action is Action.GATEWAY_TIMEOUT and p.status.detail == "only-if-cached"


def test_only_if_cached_with_stale_entry_is_504():
    assert plan(req("only-if-cached"), stored(*VALIDATED, ttl=-1)).action is Action.GATEWAY_TIMEOUT


def test_only_if_cached_with_fresh_entry_is_a_hit():
    assert plan(req("only-if-cached"), stored(*VALIDATED)).action is Action.HIT


def test_only_if_cached_and_max_stale_serves_stale():
    assert plan(req("only-if-cached, max-stale"), stored(*VALIDATED, ttl=-100)).action is Action.HIT


@pytest.mark.parametrize("headers,action", [(VALIDATED, Action.REVALIDATE),
                                            ((("Cache-Control", "max-age=60"),), Action.MISS)])
def test_request_no_cache(headers, action):
    """§5.2.1.4: the request's no-cache: validate (or fetch anew without a validator)."""
    p = plan(req("no-cache"), stored(*headers, ttl=60))
    assert p.action is action and p.status.fwd == "request"


def test_request_pragma_no_cache_revalidates():
    assert plan(read_request({"HTTP_PRAGMA": "no-cache"}), stored(*VALIDATED)).action is Action.REVALIDATE


@pytest.mark.parametrize("request_cc", [None, "max-stale", "max-stale=9999"])
def test_response_no_cache_always_revalidates(request_cc):
    """§5.2.2.4: a response with no-cache is never reused without validation, fresh or not."""
    entry = stored(("Cache-Control", "no-cache, max-age=600"), ETAG, ttl=600)
    assert plan(req(request_cc), entry).action is Action.REVALIDATE
    stale = stored(("Cache-Control", "no-cache, max-age=600"), ETAG, ttl=-10)
    assert plan(req(request_cc), stale).action is Action.REVALIDATE


def test_stale_with_validator_revalidates_without_refetches():
    """§4.3: a stale response with a validator is validated; without one it is fetched anew."""
    p = plan(GET, stored(*VALIDATED, ttl=-1))
    assert p.action is Action.REVALIDATE and p.status.fwd == "stale"
    assert plan(GET, stored(("Cache-Control", "max-age=60"), ttl=-1)).action is Action.MISS


def test_must_revalidate_fresh_is_still_a_hit():
    assert plan(GET, stored(("Cache-Control", "max-age=60, must-revalidate"), ETAG)).action is Action.HIT


@pytest.mark.parametrize("cc", ["max-age=60, must-revalidate", "max-age=60, proxy-revalidate", "s-maxage=60"])
@pytest.mark.parametrize("request_cc", ["max-stale", "max-stale=600"])
def test_revalidate_directives_forbid_max_stale(cc, request_cc):
    """§5.2.2.2 must-revalidate, §5.2.2.8 proxy-revalidate, §5.2.2.10 s-maxage:
    once stale, a shared cache must not reuse it without validation."""
    entry = stored(("Cache-Control", f"{cc}, stale-while-revalidate=600"), ETAG, ttl=-10)
    assert plan(req(request_cc), entry).action is Action.REVALIDATE


@pytest.mark.parametrize("cc", ["max-age=60, must-revalidate", "max-age=60, proxy-revalidate", "s-maxage=60"])
def test_revalidate_directives_forbid_stale_while_revalidate(cc):
    entry = stored(("Cache-Control", f"{cc}, stale-while-revalidate=600"), ETAG, ttl=-10)
    assert plan(GET, entry).action is Action.REVALIDATE


@pytest.mark.parametrize("cc", ["max-age=60, must-revalidate", "max-age=60, proxy-revalidate", "s-maxage=60",
                                "max-age=60, no-cache"])
def test_revalidate_directives_forbid_stale_if_error(cc):
    entry = stored(("Cache-Control", f"{cc}, stale-if-error=600"), ETAG, ttl=-10)
    assert not stale_if_error_allows(entry, GET, NOW, CacheRules(stale_if_error=600))
    assert not allows_stale(parse_cache_control(cc))


@pytest.mark.parametrize("stale_for,action", [(10, Action.STALE_HIT), (30, Action.STALE_HIT),
                                              (31, Action.REVALIDATE)])
def test_stale_while_revalidate_window(stale_for, action):
    """RFC 5861 §3: within the window, serve stale and revalidate in the background."""
    entry = stored(("Cache-Control", "max-age=60, stale-while-revalidate=30"), ETAG, ttl=-stale_for)
    p = plan(GET, entry)
    assert p.action is action
    if action is Action.STALE_HIT:
        assert p.status.hit and p.status.detail == "stale-while-revalidate" and p.status.outcome == "stale"


def test_stale_while_revalidate_not_against_request_no_cache():
    entry = stored(("Cache-Control", "max-age=60, stale-while-revalidate=30"), ETAG, ttl=-5)
    assert plan(req("no-cache"), entry).action is Action.REVALIDATE


def test_plan_reads_targeted_field_of_stored_response():
    """RFC 9213: the stored CDN-Cache-Control governs reuse too."""
    entry = stored(("CDN-Cache-Control", "no-cache"), ("Cache-Control", "max-age=600"), ETAG, ttl=600)
    assert plan(GET, entry).action is Action.REVALIDATE
    assert plan(GET, entry, rules=CacheRules(targeted_fields=())).action is Action.HIT


def test_plan_with_an_index_entry():
    """The rules read cachefetch.index.Entry as they read the test's Stored."""
    sp = store([("Cache-Control", "max-age=60"), ("Age", "20"), ETAG])
    entry = Entry("k", "", hash_bytes(b""), 0, 200, sp.headers, stored_at=sp.response_time,
                  expires_at=sp.expires_at, initial_age=sp.initial_age)
    assert plan(GET, entry, now=NOW + 39).action is Action.HIT
    assert plan(GET, entry, now=NOW + 41).action is Action.REVALIDATE
    assert plan(req("max-age=30"), entry, now=NOW + 11).action is Action.REVALIDATE


# == stale-if-error (RFC 5861 §4) ============================================

def sie(response_cc="max-age=60", request_cc=None, rules=RULES, stale_for=50):
    entry = stored(("Cache-Control", response_cc), ETAG, ttl=-stale_for)
    return stale_if_error_allows(entry, req(request_cc), NOW, rules)


def test_stale_if_error_off_by_default():
    assert not sie()


@pytest.mark.parametrize("window,ok", [(49, False), (50, True), (100, True)])
def test_response_stale_if_error_window(window, ok):
    assert sie(f"max-age=60, stale-if-error={window}") is ok


def test_request_stale_if_error_overrides_response():
    assert sie("max-age=60, stale-if-error=10", request_cc="stale-if-error=100")
    assert not sie("max-age=60, stale-if-error=100", request_cc="stale-if-error=10")


def test_response_stale_if_error_overrides_rules():
    assert sie("max-age=60, stale-if-error=60", rules=CacheRules(stale_if_error=10))
    assert not sie("max-age=60, stale-if-error=10", rules=CacheRules(stale_if_error=600))


def test_rules_stale_if_error_applies_without_directive():
    assert sie(rules=CacheRules(stale_if_error=60))
    assert not sie(rules=CacheRules(stale_if_error=49))


def test_stale_if_error_on_a_fresh_entry():
    entry = stored(("Cache-Control", "max-age=60, stale-if-error=0"), ttl=10)
    assert stale_if_error_allows(entry, GET, NOW, RULES)


# == conditionals and Range (RFC 9110 §13, §14) ==============================

LM = date(-3600)
SIZE = 1000


def answer(method="GET", *, status=200, etag='"a"', last_modified=LM, size=SIZE, **fields):
    """evaluate() for a request with the given fields (``if_none_match=…`` → HTTP_IF_NONE_MATCH)."""
    environ = {"REQUEST_METHOD": method}
    environ.update({"HTTP_" + k.upper(): v for k, v in fields.items()})
    return evaluate(environ, status=status, etag=etag, last_modified=last_modified, size=size)


def outcome(*args, **kw) -> Outcome:
    return answer(*args, **kw).outcome


@pytest.mark.parametrize("condition,etag,result", [
    ('"a"', '"a"', Outcome.FULL), ('"b", "a"', '"a"', Outcome.FULL), ("*", '"a"', Outcome.FULL),
    ('"b"', '"a"', Outcome.PRECONDITION_FAILED),
    ('"a"', 'W/"a"', Outcome.PRECONDITION_FAILED),       # strong comparison: a weak tag never matches
    ('W/"a"', '"a"', Outcome.PRECONDITION_FAILED),
    ('"a"', None, Outcome.PRECONDITION_FAILED),
    ("a", '"a"', Outcome.PRECONDITION_FAILED),            # an unquoted tag is no entity-tag
])
def test_if_match(condition, etag, result):
    """RFC 9110 §13.1.1: If-Match uses the strong comparison; false → 412."""
    assert outcome(if_match=condition, etag=etag) is result


@pytest.mark.parametrize("since,result", [(date(-7200), Outcome.PRECONDITION_FAILED), (LM, Outcome.FULL),
                                          (date(0), Outcome.FULL), ("garbage", Outcome.FULL)])
def test_if_unmodified_since(since, result):
    """RFC 9110 §13.1.4: modified after the date → 412; an invalid date is ignored."""
    assert outcome(if_unmodified_since=since) is result


def test_if_unmodified_since_ignored_with_if_match():
    """RFC 9110 §13.1.4: ignored when the request has If-Match."""
    assert outcome(if_match='"a"', if_unmodified_since=date(-7200)) is Outcome.FULL


@pytest.mark.parametrize("condition,etag,result", [
    ('"a"', '"a"', Outcome.NOT_MODIFIED), ('W/"a"', '"a"', Outcome.NOT_MODIFIED),
    ('"a"', 'W/"a"', Outcome.NOT_MODIFIED), ('"x", W/"a"', '"a"', Outcome.NOT_MODIFIED),
    ("*", '"a"', Outcome.NOT_MODIFIED), ('"b"', '"a"', Outcome.FULL),
    ("a", '"a"', Outcome.FULL), ('"a', '"a"', Outcome.FULL), ('"a"', None, Outcome.FULL),
])
def test_if_none_match_weak_comparison(condition, etag, result):
    """RFC 9110 §13.1.2, §8.8.3.2: If-None-Match uses the weak comparison; unquoted tags never match."""
    assert outcome(if_none_match=condition, etag=etag) is result


def test_if_none_match_on_unsafe_method_is_412():
    """RFC 9110 §13.1.2: a false If-None-Match on a method other than GET/HEAD is a 412."""
    assert outcome("PUT", if_none_match='"a"') is Outcome.PRECONDITION_FAILED
    assert outcome("HEAD", if_none_match='"a"') is Outcome.NOT_MODIFIED


@pytest.mark.parametrize("since,result", [(LM, Outcome.NOT_MODIFIED), (date(0), Outcome.NOT_MODIFIED),
                                          (date(-7200), Outcome.FULL), ("garbage", Outcome.FULL)])
def test_if_modified_since(since, result):
    """RFC 9110 §13.1.3: not modified since the date (equal included) → 304; invalid date ignored."""
    assert outcome(if_modified_since=since) is result


def test_if_modified_since_only_without_if_none_match():
    """RFC 9110 §13.1.3: ignored when the request has If-None-Match."""
    assert outcome(if_none_match='"other"', if_modified_since=date(0)) is Outcome.FULL


def test_if_modified_since_only_for_get_and_head():
    assert outcome("HEAD", if_modified_since=date(0)) is Outcome.NOT_MODIFIED
    assert outcome("POST", if_modified_since=date(0)) is Outcome.FULL


def test_if_modified_since_without_last_modified():
    assert outcome(if_modified_since=date(0), last_modified=None) is Outcome.FULL


def test_preconditions_come_before_range():
    """RFC 9110 §13.2.2: a 304 or 412 is decided before Range."""
    assert outcome(if_none_match='"a"', range="bytes=0-9") is Outcome.NOT_MODIFIED
    assert outcome(if_match='"b"', range="bytes=0-9") is Outcome.PRECONDITION_FAILED


@pytest.mark.parametrize("value,start,stop", [
    ("bytes=0-", 0, SIZE), ("bytes=0-0", 0, 1), ("bytes=0-99", 0, 100), ("bytes=500-", 500, SIZE),
    ("bytes=500-5000", 500, SIZE), ("bytes=-100", 900, SIZE), ("bytes=-5000", 0, SIZE),
    ("bytes=999-999", 999, SIZE), ("Bytes=0-9", 0, 10),
])
def test_range_satisfiable(value, start, stop):
    """RFC 9110 §14.1.2: first-last, open-ended and suffix ranges; the range unit is case-insensitive (§14.1)."""
    assert answer(range=value) == Answer(Outcome.PARTIAL, start, stop)


@pytest.mark.parametrize("value,size", [("bytes=-0", SIZE), ("bytes=1000-", SIZE), ("bytes=5000-6000", SIZE),
                                        ("bytes=0-", 0), ("bytes=-10", 0)])
def test_range_unsatisfiable(value, size):
    """RFC 9110 §14.1.1: a first-pos at or past the end, or a zero suffix, is unsatisfiable (416)."""
    assert outcome(range=value, size=size) is Outcome.UNSATISFIABLE


@pytest.mark.parametrize("value", ["bytes=0-1,5-6", "bytes=0-1, -5", "bytes=abc", "items=0-5", "bytes=5-2",
                                   "bytes=-", "bytes=", "0-5", "bytes=1-2-3"])
def test_range_ignored(value):
    """RFC 9110 §14.2: several ranges may get a 200; an invalid or unknown-unit Range is ignored."""
    assert outcome(range=value) is Outcome.FULL


def test_range_only_for_get_with_known_size():
    """RFC 9110 §14.2: GET is the only method with range handling."""
    assert outcome("HEAD", range="bytes=0-9") is Outcome.FULL
    assert outcome(range="bytes=0-9", size=None) is Outcome.FULL


@pytest.mark.parametrize("if_range,etag,partial", [
    ('"a"', '"a"', True), ('"b"', '"a"', False),
    ('W/"a"', 'W/"a"', False),   # a weak tag never satisfies If-Range
    ('"a"', 'W/"a"', False),
    (LM, '"a"', True),           # exactly the Last-Modified date
    (date(-3599), '"a"', False), (date(-3601), '"a"', False), ("garbage", '"a"', False),
])
def test_if_range(if_range, etag, partial):
    """RFC 9110 §13.1.5: If-Range holds for a strong matching ETag, or a date equal to Last-Modified."""
    result = outcome(range="bytes=0-9", if_range=if_range, etag=etag)
    assert result is (Outcome.PARTIAL if partial else Outcome.FULL)


def test_if_range_date_without_last_modified():
    assert outcome(range="bytes=0-9", if_range=LM, last_modified=None) is Outcome.FULL


@pytest.mark.parametrize("status", [203, 206, 301, 404, 500])
def test_conditionals_only_for_200(status):
    """Only a 200 is evaluated: other statuses are replayed whole."""
    assert outcome(status=status, if_none_match="*", range="bytes=0-1") is Outcome.FULL
    assert outcome(status=status, if_match='"zzz"') is Outcome.FULL


# == revalidation (RFC 9111 §4.3, §3.2) ======================================

def test_conditional_fields_list_every_variant_etag():
    """§4.3.1: If-None-Match carries the entity tags of all stored responses being validated."""
    stale = stored(("ETag", '"a"'), ("Last-Modified", LM))
    variants = [stored(("ETag", 'W/"b"')), stored(("ETag", '"a"')), stored(("ETag", "unquoted")), stored()]
    fields = conditional_fields(stale, variants)
    assert fields == {"HTTP_IF_NONE_MATCH": '"a", W/"b"', "HTTP_IF_MODIFIED_SINCE": LM}


def test_conditional_fields_if_modified_since_from_the_stale_entry_only():
    """§4.3.1: If-Modified-Since from the stored Last-Modified, when it is a valid date."""
    assert conditional_fields(stored(), [stored(("Last-Modified", LM))]) == {}
    assert conditional_fields(stored(("Last-Modified", "last tuesday")), []) == {}
    assert conditional_fields(stored(("Last-Modified", LM)), []) == {"HTTP_IF_MODIFIED_SINCE": LM}


def variant(etag=None, last_modified=None, at=NOW):
    headers = tuple(h for h in (("ETag", etag), ("Last-Modified", last_modified)) if h[1] is not None)
    return Stored(headers, 200, at, NOW + 60)


def test_select_strong_etag_updates_every_match():
    """§4.3.4: a strong validator selects all stored responses with that strong validator."""
    a1, a2, weak_a, b = variant('"a"'), variant('"a"', at=NOW - 5), variant('W/"a"'), variant('"b"')
    assert select_for_update([("ETag", '"a"')], b, [a1, a2, weak_a]) == [a1, a2]


def test_select_strong_etag_matching_nothing_updates_nothing():
    """§4.3.4: no stored response with the 304's strong validator: update none."""
    stale = variant('"a"')
    assert select_for_update([("ETag", '"zzz"')], stale, [variant('"b"')]) == []


def test_select_weak_etag_updates_most_recent_match():
    """§4.3.4: weak validators only: the most recent matching stored response."""
    old, new, other = variant('W/"a"', at=NOW - 100), variant('"a"', at=NOW - 1), variant('W/"b"', at=NOW)
    assert select_for_update([("ETag", 'W/"a"')], old, [new, other]) == [new]


def test_select_by_last_modified():
    mine, other = variant(last_modified=LM), variant(last_modified=date(-60))
    assert select_for_update([("Last-Modified", LM)], other, [mine]) == [mine]


def test_select_etag_decides_over_last_modified():
    a, b = variant('"a"', LM), variant('"b"', LM)
    assert select_for_update([("ETag", '"b"'), ("Last-Modified", LM)], a, [b]) == [b]


def test_bare_304_updates_the_revalidated_response():
    """§4.3.4 (a 304 with no validator): it answers the request we sent, for the response we revalidated."""
    stale, other = variant('"a"'), variant('"b"')
    assert select_for_update([("Date", date(0))], stale, [other]) == [stale]


def test_updated_headers_replace_fields():
    """§3.2: each field of the 304 replaces the stored field of that name; the rest stay."""
    stored_fields = [("Content-Type", "text/plain"), ("Cache-Control", "max-age=10"), ("Link", "</a>"),
                     ("Link", "</b>"), ("X-Old", "1"), ("ETag", '"a"')]
    new = updated_headers(stored_fields, [("Cache-Control", "max-age=600"), ("Link", "</c>"), ("Date", date(0))])
    assert sorted(new) == sorted([("Content-Type", "text/plain"), ("X-Old", "1"), ("ETag", '"a"'),
                                  ("Cache-Control", "max-age=600"), ("Link", "</c>"), ("Date", date(0))])


def test_updated_headers_keep_framing_and_encoding():
    """§3.2: fields that the stored body depends on (Content-Length, Content-Encoding…) are not changed."""
    stored_fields = [("Content-Type", "text/plain"), ("Content-Encoding", "gzip"), ("Content-Length", "42")]
    new = updated_headers(stored_fields, [("Content-Type", "text/html"), ("Content-Encoding", "br"),
                                          ("Content-Length", "0"), ("Transfer-Encoding", "chunked")])
    assert sorted(new) == sorted(stored_fields)


def test_updated_headers_drop_hop_by_hop_and_set_cookie():
    """§3.1, §3.2: what cannot be stored is not added by an update either."""
    new = updated_headers([("ETag", '"a"')], [("Connection", "X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "x"),
                                              ("Set-Cookie", "id=1"), ("Age", "5"), ("X-New", "1")])
    assert new == [("ETag", '"a"'), ("X-New", "1")]


def test_update_refreshes_freshness():
    """§4.3.4: the 304's Cache-Control gives the stored response a new lifetime."""
    headers = updated_headers([("Cache-Control", "max-age=1"), ETAG], [("Cache-Control", "max-age=300")])
    sp = store(headers, response_time=NOW + 100, request_time=NOW + 100)
    assert sp.store and sp.expires_at == NOW + 400


# == invalidation (RFC 9111 §4.4) ============================================

TARGET = "http://example.test/a/b"


@pytest.mark.parametrize("name", ["Location", "Content-Location"])
@pytest.mark.parametrize("value,url", [("/c", "http://example.test/c"), ("c", "http://example.test/a/c"),
                                       ("http://example.test/d?x=1", "http://example.test/d?x=1"),
                                       ("//example.test/e", "http://example.test/e")])
def test_same_origin_location_is_invalidated(name, value, url):
    """§4.4: Location and Content-Location URIs of the same origin are invalidated too."""
    assert invalidation_targets(TARGET, [(name, value)]) == [TARGET, url]


@pytest.mark.parametrize("value", ["http://other.test/c", "https://example.test/c", "http://example.test:8080/c",
                                   "//other.test/c", "http://example.test.evil/c"])
def test_other_origin_location_is_not_invalidated(value):
    """§4.4: a cache must not invalidate a URI of another origin (scheme, host, port)."""
    assert invalidation_targets(TARGET, [("Location", value), ("Content-Location", value)]) == [TARGET]


@pytest.mark.parametrize("target,value,url", [
    (TARGET, "http://example.test:80/c", "http://example.test/c"),
    (TARGET, "HTTP://Example.TEST/c", "http://example.test/c"),
    (TARGET, "/c#frag", "http://example.test/c"),
    ("http://example.test:80/a", "http://example.test/c", "http://example.test:80/c"),
    ("https://example.test/a", "https://example.test:443/c", "https://example.test/c"),
    ("http://example.test:8080/a", "http://example.test:8080/c", "http://example.test:8080/c"),
])
def test_same_origin_is_compared_with_default_ports_and_spelled_as_the_target(target, value, url):
    """RFC 6454 origins: the scheme's default port is the same origin; the URL comes back
    in the target's own spelling, the one its entry's key was made from."""
    assert invalidation_targets(target, [("Location", value)]) == [target, url]


@pytest.mark.parametrize("value", ["http://example.test:99999/c", "http://example.test:x/c", "ftp://example.test/c"])
def test_a_location_with_a_bad_port_or_another_scheme_is_not_invalidated(value):
    assert invalidation_targets(TARGET, [("Location", value)]) == [TARGET]


def test_invalidation_targets_both_and_no_duplicates():
    assert invalidation_targets(TARGET, [("Location", "/x"), ("Content-Location", "/a/b")]) == \
        [TARGET, "http://example.test/x"]
    assert invalidation_targets(TARGET, []) == [TARGET]


@pytest.mark.parametrize("method,status", [("POST", 200), ("PUT", 201), ("DELETE", 204), ("PATCH", 200),
                                           ("POST", 303), ("PUT", 301), ("PURGE", 200), ("FROB", 399)])
def test_unsafe_method_with_non_error_status_invalidates(method, status):
    """§4.4: an unsafe method (or one not known safe) answered 2xx/3xx invalidates."""
    assert invalidates(method, status)


@pytest.mark.parametrize("method,status", [("POST", 400), ("PUT", 404), ("DELETE", 500), ("PATCH", 199),
                                           ("POST", 100)])
def test_error_status_does_not_invalidate(method, status):
    assert not invalidates(method, status)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE"])
def test_safe_methods_do_not_invalidate(method):
    """RFC 9110 §9.2.1: the safe methods."""
    assert not invalidates(method, 200)


# == Cache-Status (RFC 9211) =================================================

def test_cache_status_parameter_order():
    """RFC 9211 §2: the cache's name first, then its parameters in the order defined."""
    full = CacheStatus(fwd="stale", fwd_status=304, ttl=-5, stored=True, collapsed=True, detail="x-y")
    assert str(full) == "cachefetch; fwd=stale; fwd-status=304; ttl=-5; stored; collapsed; detail=x-y"
    assert str(CacheStatus(hit=True, ttl=12)) == "cachefetch; hit; ttl=12"
    assert str(CacheStatus()) == "cachefetch"
    assert CacheStatus.header(CacheStatus(fwd="miss")) == ("Cache-Status", "cachefetch; fwd=miss")


@pytest.mark.parametrize("status,word", [
    (CacheStatus(hit=True, ttl=5), "hit"), (CacheStatus(hit=True), "hit"),
    (CacheStatus(hit=True, ttl=-5), "stale"), (CacheStatus(hit=True, detail="stale-if-error"), "stale"),
    (CacheStatus(hit=True, ttl=3, detail="stale-while-revalidate"), "stale"),
    (CacheStatus(fwd="stale", fwd_status=304), "revalidated"),
    (CacheStatus(fwd="miss", collapsed=True), "collapsed"),
    (CacheStatus(fwd="miss"), "miss"), (CacheStatus(fwd="stale", fwd_status=200), "miss"),
    (CacheStatus(fwd="request"), "miss"), (CacheStatus(fwd="bypass"), "bypass"),
    (CacheStatus(fwd="method"), "bypass"), (CacheStatus(detail="only-if-cached"), "bypass"),
])
def test_cache_status_outcome(status, word):
    assert status.outcome == word


def test_cache_status_with_copies():
    base = CacheStatus(fwd="miss")
    assert base.with_(stored=True) == CacheStatus(fwd="miss", stored=True) and not base.stored
