"""Unsafe methods invalidate what they change (RFC 9111 §4.4; request thread)."""
from __future__ import annotations

import logging
from typing import Any, Iterable

from .. import policy
from ..logutil import warn_limited
from ..wsgi import StartResponse, WSGIEnviron
from .context import Context
from .keys import environ_for_url, request_url

__all__ = ["call_unsafe", "invalidate"]

log = logging.getLogger("cachefetch.middleware")


def call_unsafe(ctx: Context, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
    """Pass an unsafe request to the app; when it answers with a non-error
    status, invalidate the stored responses it may have changed — before the
    client sees the answer, so the client's next request cannot hit them."""
    method = environ.get("REQUEST_METHOD", "POST")

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if policy.invalidates(method, int(status[:3])):
            invalidate(ctx, environ, headers)
        return start_response(status, headers, exc_info)

    return ctx.app(environ, start)


def invalidate(ctx: Context, environ: WSGIEnviron, headers: list[tuple[str, str]]) -> int:
    """Drop every stored variant of the target URI and of its same-origin
    ``Location``/``Content-Location``; returns how many entries went."""
    gone = 0
    for url in policy.invalidation_targets(request_url(environ), headers):
        target = environ_for_url(environ, url)
        key = ctx.key(target) if target is not None else None
        if key is None:
            continue
        try:
            gone += ctx.index.delete(key)
        except Exception as exc:
            warn_limited(log, "invalidate", "could not invalidate %r: %s", key, exc)
    if gone:
        log.info("invalidated %d entries after %s %s", gone, environ.get("REQUEST_METHOD"), request_url(environ))
    return gone
