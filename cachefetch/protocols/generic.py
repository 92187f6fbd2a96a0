"""``generic``: files under an upstream base URL, mapped path for path.

Responses are immutable unless the upstream says otherwise: with no
Cache-Control or Expires of its own, a file stays fresh until evicted.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..upstream import validate_base_url
from . import Route, safe_query


class GenericProtocol:
    """``/a/b`` is fetched from ``<upstream>/a/b`` (query string kept)."""

    name = "generic"

    def __init__(self, upstream: str, **_ignored: Any) -> None:
        self.base = validate_base_url(upstream)

    def route(self, path: str, environ: Mapping[str, Any]) -> Route:
        query = safe_query(environ)
        return Route(self.base + path + (f"?{query}" if query else ""), forward=("Accept",))
