"""What a shared cache may store and for how long (RFC 9111), as pure functions.

Nothing here touches files, the app or the index: these take headers and
return decisions, so each rule can be read and tested on its own.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Mapping

from werkzeug.datastructures import RequestCacheControl, ResponseCacheControl
from werkzeug.http import parse_cache_control_header, parse_date

from .hashing import hash_bytes

__all__ = ["request_directives", "response_is_storable", "freshness_lifetime", "stored_headers",
           "vary_names", "variant_of", "header", "allows_stale"]

# RFC 9110 §7.6.1 hop-by-hop headers, plus what the cache sets itself on replay.
_NOT_STORED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "set-cookie", "set-cookie2",
    "content-length", "age", "date", "server", "cache-status",
})


def header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The values of header ``name`` joined by ``", "`` (None if absent)."""
    name = name.lower()
    values = [v for k, v in headers if k.lower() == name]
    return ", ".join(values) if values else None


def request_directives(environ: Mapping[str, Any]) -> RequestCacheControl:
    """The request's Cache-Control, with ``Pragma: no-cache`` read as ``no-cache``
    when there is no Cache-Control (RFC 9111 §5.4)."""
    cc = environ.get("HTTP_CACHE_CONTROL")
    if cc is None and "no-cache" in environ.get("HTTP_PRAGMA", "").lower():
        cc = "no-cache"
    return parse_cache_control_header(cc, cls=RequestCacheControl)


def response_directives(headers: Iterable[tuple[str, str]]) -> ResponseCacheControl:
    """The response's parsed Cache-Control."""
    return parse_cache_control_header(header(headers, "Cache-Control"), cls=ResponseCacheControl)


def response_is_storable(status: int, headers: list[tuple[str, str]], cache_statuses: Iterable[int],
                         authorized: bool) -> str | None:
    """Why a shared cache must not store this response, or ``None`` if it may.

    Not stored: a status outside ``cache_statuses``; ``Set-Cookie``;
    ``Cache-Control`` ``private``, ``no-store`` or ``no-cache`` (we cannot
    revalidate); ``Vary: *``; and, for a request with ``Authorization``, a
    response without ``public``, ``s-maxage`` or ``must-revalidate``.
    """
    if status not in cache_statuses:
        return f"status {status}"
    names = {k.lower() for k, _ in headers}
    if "set-cookie" in names or "set-cookie2" in names:
        return "set-cookie"
    cc = response_directives(headers)
    if cc.private is not None:
        return "private"
    if cc.no_store:
        return "no-store"
    if cc.no_cache is not None:
        return "no-cache"
    if "*" in vary_names(headers):
        return "vary-star"
    if authorized and not (cc.public or cc.s_maxage is not None or cc.must_revalidate):
        return "authorization"
    return None


def freshness_lifetime(headers: list[tuple[str, str]], default_ttl: float | None,
                       now: float | None = None) -> float | None:
    """Seconds the response stays fresh: ``s-maxage``, else ``max-age``, else
    ``Expires`` minus ``Date``, else ``default_ttl`` (``None``: no limit).
    An unparseable ``Expires`` means already stale (RFC 9111 §5.3)."""
    cc = response_directives(headers)
    if cc.s_maxage is not None:
        return float(cc.s_maxage)
    if cc.max_age is not None:
        return float(cc.max_age)
    expires = header(headers, "Expires")
    if expires is not None:
        when = parse_date(expires)
        if when is None:
            return 0.0
        date = parse_date(header(headers, "Date") or "")
        base = date.timestamp() if date is not None else (time.time() if now is None else now)
        return when.timestamp() - base
    return default_ttl


def allows_stale(headers: list[tuple[str, str]]) -> bool:
    """Whether a stale copy may ever be served (not with ``must-revalidate``,
    ``proxy-revalidate`` or ``s-maxage``, RFC 9111 §4.2.4/§5.2.2)."""
    cc = response_directives(headers)
    return not (cc.must_revalidate or cc.proxy_revalidate or cc.s_maxage is not None)


def stored_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The end-to-end headers to store and replay: no hop-by-hop headers (nor
    those the Connection header names), no Set-Cookie, and none the cache sets."""
    dropped = set(_NOT_STORED)
    for value in (v for k, v in headers if k.lower() == "connection"):
        dropped.update(t.strip().lower() for t in value.split(","))
    return [(k, v) for k, v in headers if k.lower() not in dropped]


def vary_names(headers: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The request header names a response varies on, lower case, sorted, unique."""
    value = header(headers, "Vary")
    if not value:
        return ()
    return tuple(sorted({n.strip().lower() for n in value.split(",") if n.strip()}))


def variant_of(environ: Mapping[str, Any], names: Iterable[str]) -> str:
    """A short stable id of the request's values of the ``names`` headers."""
    names = tuple(names)
    if not names:
        return ""
    parts = []
    for name in names:
        cgi_name = name.upper().replace("-", "_")
        if cgi_name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            cgi_name = "HTTP_" + cgi_name
        value = environ.get(cgi_name, "")
        parts.append(name + ":" + " ".join(str(value).split()))
    return hash_bytes("\n".join(parts).encode("utf-8", "surrogateescape")).hex[:32]
