"""What to do with a request, given what is stored (RFC 9111 §4, §5.2.1; RFC 5861): a :class:`RequestPlan`."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from .directives import Directives, parse_cache_control
from .freshness import FOREVER, CacheRules, allows_stale, response_directives
from .headers import has_validator, vary_names
from .status import CacheStatus

__all__ = ["ttl_seconds", "cookie_matters", "RequestFacts", "read_request", "Action", "RequestPlan", "plan_request", "StoredResponse",
           "shareable", "stale_if_error_allows"]


class StoredResponse(Protocol):
    """What the rules read of a stored response (an :class:`~cachefetch.index.Entry`)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    stored_at: float

    def age(self, now: float) -> float: ...
    def ttl(self, now: float) -> float | None: ...


@dataclass(frozen=True)
class RequestFacts:
    """What the rules need of a request.

    :param method: the request method.
    :param directives: its Cache-Control (``Pragma: no-cache`` read as
        ``no-cache`` when there is none, RFC 9111 §5.4).
    :param authorized: it carries ``Authorization``.
    :param has_body: it carries a body (Content-Length > 0 or Transfer-Encoding).
    :param has_cookie: it carries ``Cookie``.
    """

    method: str = "GET"
    directives: Directives = Directives()
    authorized: bool = False
    has_body: bool = False
    has_cookie: bool = False

    @property
    def no_cache(self) -> bool:
        return "no-cache" in self.directives


def read_request(environ: Mapping[str, Any]) -> RequestFacts:
    """The :class:`RequestFacts` of a WSGI request."""
    cc = environ.get("HTTP_CACHE_CONTROL")
    if cc is None and "no-cache" in environ.get("HTTP_PRAGMA", "").lower():
        cc = "no-cache"
    length = str(environ.get("CONTENT_LENGTH") or "").strip()
    has_body = bool(environ.get("HTTP_TRANSFER_ENCODING")) or (length not in ("", "0"))
    return RequestFacts(environ.get("REQUEST_METHOD", "GET"), parse_cache_control(cc),
                        "HTTP_AUTHORIZATION" in environ, has_body, bool(environ.get("HTTP_COOKIE")))


class Action(enum.Enum):
    """What the middleware does with a request."""

    BYPASS = "bypass"            #: straight to the app, nothing stored or served from the cache
    HIT = "hit"                  #: serve the stored response
    STALE_HIT = "stale-hit"      #: serve the stale response now, revalidate it in the background
    REVALIDATE = "revalidate"    #: ask the origin whether the stored response is still good
    MISS = "miss"                #: fetch (and maybe store) a new response
    GATEWAY_TIMEOUT = "504"      #: ``only-if-cached`` and nothing usable is stored


@dataclass(frozen=True)
class RequestPlan:
    """A decision about one request.

    :param action: what to do.
    :param status: the ``Cache-Status`` to answer with (for forwarded
        requests, what the fetch will refine).
    :param entry: the stored response to serve (HIT, STALE_HIT), to
        revalidate (REVALIDATE), or to fall back on if the origin fails (MISS).
    :param why: a slug, for logs and ``detail``.
    """

    action: Action
    status: CacheStatus
    entry: Any = None
    why: str = ""


def shareable(entry: StoredResponse, request: RequestFacts, rules: CacheRules) -> bool:
    """Whether ``entry`` may answer this request: with ``Authorization`` only
    if marked ``public``, ``s-maxage`` or ``must-revalidate`` (RFC 9111 §3.5);
    with ``Cookie`` (unless ``rules.cookies == "ignore"``) only if ``public``
    or varying on ``Cookie``."""
    if not (request.authorized or cookie_matters(request, rules)):
        return True
    cc, _ = response_directives(entry.headers, rules.targeted_fields)
    if request.authorized and not (cc.public or "s-maxage" in cc or cc.must_revalidate):
        return False
    return not cookie_matters(request, rules) or cc.public or "cookie" in vary_names(entry.headers)


def cookie_matters(request: RequestFacts, rules: CacheRules) -> bool:
    """Whether the request's ``Cookie`` keeps it from the shared cache unless
    a response says otherwise: Varnish's rule, since a page may depend on a
    cookie without saying so (``Vary: Cookie``)."""
    return request.has_cookie and rules.cookies != "ignore"


def ttl_seconds(entry: StoredResponse, now: float) -> int | None:
    """Whole seconds of freshness left, as ``Cache-Status: ttl`` shows it; ``None`` if unlimited."""
    ttl = entry.ttl(now)
    return None if ttl is None or ttl == FOREVER else int(ttl)


def plan_request(request: RequestFacts, entry: StoredResponse | None, now: float, rules: CacheRules) -> RequestPlan:
    """Decide how to answer a GET/HEAD, given the stored response matching its
    variant (``None`` if none).

    In order: ``no-store`` or a body → BYPASS; nothing stored → MISS (504 with
    ``only-if-cached``); fresh and acceptable to the request (its
    ``max-age``, ``min-fresh``, ``no-cache``; the response's ``no-cache``) →
    HIT; stale but within the request's ``max-stale`` → HIT; stale within
    the response's ``stale-while-revalidate`` → STALE_HIT; else REVALIDATE
    when there is a validator, MISS otherwise.
    """
    d = request.directives
    if d.no_store or request.has_body:
        return RequestPlan(Action.BYPASS, CacheStatus(fwd="request" if d.no_store else "bypass",
                                                      detail=None if d.no_store else "request-body"),
                           why="no-store" if d.no_store else "request-body")
    if entry is None:
        if d.only_if_cached:
            return RequestPlan(Action.GATEWAY_TIMEOUT, CacheStatus(detail="only-if-cached"), why="only-if-cached")
        return RequestPlan(Action.MISS, CacheStatus(fwd="miss"), why="miss")
    cc, _ = response_directives(entry.headers, rules.targeted_fields)
    ttl = entry.ttl(now)
    age = entry.age(now)
    fresh = ttl is None or ttl > 0
    acceptable = (not request.no_cache and not cc.no_cache
                  and (d.max_age is None or age <= d.max_age)
                  and (d.min_fresh is None or ttl is None or ttl >= d.min_fresh))
    if fresh and acceptable:
        return RequestPlan(Action.HIT, CacheStatus(hit=True, ttl=ttl_seconds(entry, now)), entry, "fresh")
    stale_for = 0.0 if fresh else -float(ttl)
    if not fresh and not request.no_cache and allows_stale(cc):
        if d.max_stale is not None and stale_for <= d.max_stale and (d.max_age is None or age <= d.max_age):
            return RequestPlan(Action.HIT, CacheStatus(hit=True, ttl=ttl_seconds(entry, now), detail="max-stale"),
                               entry, "max-stale")
        swr = cc.stale_while_revalidate
        if swr is not None and stale_for <= swr and not d.only_if_cached:
            return RequestPlan(Action.STALE_HIT, CacheStatus(hit=True, ttl=ttl_seconds(entry, now),
                                                             detail="stale-while-revalidate"), entry, "swr")
    if d.only_if_cached:
        return RequestPlan(Action.GATEWAY_TIMEOUT, CacheStatus(detail="only-if-cached"), entry, "only-if-cached")
    forward = "request" if request.no_cache or (fresh and not acceptable and not cc.no_cache) else "stale"
    if has_validator(entry.headers):
        return RequestPlan(Action.REVALIDATE, CacheStatus(fwd=forward), entry, "revalidate")
    return RequestPlan(Action.MISS, CacheStatus(fwd=forward), entry, "refetch")


def stale_if_error_allows(entry: StoredResponse, request: RequestFacts, now: float, rules: CacheRules) -> bool:
    """Whether ``entry`` may be served because the origin failed (RFC 5861
    ``stale-if-error``, the response's or the request's, else the deployment's
    ``rules.stale_if_error``); never past ``no-cache``, ``must-revalidate``,
    ``proxy-revalidate`` or ``s-maxage``."""
    cc, _ = response_directives(entry.headers, rules.targeted_fields)
    if not allows_stale(cc):
        return False
    window = request.directives.stale_if_error
    if window is None:
        window = cc.stale_if_error
    if window is None:
        window = rules.stale_if_error
    if window is None:
        return False
    ttl = entry.ttl(now)
    return ttl is None or -ttl <= window
