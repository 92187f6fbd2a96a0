"""Whether and how a response is stored (RFC 9111 §3, §4.2, §5.2.2): a :class:`StorePlan`."""
from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Sequence

from .freshness import FOREVER, HEURISTIC_STATUSES, CacheRules, Lifetime, corrected_initial_age, freshness_lifetime, response_directives
from .headers import has_validator, header, stored_headers, vary_names, without_fields
from .lookup import RequestFacts, cookie_matters

__all__ = ["StorePlan", "plan_store", "content_length"]

# The statuses whose semantics this cache implements (RFC 9110 §15), for must-understand.
_UNDERSTOOD = frozenset(s.value for s in HTTPStatus if 200 <= s.value <= 599 and s.value != 206)


@dataclass(frozen=True)
class StorePlan:
    """What to do with a response the origin just gave.

    :param store: whether to store it.
    :param why: when not stored, a slug saying why (``no-store``,
        ``private``, ``status-500``…), for ``Cache-Status: …; detail=``.
    :param headers: the fields to store and replay (hop-by-hop fields, cookies
        and fields named by ``no-cache="…"``/``private="…"`` removed).
    :param vary: the request fields the response varies on.
    :param lifetime: its freshness lifetime (``seconds`` is :data:`FOREVER`
        for fresh until evicted).
    :param initial_age: its corrected initial age (RFC 9111 §4.2.3).
    :param response_time: when the response arrived (epoch seconds).
    :param content_length: the announced body length, -1 if unknown.
    """

    store: bool
    why: str | None
    headers: tuple[tuple[str, str], ...] = ()
    vary: tuple[str, ...] = ()
    lifetime: Lifetime | None = None
    initial_age: float = 0.0
    response_time: float = 0.0
    content_length: int = -1

    @property
    def expires_at(self) -> float | None:
        """Epoch seconds at which the stored response becomes stale; ``None``: never."""
        if self.lifetime is None or self.lifetime.seconds == FOREVER:
            return None
        return self.response_time + self.lifetime.seconds - self.initial_age


def content_length(headers: Sequence[tuple[str, str]]) -> int:
    """The announced ``Content-Length``, -1 if absent or not one number."""
    value = header(headers, "Content-Length")
    if value is None or not value.strip().isdigit():
        return -1
    return int(value)


def _not(why: str) -> StorePlan:
    return StorePlan(False, why)


def plan_store(status: int, headers: Sequence[tuple[str, str]], request: RequestFacts, rules: CacheRules, *,
               request_time: float, response_time: float, max_object_size: int | None = None) -> StorePlan:
    """Decide whether a shared cache stores this response, and with what.

    Not stored: a request other than GET or with a body; a status outside
    ``rules.cache_statuses`` (206 never; by default, the heuristically
    cacheable statuses, and any other with explicit freshness); ``Set-Cookie``; ``no-store`` (unless
    ``must-understand`` and the status is understood); unqualified
    ``private``; ``Vary: *``; for a request with ``Authorization``, a
    response without ``public``, ``s-maxage`` or ``must-revalidate``; for
    one with ``Cookie``, a response neither ``public`` nor varying on
    ``Cookie`` (unless ``rules.cookies == "ignore"``); more than
    ``rules.max_header_count`` fields or ``max_header_bytes`` of them; a
    response already stale (or with no freshness information) that has no
    validator to revalidate it with; one announced larger than
    ``max_object_size``. Stored with ``no-cache``: it is revalidated before
    every reuse.
    """
    headers = list(headers)
    if request.method != "GET":
        return _not("method")
    if request.has_body:
        return _not("request-body")
    if status == 206 or not 200 <= status <= 599:
        return _not(f"status-{status}")
    lifetime = freshness_lifetime(status, headers, rules, response_time)
    if rules.cache_statuses is not None:
        if status not in rules.cache_statuses:
            return _not(f"status-{status}")
    elif status not in HEURISTIC_STATUSES and not lifetime.explicit:
        return _not(f"status-{status}")  # RFC 9111 §3: only with explicit freshness
    if any(k.lower() in ("set-cookie", "set-cookie2") for k, _ in headers):
        return _not("set-cookie")
    cc, _ = response_directives(headers, rules.targeted_fields)
    if cc.must_understand and status not in _UNDERSTOOD:
        return _not("must-understand")
    if cc.no_store and not cc.must_understand:  # §5.2.2.3: must-understand overrides no-store
        return _not("no-store")
    if cc.private:
        return _not("private")
    vary = vary_names(headers)
    if "*" in vary:
        return _not("vary-star")
    if request.authorized and not (cc.public or "s-maxage" in cc or cc.must_revalidate):
        return _not("authorization")
    if cookie_matters(request, rules) and not (cc.public or "cookie" in vary):
        return _not("cookie")
    if (len(headers) > rules.max_header_count
            or sum(len(k) + len(v) + 4 for k, v in headers) > rules.max_header_bytes):
        return _not("too-many-headers")
    if lifetime.seconds <= 0 and not has_validator(headers):
        return _not("already-stale" if lifetime.source != "none" else "no-freshness")
    length = content_length(headers)
    if max_object_size is not None and length > max_object_size:
        return _not("too-large")
    keep = without_fields(stored_headers(headers), cc.fields("no-cache") + cc.fields("private"))
    return StorePlan(True, None, tuple(keep), vary, lifetime,
                     corrected_initial_age(headers, request_time, response_time), response_time, length)
