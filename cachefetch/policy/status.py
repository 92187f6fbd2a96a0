"""``Cache-Status`` (RFC 9211) as one typed value.

Every answer the middleware gives carries one :class:`CacheStatus`; its
``str()`` is the field value, and metrics read :attr:`CacheStatus.outcome`
instead of parsing the string back.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["CacheStatus", "CACHE_NAME", "ENVIRON_KEY"]

#: The cache's name in Cache-Status.
CACHE_NAME = "cachefetch"
#: The WSGI environ key where the middleware leaves the request's CacheStatus
#: (for the proxy's metrics and access log).
ENVIRON_KEY = "cachefetch.cache_status"


@dataclass(frozen=True)
class CacheStatus:
    """How one answer was produced.

    :param hit: served from a stored response without going forward.
    :param fwd: why the request went forward: ``miss``, ``stale``,
        ``request`` (the request's directives forced it), ``method``, ``bypass``.
    :param fwd_status: the status the next hop answered (a revalidation's 304).
    :param ttl: seconds of freshness left (negative when stale); ``None``
        when unlimited or not known.
    :param stored: the answer is being stored (or the stored one was refreshed).
    :param collapsed: the request waited on another request's fetch.
    :param detail: a short slug saying more (``stale-if-error``, ``no-cache``…).
    """

    hit: bool = False
    fwd: str | None = None
    fwd_status: int | None = None
    ttl: int | None = None
    stored: bool = False
    collapsed: bool = False
    detail: str | None = None

    def __str__(self) -> str:
        parts = [CACHE_NAME]
        if self.hit:
            parts.append("hit")
        if self.fwd is not None:
            parts.append(f"fwd={self.fwd}")
        if self.fwd_status is not None:
            parts.append(f"fwd-status={self.fwd_status}")
        if self.ttl is not None:
            parts.append(f"ttl={self.ttl}")
        if self.stored:
            parts.append("stored")
        if self.collapsed:
            parts.append("collapsed")
        if self.detail:
            parts.append(f"detail={self.detail}")
        return "; ".join(parts)

    def with_(self, **changes: object) -> "CacheStatus":
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    @property
    def outcome(self) -> str:
        """One word for metrics: ``hit``, ``stale``, ``revalidated``,
        ``collapsed``, ``miss`` or ``bypass``."""
        if self.hit:
            return "stale" if self.ttl is not None and self.ttl < 0 or (self.detail or "").startswith("stale") \
                else "hit"
        if self.fwd == "stale" and self.fwd_status == 304:
            return "revalidated"
        if self.collapsed:
            return "collapsed"
        if self.fwd in ("miss", "stale", "request"):
            return "miss"
        return "bypass"

    @staticmethod
    def header(status: "CacheStatus") -> tuple[str, str]:
        """The ``(name, value)`` pair of a response field."""
        return ("Cache-Status", str(status))
