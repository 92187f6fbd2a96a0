"""Cache keys: which stored resource a request names."""
from __future__ import annotations

import functools
import re
from typing import Iterable
from urllib.parse import quote, unquote, urlsplit

from ..wsgi import WSGIEnviron

__all__ = ["default_key", "request_url", "environ_for_url", "valid_host", "HostKey"]

_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# A DNS name (underscores allowed: internal names use them), an IPv4 address
# or a bracketed IPv6 literal, and an optional port: nothing else may reach a key.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = re.compile(rf"(?P<name>{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{{1,5}}))?")


@functools.lru_cache(maxsize=1024)
def valid_host(value: str) -> bool:
    """Whether ``value`` is a host (and optional port) fit for a cache key."""
    m = _HOST.fullmatch(value)
    return m is not None and len(value) <= 255 and (m.group("port") is None or int(m.group("port")) <= 65535)


def _host_of(environ: WSGIEnviron) -> str:
    host = environ.get("HTTP_HOST")
    if not host:
        host = f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
    return host


def _parts(environ: WSGIEnviron) -> tuple[str, str, str, str]:
    """``(scheme, host, path, query)`` of the request, the path still decoded."""
    return (environ.get("wsgi.url_scheme", "http"), _host_of(environ),
            environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))


def request_url(environ: WSGIEnviron) -> str:
    """``scheme://host/path?query`` of the request: the same for every method.

    The path is percent-encoded again from the decoded ``PATH_INFO``, so
    ``/a%20b`` and ``/a b`` are one URL; the query is kept as sent.
    """
    return _url_of(*_parts(environ))


def _url_of(scheme: str, host: str, path: str, query: str) -> str:
    return f"{scheme}://{host.lower()}{_quoted(path)}" + (f"?{query}" if query else "")


@functools.lru_cache(maxsize=4096)
def _quoted(path: str) -> str:
    """The decoded WSGI path percent-encoded again (hot paths are quoted once)."""
    return quote(path.encode("latin-1", "replace"), safe=_PATH_SAFE)


def default_key(environ: WSGIEnviron) -> str | None:
    """The default cache key: :func:`request_url`, or ``None`` (not cached)
    when the ``Host`` is not a plain host and port: a ``Host`` carrying a path
    would otherwise store its answer under another URL's key."""
    return _key_of(*_parts(environ))


@functools.lru_cache(maxsize=4096)
def _key_of(scheme: str, host: str, path: str, query: str) -> str | None:
    """:func:`default_key` of its parts (every hit computes its key: a hot one is looked up, not rebuilt)."""
    return _url_of(scheme, host, path, query) if valid_host(host) else None


class HostKey:
    """A key function that caches only requests for ``hosts`` (names, any
    port; like Django's ``ALLOWED_HOSTS``): others pass through uncached.

    :raises ValueError: if a name is not a valid host.
    """

    def __init__(self, hosts: Iterable[str], key=default_key) -> None:
        names = [h.strip().lower().rstrip(".") for h in ([hosts] if isinstance(hosts, str) else hosts)]
        if not names or not all(valid_host(n) and _HOST.fullmatch(n).group("port") is None for n in names):
            raise ValueError(f"hosts must be host names without ports, got {hosts!r}")
        self.hosts = frozenset(names)
        self.key = key

    def __call__(self, environ: WSGIEnviron) -> str | None:
        host = _host_of(environ)
        m = _HOST.fullmatch(host)
        if m is None or m.group("name").lower().rstrip(".") not in self.hosts:
            return None
        return self.key(environ)


def environ_for_url(environ: WSGIEnviron, url: str) -> WSGIEnviron | None:
    """A GET environ like ``environ`` but for ``url`` (same origin), so a key
    function can say which key that URL has; ``None`` if the URL's path is
    not under the app's ``SCRIPT_NAME``."""
    parts = urlsplit(url)
    path = unquote(parts.path, encoding="latin-1")
    script = environ.get("SCRIPT_NAME", "")
    if script and not path.startswith(script):
        return None
    other = {k: v for k, v in environ.items() if not k.startswith("HTTP_IF_") and k != "HTTP_RANGE"}
    other.update(REQUEST_METHOD="GET", PATH_INFO=path[len(script):], QUERY_STRING=parts.query,
                 HTTP_HOST=parts.netloc, CONTENT_LENGTH="")
    return other
