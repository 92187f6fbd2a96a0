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
           "safe_query", "netloc_of", "path_under", "plain_error", "check_mount", "check_ttl", "ALL_HEADERS",
           "HOP_BY_HOP"]

#: rewrite(body, content_type, page_url) -> (body, content_type)
Rewriter = Callable[[bytes, str, str], tuple[bytes, str]]


class RouteError(Exception):
    """The request names nothing this proxy serves: ``status`` says how to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


#: Request headers never forwarded as such: hop-by-hop (RFC 9110 §7.6.1), the
#: proxy's own Host, and Accept-Encoding (the proxy always fetches ``identity``).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
ALL_HEADERS = None
"""``Route.forward`` value: every end-to-end request header goes upstream."""


@dataclass(frozen=True)
class Route:
    """Where to fetch a request's answer and how to check and label it.

    :param url: the upstream URL (always under an allowed upstream).
    :param digest: ``(algorithm, hex)`` the body must hash to, if known;
        only such routes follow upstream redirects (to allowed hosts).
    :param cache_control: replaces the upstream's Cache-Control/Expires on a
        200 (e.g. a short TTL for index pages, ``immutable`` for files).
    :param rewrite: turns the whole (small) body into what clients get.
    :param forward: request headers passed upstream; :data:`ALL_HEADERS` for
        every end-to-end one (a reverse proxy).
    :param headers: extra response headers (e.g. ``Docker-Content-Digest``);
        each replaces the upstream's field of that name.
    :param vary: request headers the answer depends on, told to clients in
        ``Vary``; the cache itself tells representations apart by ``variant``.
    :param accept: the ``Accept`` to send upstream instead of the client's.
    :param variant: the representation this request maps to (e.g. ``json``),
        part of the cache key, so clients whose ``Accept`` differ but mean
        the same share one entry.
    :param alternatives: other routes to the same resource whose stored
        answers the client also accepts, best first: served (from the cache
        only) when the upstream cannot be reached.
    :param fallback: the answer when the upstream is unreachable, times out
        or fails (5xx), instead of 502/504.
    :param also_under: given the whole body (a document), the route under
        which the same answer is also stored (OCI: a manifest by tag is
        also the manifest by its digest); ``None`` for none.
    :param shared: the protocol vouches the answer is the same for every
        client: ``Set-Cookie`` is dropped.
    """

    url: str
    digest: tuple[str, str] | None = None
    cache_control: str | None = None
    rewrite: Rewriter | None = None
    forward: tuple[str, ...] | None = ("Accept",)
    headers: tuple[tuple[str, str], ...] = ()
    vary: tuple[str, ...] = ()
    accept: str | None = None
    variant: str = ""
    alternatives: tuple["Route", ...] = ()
    fallback: "LocalAnswer | None" = None
    also_under: "Callable[[bytes], Route | None] | None" = None
    shared: bool = True

    @property
    def key(self) -> str:
        """The cache key: the exact upstream URL, plus the representation."""
        return self.url if not self.variant else f"{self.url} {self.variant}"


@dataclass(frozen=True)
class LocalAnswer:
    """A response the proxy gives itself, without the upstream."""

    status: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


class Protocol(_Protocol):
    """One registry protocol: routing, and where its upstream URLs live here.

    ``mount`` is the path prefix the protocol is served under ("" at the root).
    """

    name: str

    def route(self, path: str, environ: Mapping[str, Any]) -> Route | LocalAnswer:
        """Map a safe request path to a :class:`Route` or a :class:`LocalAnswer`.

        :raises RouteError: if the path is not served.
        """

    def local_path(self, url: str) -> str | None:
        """The path under this proxy (mount included) that fetches ``url``
        again, or ``None`` if ``url`` is not on an upstream it serves."""

    def error(self, status: int, message: str) -> tuple[str, bytes]:
        """``(content type, body)`` of a local error answer in the protocol's own shape."""


def plain_error(status: int, message: str) -> tuple[str, bytes]:
    """A local error as one line of text (the default error shape)."""
    return "text/plain; charset=utf-8", (message + "\n").encode()


def path_under(base: str, url: str, mount: str = "") -> str | None:
    """``mount`` + the part of ``url`` below ``base``, or ``None`` if it is not below it."""
    base_parts, parts = urlsplit(base), urlsplit(url)
    if (parts.scheme, parts.netloc.lower()) != (base_parts.scheme, base_parts.netloc.lower()):
        return None
    prefix = base_parts.path.rstrip("/")
    if parts.path != prefix and not parts.path.startswith(prefix + "/"):
        return None
    rest = parts.path[len(prefix):] or "/"
    return mount + rest + (f"?{parts.query}" if parts.query else "")


def check_mount(mount: str) -> str:
    """A mount prefix: ``""`` or ``/a/b`` (no trailing slash).

    :raises ValueError: otherwise.
    """
    if not isinstance(mount, str) or (mount and (not mount.startswith("/") or mount.endswith("/")
                                                 or quote(mount, safe="/-._~") != mount)):
        raise ValueError(f"a mount prefix is '' or /name[/name...] without a trailing slash, got {mount!r}")
    return mount


def check_ttl(name: str, value: object) -> int:
    """Seconds >= 0 as an int.

    :raises ValueError: otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be seconds >= 0, got {value!r}")
    return int(value)


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
    from . import generic, npm, oci, pypi

    factories: dict[str, Callable[..., Protocol]] = {
        "generic": generic.GenericProtocol,
        "pypi": pypi.PyPIProtocol,
        "npm": npm.NpmProtocol,
        "oci": oci.OCIProtocol,
    }
    if name not in factories:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(sorted(factories))}")
    return factories[name](upstream, **options)


PROTOCOLS = ("generic", "pypi", "npm", "oci")
