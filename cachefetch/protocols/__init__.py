"""What a proxy protocol decides: where a request goes upstream, what digest
its body must have, and how long it stays fresh.

Each protocol is a module with a class implementing :class:`Protocol`;
:func:`make_protocol` picks one by name. Adding one touches only its module
and the ``PROTOCOLS`` table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol as _Protocol
from urllib.parse import quote, urlsplit

__all__ = ["Route", "LocalAnswer", "Protocol", "RouteError", "make_protocol", "PROTOCOLS", "safe_path",
           "safe_query", "netloc_of"]

#: rewrite(body, content_type, page_url) -> (body, content_type)
Rewriter = Callable[[bytes, str, str], tuple[bytes, str]]


class RouteError(Exception):
    """The request names nothing this proxy serves: ``status`` says how to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Route:
    """Where to fetch a request's answer and how to check and label it.

    :param url: the upstream URL (always under an allowed upstream).
    :param digest: ``(algorithm, hex)`` the body must hash to, if known.
    :param cache_control: replaces the upstream's Cache-Control/Expires on a
        200 (e.g. a short TTL for index pages, ``immutable`` for files).
    :param rewrite: turns the whole (small) body into what clients get.
    :param forward: request headers passed upstream.
    :param headers: extra response headers (e.g. ``Docker-Content-Digest``).
    :param vary: request headers the answer depends on (added to ``Vary``).
    :param accept: the ``Accept`` to send upstream instead of the client's.
    :param fallback: the answer when the upstream is unreachable, times out
        or fails (5xx), instead of 502/504.
    """

    url: str
    digest: tuple[str, str] | None = None
    cache_control: str | None = None
    rewrite: Rewriter | None = None
    forward: tuple[str, ...] = ("Accept",)
    headers: tuple[tuple[str, str], ...] = ()
    vary: tuple[str, ...] = ()
    accept: str | None = None
    fallback: "LocalAnswer | None" = None


@dataclass(frozen=True)
class LocalAnswer:
    """A response the proxy gives itself, without the upstream."""

    status: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


class Protocol(_Protocol):
    name: str

    def route(self, path: str, environ: Mapping[str, Any]) -> Route | LocalAnswer:
        """Map a safe request path to a :class:`Route` or a :class:`LocalAnswer`.

        :raises RouteError: if the path is not served.
        """


def safe_path(environ: Mapping[str, Any]) -> str:
    """The request path, percent-encoded again, once proven harmless.

    WSGI servers give ``PATH_INFO`` percent-decoded, so ``%2e%2e`` is ``..``
    here: dot segments (and disguises such as ``..;x``), NUL and other control
    characters, and backslashes are refused, so no path can climb out of the
    upstream prefix it is joined to.

    :raises RouteError: (400) for any of those.
    """
    raw = environ.get("PATH_INFO", "") or "/"
    try:
        path = raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise RouteError(400, "the path is not UTF-8") from None
    if not path.startswith("/"):
        raise RouteError(400, "the path must start with /")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path) or "\\" in path:
        raise RouteError(400, "control characters or backslashes in the path")
    if any(_dot_segment(s) for s in path.split("/")):
        raise RouteError(400, "dot segments in the path")
    return quote(path, safe="/:@!$&'()*+,;=-._~")


def _dot_segment(segment: str) -> bool:
    """``.``, ``..`` and the disguises some origins resolve as them: ``...``,
    ``..;param`` (Tomcat and Spring drop path parameters), ``.. `` (trimmed)."""
    head = segment.split(";", 1)[0].strip()
    return head != "" and head.strip(".") == ""


def safe_query(environ: Mapping[str, Any]) -> str:
    """The raw query string, refused (400) if it holds spaces or control characters."""
    query = environ.get("QUERY_STRING", "")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in query):
        raise RouteError(400, "the query string must be percent-encoded")
    return query


def netloc_of(url: str) -> str:
    """``host[:port]`` of a URL, lower case."""
    return urlsplit(url).netloc.lower()


def make_protocol(name: str, upstream: str, **options: Any) -> Protocol:
    """Build the protocol ``name`` for ``upstream``.

    :raises ValueError: for an unknown name or bad options.
    """
    from . import generic, oci, pypi

    factories: dict[str, Callable[..., Protocol]] = {
        "generic": generic.GenericProtocol,
        "pypi": pypi.PyPIProtocol,
        "oci": oci.OCIProtocol,
    }
    if name not in factories:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(sorted(factories))}")
    return factories[name](upstream, **options)


PROTOCOLS = ("generic", "pypi", "oci")
