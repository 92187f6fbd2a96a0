"""Invalidation by unsafe methods (RFC 9111 §4.4)."""
from __future__ import annotations

from typing import Sequence
from urllib.parse import SplitResult, urljoin, urlsplit

from .headers import header

__all__ = ["SAFE_METHODS", "invalidates", "invalidation_targets"]

#: RFC 9110 §9.2.1. Any other method, known or not, is unsafe.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def invalidates(method: str, status: int) -> bool:
    """Whether a response to ``method`` must invalidate stored responses:
    an unsafe method answered with a non-error status (2xx or 3xx)."""
    return method.upper() not in SAFE_METHODS and 200 <= status < 400


def invalidation_targets(target_url: str, headers: Sequence[tuple[str, str]]) -> list[str]:
    """The absolute URLs to invalidate: the target URI, and the ``Location``
    and ``Content-Location`` URLs that share its origin (another origin's
    URLs must not be invalidated by this one, §4.4).

    Origins are compared as RFC 6454 does (scheme, host, port, the scheme's
    default port when none is given), and a same-origin URL is returned
    spelled with the target's own ``scheme://authority``, so that
    ``http://example.com:80/y`` names the entry a request with
    ``Host: example.com`` stored.
    """
    parts = urlsplit(target_url)
    origin = _origin(parts)
    urls = [target_url]
    for name in ("Location", "Content-Location"):
        value = header(headers, name)
        if not value:
            continue
        other = urlsplit(urljoin(target_url, value.strip()))
        if origin is None or _origin(other) != origin:
            continue
        url = other._replace(scheme=parts.scheme, netloc=parts.netloc, fragment="").geturl()
        if url not in urls:
            urls.append(url)
    return urls


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(parts: SplitResult) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of a URL, or ``None`` if it has no usable one."""
    try:
        port = parts.port
    except ValueError:  # a port that is not a number, or out of range
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if not host or scheme not in _DEFAULT_PORTS:
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]
