"""Revalidation: ask the app whether a stale entry is still good (RFC 9111 §4.3).

A revalidation is a flight like a fetch: a herd on one stale key sends one
conditional request, and its followers wait on it as on a fetch. A 304
refreshes the entry's fields and freshness in the index without touching
its blob; anything else is an ordinary leader's answer.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Iterable

from .. import policy
from ..flights import Lead
from ..index import Entry, IndexUnavailable
from ..policy import CacheStatus, RequestFacts
from ..wsgi import StartResponse, WSGIEnviron
from .context import AppResponse, Context, call_app, close_quietly, passthrough, without_conditionals
from .hit import serve_entry, serve_stale
from .leader import LeaderRun

__all__ = ["Revalidation", "revalidate_in_background"]

log = logging.getLogger("cachefetch.middleware")


def _discard(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return lambda data: None


class Revalidation:
    """One conditional request this request leads, for ``stale`` and its
    sibling ``variants``. :meth:`run` runs on the request thread, or on a
    background thread for ``stale-while-revalidate``."""

    def __init__(self, ctx: Context, lead: Lead, key: str, request: RequestFacts, environ: WSGIEnviron,
                 stale: Entry, variants: list[Entry], status: CacheStatus) -> None:
        self.ctx, self.lead, self.key, self.request = ctx, lead, key, request
        self.environ, self.stale, self.variants, self.status = environ, stale, variants, status

    def run(self, start_response: StartResponse, answer: bool = True) -> Iterable[bytes]:
        """Revalidate, and (with ``answer``) answer this client."""
        ctx = self.ctx
        fields = policy.conditional_fields(self.stale, self.variants)
        try:
            response = call_app(ctx.app, without_conditionals(self.environ, fields), ctx.clock)
        except Exception as exc:
            self.lead.fail("upstream", repr(exc))
            served = serve_stale(ctx, self.environ, start_response, self.stale, self.request) if answer else []
            if served is not None:
                return served
            raise
        if response.code == 304:
            return self._refresh(response, start_response, answer)
        return LeaderRun(ctx, self.lead, self.key, self.request, self.environ, self.stale,
                         self.status).run(response, start_response)

    def _refresh(self, response: AppResponse, start_response: StartResponse, answer: bool) -> Iterable[bytes]:
        response.close()
        ctx = self.ctx
        selected = policy.select_for_update(response.headers, self.stale, self.variants)
        if not selected:  # a 304 for none of ours: ask for the whole response
            log.info("a 304 for %r matched no stored response; fetching it whole", self.key)
            whole = call_app(ctx.app, without_conditionals(self.environ), ctx.clock)
            return LeaderRun(ctx, self.lead, self.key, self.request, self.environ, self.stale,
                             self.status).run(whole, start_response)
        ours = None
        for entry in selected:
            refreshed = self._refreshed(entry, response)
            try:
                if refreshed is None:
                    ctx.index.delete(entry.key, entry.variant)
                else:
                    ctx.index.put(refreshed)
            except IndexUnavailable:
                refreshed = None  # validated for this client, just not recorded
            if entry is self.stale:
                ours = refreshed or entry
        self.lead.refreshed(self.stale.hash.hex, self.stale.variant)
        log.info("revalidated %r: 304", self.key)
        if not answer:
            return []
        entry = ours or self.stale
        served = serve_entry(ctx, self.environ, start_response, entry,
                             self.status.with_(fwd_status=304, stored=ours is not None,
                                               ttl=policy.ttl_seconds(entry, ctx.clock())))
        if served is None:  # the blob vanished under us: answer uncached
            return passthrough(ctx, self.environ, start_response, self.status.with_(detail="blob-missing"))
        return served

    def _refreshed(self, entry: Entry, response: AppResponse) -> Entry | None:
        """``entry`` with the 304's fields and new freshness; ``None`` if no longer storable."""
        headers = policy.updated_headers(entry.headers, response.headers)
        plan = policy.plan_store(entry.status, headers, self.request, self.ctx.rules,
                                 request_time=response.request_time, response_time=response.response_time)
        if not plan.store:
            return None
        return Entry(entry.key, entry.variant, entry.hash, entry.size, entry.status, plan.headers,
                     stored_at=plan.response_time, expires_at=plan.expires_at, vary=entry.vary,
                     initial_age=plan.initial_age)


def revalidate_in_background(ctx: Context, flight: str, key: str, request: RequestFacts, environ: WSGIEnviron,
                             stale: Entry, variants: list[Entry], status: CacheStatus) -> bool:
    """Start one background revalidation of ``stale`` (``stale-while-revalidate``),
    unless one already runs for ``flight``. Returns whether this call started it."""
    try:
        lead = ctx.flights.lead(flight)
    except OSError as exc:
        log.warning("cannot revalidate %r in the background: %s", key, exc)
        return False
    if lead is None:
        return False
    environ = dict(environ)

    def work() -> None:
        body: Iterable[bytes] = []
        try:
            body = Revalidation(ctx, lead, key, request, environ, stale, variants, status).run(_discard, answer=False)
            for _ in body:  # a 200: the leader's tee stores it as we read
                pass
        except Exception:
            log.exception("background revalidation of %r failed", key)
            lead.fail("upstream", "background revalidation failed")
        finally:
            close_quietly(body)

    threading.Thread(target=work, name="cachefetch-revalidate", daemon=True).start()
    return True
