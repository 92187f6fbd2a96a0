"""Invalidation by unsafe methods (RFC 9111 §4.4)."""
from __future__ import annotations

from typing import Sequence
from urllib.parse import urljoin, urlsplit

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
    URLs must not be invalidated by this one, §4.4)."""
    origin = urlsplit(target_url)
    urls = [target_url]
    for name in ("Location", "Content-Location"):
        value = header(headers, name)
        if not value:
            continue
        url = urljoin(target_url, value.strip())
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc.lower()) == (origin.scheme, origin.netloc.lower()) and url not in urls:
            urls.append(url)
    return urls
