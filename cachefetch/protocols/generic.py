"""``generic``: a reverse proxy for any HTTP origin, mapped path for path.

Every end-to-end request header goes upstream, and the origin's own
Cache-Control, validators and Vary decide what is stored and for how long
(RFC 9111; the proxy's ``--default-ttl`` for origins that state nothing).
"""
from __future__ import annotations

from typing import Any, Mapping

from ..upstream import validate_base_url
from . import ALL_HEADERS, Route, check_mount, path_under, plain_error, safe_query


class GenericProtocol:
    """``/a/b`` is fetched from ``<upstream>/a/b`` (query string kept).

    :param mount: the path prefix it is served under (``""``: the root).
    :raises ValueError: on a bad URL or mount.
    """

    name = "generic"

    def __init__(self, upstream: str, mount: str = "", **_ignored: Any) -> None:
        self.base = validate_base_url(upstream)
        self.mount = check_mount(mount)

    def route(self, path: str, environ: Mapping[str, Any]) -> Route:
        query = safe_query(environ)
        return Route(self.base + path + (f"?{query}" if query else ""), forward=ALL_HEADERS, shared=False)

    def local_path(self, url: str) -> str | None:
        return path_under(self.base, url, self.mount)

    error = staticmethod(plain_error)
