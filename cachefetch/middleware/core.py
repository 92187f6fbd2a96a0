"""CacheFetch: the WSGI middleware that caches and coalesces an app's responses.

For each GET or HEAD with a cache key, :func:`cachefetch.policy.plan_request`
decides, and this module carries the plan out through the path that owns it:

- a *hit* is served from the store (:mod:`.hit`); a plain ``GET`` for a fresh
  entry this process has served before is answered before any planning, from
  what it keeps of that answer in memory, once the index says the entry is
  still the same (:mod:`.hot`);
- a stale entry within ``stale-while-revalidate`` is served at once and
  refreshed by one background request (:mod:`.revalidation`);
- otherwise one request, the *leader*, asks the app — conditionally when the
  stale entry has validators (:mod:`.revalidation`), else for the whole
  response (:mod:`.leader`) — while requests arriving meanwhile, in any
  thread or worker on the same store, *follow* it (:mod:`.follower`).

Unsafe methods go to the app and invalidate what they change
(:mod:`.invalidation`); everything else passes straight through.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from typing import TYPE_CHECKING, Callable, Iterable

from .. import policy
from ..flights import Flights, FlightsSeam
from ..index import Index, IndexUnavailable, SQLiteIndex
from ..logutil import warn_limited
from ..policy import FOREVER, Action, CacheRules, CacheStatus, RequestFacts, RequestPlan
from ..store import CAFS
from ..stream import Committer
from ..wsgi import StartResponse, WSGIEnviron, plain_response
from . import hit
from .hot import HotTable
from .context import Context, FetchBounds, Retry, WSGIApp, call_app, passthrough, without_conditionals
from .follower import follow_flight
from .invalidation import call_unsafe
from .keys import HostKey, default_key
from .leader import LeaderRun
from .revalidation import Revalidation, revalidate_in_background

if TYPE_CHECKING:
    from ..fleet import Fleet

__all__ = ["CacheFetch", "close_all"]

log = logging.getLogger("cachefetch.middleware")

_WAIT_POLICIES = ("passthrough", "504")
# A request re-plans when the flight it followed ended without an answer for
# it; past this many times something is wrong: answer uncached.
_MAX_PLANS = 8

_instances: "weakref.WeakSet[CacheFetch]" = weakref.WeakSet()


def close_all() -> None:
    """Close every :class:`CacheFetch` of this process, finishing queued commits.

    For server hooks (gunicorn's ``worker_exit``) that cannot reach the
    middleware instance inside the framework's app object.
    """
    for instance in list(_instances):
        instance.close()


class CacheFetch:
    """Wrap a WSGI ``app`` with a content-addressed, coalescing shared cache (RFC 9111).

    :param app: the WSGI application to cache.
    :param store: a :class:`~cachefetch.store.CAFS` or a directory for one.
    :param index: where entries are recorded (the :class:`~cachefetch.index.Index`
        seam); default a :class:`~cachefetch.index.SQLiteIndex` in the store.
    :param flights: who fetches a key now (the flights seam); default
        :class:`~cachefetch.flights.Flights` in the store.
    :param fleet: a :class:`~cachefetch.fleet.Fleet` or a ``redis://`` URL:
        the index and flights become the fleet's (``index`` is then this
        host's local one), and ``/-/fleet/`` is the fleet's endpoint.
    :param key: ``environ -> str | None``: the cache key of a request, or
        ``None`` not to cache it. Default :func:`default_key`.
    :param default_ttl: freshness of a response that states none. ``None``
        (the default) follows RFC 9111: heuristic freshness from
        ``Last-Modified``, else stored only with a validator and revalidated
        before each reuse. Seconds, or ``"forever"`` (:data:`~cachefetch.policy.FOREVER`)
        for content that never changes at its URL.
    :param heuristic_max: the cap on heuristic freshness, seconds.
    :param targeted_fields: targeted cache-control fields obeyed before
        ``Cache-Control`` (RFC 9213), in precedence order; ``()`` for none.
    :param wait_timeout: seconds a follower waits for its first byte.
    :param on_wait_timeout: what a follower does then: ``"passthrough"``
        (call the app itself, without caching) or ``"504"``.
    :param max_object_size: bytes past which a response is not stored (it is
        still streamed to its client); ``None`` for no limit.
    :param cache_statuses: the response statuses that may be stored; ``None``
        (default) for the RFC's: the heuristically cacheable ones, and any
        final status with explicit freshness. 206 is never stored.
    :param stale_if_error: seconds past expiry during which a stale entry is
        served when the app raises or answers 5xx (a response's own
        ``stale-if-error`` overrides it); ``None`` never.
    :param hosts: the host names this deployment answers to (like Django's
        ``ALLOWED_HOSTS``); requests for others are not cached. ``None``: any
        valid host (a ``Host`` that is not a plain host and port is never cached).
    :param cookies: ``"respect"`` (default): a request carrying ``Cookie`` is
        served from and stored in the cache only where the response is
        ``public`` or varies on ``Cookie``; ``"ignore"`` for apps whose pages
        never depend on cookies.
    :param fetch_timeout: seconds a fetch may take in all, whoever reads it
        (past it, nothing is stored and its clients are cut); ``None``: no limit.
    :param idle_timeout: seconds a fetch may go without a byte from the app.
    :param max_detached: fetches no client reads any more that one process
        keeps going for the cache; past it, such a fetch is abandoned.
    :param memory_cache_bytes: bytes of fresh hits each process keeps built in
        memory (fields, and the body of small ones), answered without planning
        when a request needs no judgement (a plain ``GET``); checked against
        the index on every use, so never older than it. ``0`` disables it.
        Each worker process holds its own.
    :param memory_object_size: the largest body kept there; larger hits keep
        only their fields and are sent from the store.
    :param cache_status: whether answers carry a ``Cache-Status`` field (RFC
        9211). It tells any client whether the cache held a URL, so whether
        someone asked for it lately (RFC 9211 §6); ``False`` keeps it out of
        responses. Either way it is left in the environ
        (``cachefetch.cache_status``) for logs and metrics.
    :param fsync: passed to the CAFS when ``store`` is a path.
    :param clock: the wall clock (epoch seconds) freshness is judged by.
    :raises ValueError, TypeError: on an invalid option, at construction.
    """

    def __init__(self, app: WSGIApp, store: CAFS | str | os.PathLike[str], *,
                 index: Index | None = None,
                 flights: FlightsSeam | None = None,
                 fleet: "Fleet | str | None" = None,
                 key: Callable[[WSGIEnviron], str | None] | None = None,
                 default_ttl: float | str | None = None,
                 heuristic_max: float = 86400.0,
                 targeted_fields: Iterable[str] = ("CDN-Cache-Control",),
                 wait_timeout: float = 30.0,
                 on_wait_timeout: str = "passthrough",
                 max_object_size: int | None = None,
                 cache_statuses: Iterable[int] | None = None,
                 stale_if_error: float | None = None,
                 hosts: Iterable[str] | None = None,
                 cookies: str = "respect",
                 fetch_timeout: float | None = 3600.0,
                 idle_timeout: float | None = 60.0,
                 max_detached: int = 64,
                 memory_cache_bytes: int = 16 << 20,
                 memory_object_size: int = 64 << 10,
                 cache_status: bool = True,
                 fsync: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        if not callable(app):
            raise TypeError("app must be a WSGI callable")
        if not callable(clock):
            raise TypeError("clock must be a callable returning epoch seconds")
        if key is not None and not callable(key):
            raise TypeError("key must be a callable environ -> str | None")
        if default_ttl == "forever":
            default_ttl = FOREVER
        _check_amount("default_ttl", default_ttl, allow_none=True)
        _check_amount("heuristic_max", heuristic_max)
        _check_amount("wait_timeout", wait_timeout)
        if on_wait_timeout not in _WAIT_POLICIES:
            raise ValueError(f"on_wait_timeout must be one of {_WAIT_POLICIES}, got {on_wait_timeout!r}")
        _check_amount("max_object_size", max_object_size, allow_none=True, integer=True)
        statuses = None if cache_statuses is None else tuple(cache_statuses)
        if statuses is not None and (not statuses or not all(
                isinstance(s, int) and not isinstance(s, bool) and 200 <= s <= 599 and s != 206 for s in statuses)):
            raise ValueError(f"cache_statuses must be HTTP statuses 200-599 other than 206, got {statuses!r}")
        fields = tuple(targeted_fields) if not isinstance(targeted_fields, str) else None
        if fields is None or not all(isinstance(f, str) and f.strip() and ":" not in f for f in fields):
            raise ValueError(f"targeted_fields must be field names, got {targeted_fields!r}")
        _check_amount("stale_if_error", stale_if_error, allow_none=True)
        for name, bound in (("fetch_timeout", fetch_timeout), ("idle_timeout", idle_timeout)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0):
                raise ValueError(f"{name} must be seconds > 0 or None, got {bound!r}")
        if isinstance(max_detached, bool) or not isinstance(max_detached, int) or max_detached < 0:
            raise ValueError(f"max_detached must be an int >= 0, got {max_detached!r}")
        _check_amount("memory_cache_bytes", memory_cache_bytes, integer=True)
        _check_amount("memory_object_size", memory_object_size, integer=True)
        if not isinstance(cache_status, bool):
            raise TypeError(f"cache_status must be True or False, got {cache_status!r}")
        if cookies not in ("respect", "ignore"):
            raise ValueError(f'cookies must be "respect" or "ignore", got {cookies!r}')
        if index is not None and not all(callable(getattr(index, m, None))
                                         for m in ("get", "put", "delete", "touch_many", "close")):
            raise TypeError(f"index must implement cachefetch.index.Index, not {type(index).__name__}")
        if isinstance(store, CAFS):
            self.store = store
        elif isinstance(store, (str, os.PathLike)):
            self.store = CAFS(store, fsync=fsync)
        else:
            raise TypeError(f"store must be a CAFS or a path, not {type(store).__name__}")
        self.app = app
        self.fleet_endpoint = None
        if fleet is not None:
            from ..fleet import as_fleet

            member = as_fleet(fleet).attach(self.store, index)
            index, flights, self.fleet_endpoint = member.index, flights or member.flights, member.endpoint
        self.index: Index = index if index is not None else SQLiteIndex(self.store.layout.index_path)
        self.flights = flights if flights is not None else Flights(self.store.layout)
        self.committer = Committer(self.store)
        self.rules = CacheRules(cache_statuses=None if statuses is None else frozenset(statuses),
                                default_ttl=default_ttl, heuristic_max=float(heuristic_max),
                                targeted_fields=tuple(f.strip().lower() for f in fields),
                                stale_if_error=stale_if_error, cookies=cookies)
        self.key = key or default_key
        if hosts is not None:
            self.key = HostKey(hosts, self.key)
        self.wait_timeout = float(wait_timeout)
        self.uses = hit.UseRecorder(self.index, clock)
        self._ctx = Context(app, self.store, self.index, self.flights, self.committer, self.rules, self.key,
                            clock, self.wait_timeout, on_wait_timeout, max_object_size, self.uses,
                            FetchBounds(fetch_timeout, idle_timeout, max_detached), cache_status)
        self.hot = HotTable(self.index, self.store, self.rules, clock, self.uses, memory_cache_bytes,
                            memory_object_size, cache_status)
        _instances.add(self)

    def close(self) -> None:
        """Finish pending commits and release the index (call when the worker stops)."""
        self.committer.shutdown(wait=True)
        self.uses.flush()
        self.index.close()

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        if self.fleet_endpoint is not None and environ.get("PATH_INFO", "").startswith("/-/fleet/"):
            return self.fleet_endpoint(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            if method.upper() in policy.SAFE_METHODS:
                return self.app(environ, start_response)
            return call_unsafe(self._ctx, environ, start_response)
        key = self.key(environ)
        if key is None:
            return self.app(environ, start_response)
        if not isinstance(key, str):
            raise TypeError(f"the key function returned {type(key).__name__}, not str or None")
        served = self.hot.serve(environ, start_response, key)
        if served is not None:
            return served
        request = policy.read_request(environ)
        deadline = time.monotonic() + self.wait_timeout
        flight, refreshed = None, False
        for _ in range(_MAX_PLANS):
            try:
                entries = self.index.get(key)
            except IndexUnavailable:  # the store is unusable now: answer, just do not cache
                return passthrough(self._ctx, environ, start_response,
                                   CacheStatus(fwd="miss", detail="store-unavailable"))
            entry = hit.matching(entries, environ)
            if entry is not None and not policy.shareable(entry, request, self.rules):
                entry = None
            if refreshed and entry is not None:  # we waited on its revalidation: it is good now
                served = hit.serve_entry(self._ctx, environ, start_response, entry,
                                         CacheStatus(fwd="stale", fwd_status=304, collapsed=True))
                if served is not None:
                    return served
            plan = policy.plan_request(request, entry, self._ctx.clock(), self.rules)
            if plan.action is Action.BYPASS:
                return passthrough(self._ctx, environ, start_response, plan.status)
            if plan.action is Action.GATEWAY_TIMEOUT:
                return plain_response(self._ctx.respond(environ, start_response, plan.status), "504 Gateway Timeout",
                                      "only-if-cached: nothing usable is stored")
            if plan.action in (Action.HIT, Action.STALE_HIT):
                if plan.action is Action.STALE_HIT:
                    revalidate_in_background(self._ctx, _flight_of(key, environ, entries), key, request,
                                             environ, plan.entry, entries, CacheStatus(fwd="stale"))
                served = hit.serve_entry(self._ctx, environ, start_response, plan.entry, plan.status)
                if served is not None:
                    self.hot.learn(environ, plan.entry)
                    return served
                continue  # its blob was gone (the entry is dropped): plan again
            flight = flight or _flight_of(key, environ, entries)
            try:
                return self._forward(environ, start_response, key, flight, request, plan, entries, deadline)
            except Retry as retry:
                if retry.flight is not None and retry.flight != flight:
                    flight = retry.flight
                elif (method == "HEAD" and not retry.settled) or retry.flight is not None:
                    break  # a HEAD cannot lead, so cannot clear a dead leader's journal
                refreshed = retry.refreshed
        return passthrough(self._ctx, environ, start_response, CacheStatus(fwd="miss"))

    def _forward(self, environ: WSGIEnviron, start_response: StartResponse, key: str, flight: str,
                 request: RequestFacts, plan: RequestPlan, entries: list, deadline: float) -> Iterable[bytes]:
        """Lead the flight (revalidate or fetch), or follow whoever leads it.

        :raises Retry: when the request must be planned again.
        """
        ctx = self._ctx
        head_request = environ.get("REQUEST_METHOD") == "HEAD"
        try:  # a HEAD never stores a body, so it never leads
            lead = None if head_request else self.flights.lead(flight)
            follow = None if lead is not None or request.authorized else self.flights.follow(flight)
        except OSError as exc:  # e.g. a full disk: serve, just do not cache
            warn_limited(log, "flights", "cannot coordinate fetches (%r): %s", self.flights, exc)
            return passthrough(ctx, environ, start_response, plan.status.with_(detail="store-unavailable"))
        if lead is not None:
            try:
                now_entries = self.index.get(key)
            except IndexUnavailable:
                lead.release()
                return passthrough(ctx, environ, start_response, plan.status.with_(detail="store-unavailable"))
            right_flight = _flight_of(key, environ, now_entries)
            if right_flight != flight and flight == _flight_of(key, environ, []):
                # A variant was stored since we planned without one: the resource
                # varies, and this request's own variant is fetched under its own
                # flight, where the next request for that variant looks. (Never
                # the other way: a variant's flight chosen from a leader's head is
                # right before any variant is in the index.)
                lead.release()
                raise Retry(right_flight)
            now_entry = hit.matching(now_entries, environ)
            if now_entry is not None and now_entry != plan.entry:  # committed or refreshed since we looked
                replan = policy.plan_request(request, now_entry, ctx.clock(), self.rules)
                if replan.action is Action.HIT and policy.shareable(now_entry, request, self.rules):
                    lead.release()
                    served = hit.serve_entry(ctx, environ, start_response, now_entry, replan.status)
                    if served is not None:
                        return served
                    lead = self.flights.lead(flight)
                    if lead is None:
                        raise Retry()
            try:
                if plan.action is Action.REVALIDATE:
                    return Revalidation(ctx, lead, key, request, environ, plan.entry, entries,
                                        plan.status).run(start_response)
                return self._lead(environ, start_response, lead, key, request, plan)
            except BaseException as exc:  # whatever went wrong, followers must not wait on us
                lead.fail("upstream", repr(exc))
                raise
        if follow is None:
            if head_request or request.authorized:  # cannot lead: look once more, then go to the app
                try:
                    entry = hit.matching(self.index.get(key), environ)
                except IndexUnavailable:
                    entry = None
                replan = policy.plan_request(request, entry, ctx.clock(), self.rules)
                if replan.action is Action.HIT and policy.shareable(entry, request, self.rules):
                    served = hit.serve_entry(ctx, environ, start_response, entry, replan.status)
                    if served is not None:  # an empty list (a HEAD) is an answer too
                        return served
                return passthrough(ctx, environ, start_response, plan.status)
            raise Retry()  # the flight ended between our two calls: look again
        return follow_flight(ctx, environ, start_response, follow, deadline, key, request, plan.entry, plan.status)

    def _lead(self, environ: WSGIEnviron, start_response: StartResponse, lead, key: str, request: RequestFacts,
              plan: RequestPlan) -> Iterable[bytes]:
        ctx = self._ctx
        try:
            response = call_app(ctx.app, without_conditionals(environ), ctx.clock)
        except Exception as exc:
            lead.fail("upstream", repr(exc))
            served = hit.serve_stale(ctx, environ, start_response, plan.entry, request)
            if served is not None:
                return served
            raise
        return LeaderRun(ctx, lead, key, request, environ, plan.entry, plan.status).run(response, start_response)


def _flight_of(key: str, environ: WSGIEnviron, entries: list) -> str:
    """The flight key of a request: its key and its variant of what the resource varies on."""
    vary = entries[0].vary if entries else ()
    return key + "\n" + policy.variant_of(environ, vary)


def _check_amount(name: str, value: object, *, allow_none: bool = False, integer: bool = False) -> None:
    """Seconds (or, with ``integer``, bytes) >= 0: no bool, no NaN, no infinity for bytes."""
    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value >= 0:  # NaN fails >= 0
        unit = "bytes" if integer else "seconds"
        raise ValueError(f"{name} must be {unit} >= 0{' or None' if allow_none else ''}, got {value!r}")
