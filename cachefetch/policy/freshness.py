"""Age and freshness (RFC 9111 §4.2, §5.1–5.3, RFC 9213).

Pure functions of headers and clock readings; the caller passes the times.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from .dates import parse_http_date
from .directives import DELTA_MAX, Directives, parse_cache_control, parse_targeted
from .headers import header

__all__ = ["FOREVER", "HEURISTIC_STATUSES", "CacheRules", "Lifetime", "response_directives", "parse_age",
           "corrected_initial_age", "freshness_lifetime", "allows_stale"]

#: ``default_ttl=FOREVER``: a response that states no freshness stays fresh until evicted.
FOREVER = math.inf

#: RFC 9110 §15.1: statuses a cache may store with heuristic freshness.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})

_AGE = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class CacheRules:
    """A deployment's choices where the RFC leaves them to the cache.

    :param cache_statuses: final statuses that may be stored; ``None`` for
        the RFC's: the heuristically cacheable ones, and any other final status
        with explicit freshness (206 and 304 are never stored).
    :param default_ttl: freshness of a response that states none: ``None``
        follows the RFC (heuristic from Last-Modified, else revalidate every
        time if it has a validator, else not stored); seconds; or
        :data:`FOREVER`.
    :param heuristic_max: the cap on heuristic freshness, seconds.
    :param heuristic_fraction: the share of the time since Last-Modified.
    :param targeted_fields: targeted cache-control fields (RFC 9213) this
        cache obeys, in precedence order, lower case.
    :param stale_if_error: seconds past expiry a stale response may be served
        when the origin fails (RFC 5861's directive overrides it); ``None`` never.
    :param cookies: ``"respect"``: a request with ``Cookie`` is served and
        stored only where the response is ``public`` or varies on ``Cookie``;
        ``"ignore"``: for apps whose pages never depend on cookies.
    :param max_header_count: responses with more fields are not stored.
    :param max_header_bytes: nor those whose fields take more bytes.
    """

    cache_statuses: frozenset[int] | None = None
    default_ttl: float | None = None
    heuristic_max: float = 86400.0
    heuristic_fraction: float = 0.1
    targeted_fields: tuple[str, ...] = ("cdn-cache-control",)
    stale_if_error: float | None = None
    cookies: str = "respect"
    max_header_count: int = 100
    max_header_bytes: int = 64 << 10


@dataclass(frozen=True)
class Lifetime:
    """A freshness lifetime and where it came from.

    :param seconds: the lifetime; :data:`FOREVER` for fresh until evicted.
    :param source: ``s-maxage``, ``max-age``, ``expires``, ``default``,
        ``heuristic`` or ``none`` (no freshness information: 0).
    """

    seconds: float
    source: str

    @property
    def explicit(self) -> bool:
        return self.source in ("s-maxage", "max-age", "expires")


def response_directives(headers: Sequence[tuple[str, str]],
                        targeted: Iterable[str] = ("cdn-cache-control",)) -> tuple[Directives, bool]:
    """The directives that govern this cache: the first valid targeted field
    (RFC 9213), else ``Cache-Control``. The flag says a targeted field was used
    (then ``Expires`` is ignored too).

    A stored entry's fields (a tuple) are parsed once, not on every hit.
    """
    if isinstance(headers, tuple) and isinstance(targeted, tuple):
        try:
            return _cached_directives(headers, targeted)
        except TypeError:  # a field given as a list: not hashable, parse it afresh
            pass
    return _response_directives(headers, targeted)


def _response_directives(headers: Sequence[tuple[str, str]],
                        targeted: Iterable[str] = ("cdn-cache-control",)) -> tuple[Directives, bool]:
    """:func:`response_directives`, uncached."""
    for name in targeted:
        parsed = parse_targeted(header(headers, name))
        if parsed is not None:
            return parsed, True
    values = [v for k, v in headers if k.lower() == "cache-control"]
    return parse_cache_control(values or None), False




_cached_directives = functools.lru_cache(maxsize=4096)(_response_directives)


def parse_age(value: str | None) -> int:
    """An ``Age`` value (RFC 9111 §5.1): the first member of a list; a
    non-numeric, negative or fractional value is ignored (0); one too large
    to represent saturates (and so is stale)."""
    if value is None:
        return 0
    first = value.split(",", 1)[0].strip(" \t")
    if not _AGE.fullmatch(first):
        return 0
    return min(int(first), DELTA_MAX)


def corrected_initial_age(headers: Sequence[tuple[str, str]], request_time: float, response_time: float) -> float:
    """RFC 9111 §4.2.3: how old the response was when it reached the cache."""
    date_value = parse_http_date(header(headers, "Date"))
    apparent_age = max(0.0, response_time - date_value) if date_value is not None else 0.0
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = parse_age(header(headers, "Age")) + response_delay
    return max(apparent_age, corrected_age_value)


def freshness_lifetime(status: int, headers: Sequence[tuple[str, str]], rules: CacheRules,
                       response_time: float) -> Lifetime:
    """RFC 9111 §4.2.1–4.2.2: ``s-maxage``, ``max-age``, ``Expires − Date``,
    then the deployment's ``default_ttl``, then heuristic freshness for
    heuristically cacheable statuses with ``Last-Modified``; else 0.

    An invalid or conflicting value means already stale (0); so does an
    ``Expires`` that is not an HTTP-date, or several different ones.
    """
    cc, targeted = response_directives(headers, rules.targeted_fields)
    if "s-maxage" in cc:
        return Lifetime(float(cc.s_maxage), "s-maxage")
    if "max-age" in cc:
        return Lifetime(float(cc.max_age), "max-age")
    expires_values = [v for k, v in headers if k.lower() == "expires"]
    if expires_values and not targeted:
        expires = parse_http_date(expires_values[0])
        if expires is None or len(set(v.strip() for v in expires_values)) > 1:
            return Lifetime(0.0, "expires")
        date = parse_http_date(header(headers, "Date"))
        return Lifetime(max(0.0, expires - (date if date is not None else response_time)), "expires")
    if rules.default_ttl is not None:
        return Lifetime(float(rules.default_ttl), "default")
    last_modified = parse_http_date(header(headers, "Last-Modified"))
    if status in HEURISTIC_STATUSES and last_modified is not None:
        date = parse_http_date(header(headers, "Date"))
        since = (date if date is not None else response_time) - last_modified
        return Lifetime(min(max(0.0, since * rules.heuristic_fraction), rules.heuristic_max), "heuristic")
    return Lifetime(0.0, "none")


def allows_stale(directives: Directives) -> bool:
    """Whether a stale copy may ever be served without validation: not with
    ``no-cache``, ``must-revalidate``, ``proxy-revalidate`` or ``s-maxage``
    (RFC 9111 §4.2.4, §5.2.2)."""
    return not (directives.no_cache or directives.must_revalidate or directives.proxy_revalidate
                or "s-maxage" in directives)
