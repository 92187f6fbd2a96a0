"""A pull-through caching proxy: a streaming forwarder wrapped in CacheFetch.

The forwarder only fetches: hits, misses, coalescing and follower streaming
are the middleware's. What it adds is the protocol's routing and checks:

- upstream 404 -> 404, negatively cached for ``negative_ttl`` seconds;
  other 4xx passed through (not cached); 5xx and connection errors -> 502;
  timeouts -> 504; each with a short plain-text body saying what failed;
- a body whose digest the protocol knows is hashed as it passes, and its
  last chunk is held back until the digest matches: on a mismatch the
  connection drops, so no client gets a complete body that fails
  verification, and nothing is stored.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Iterable, Iterator
from urllib.parse import urljoin

from . import metrics, policy
from .index import SQLiteIndex
from .middleware import CacheFetch
from .policy import FOREVER
from .protocols import LocalAnswer, Route, RouteError, make_protocol, netloc_of, safe_path
from .wsgi import StartResponse, WSGIEnviron, plain_response, status_line
from .store import CAFS
from .upstream import (Upstream, UpstreamError, UpstreamTimeout)

__all__ = ["create_app", "Forwarder", "DigestMismatch", "path_key"]

log = logging.getLogger("cachefetch.proxy")

_DROP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                   "upgrade", "set-cookie", "set-cookie2", "server", "date", "via", "alt-svc", "age"})
_DOCUMENT_LIMIT = 64 << 20
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


class DigestMismatch(UpstreamError):
    """The upstream's body does not hash to the digest the protocol expects."""


def verified(chunks: Iterable[bytes], algorithm: str, expected: str) -> Iterator[bytes]:
    """Yield ``chunks``, holding the last back until their digest is ``expected``.

    :raises DigestMismatch: at the end, instead of the last chunk.
    """
    hasher = hashlib.new(algorithm)
    held = None
    for chunk in chunks:
        hasher.update(chunk)
        if held is not None:
            yield held
        held = chunk
    actual = hasher.hexdigest()
    if actual != expected:
        metrics.VERIFY_FAILURES.inc()
        raise DigestMismatch(f"{algorithm} of the body is {actual}, expected {expected}")
    if held is not None:
        yield held


def _counted(chunks: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        metrics.UPSTREAM_BYTES.inc(len(chunk))
        yield chunk


class Forwarder:
    """The WSGI app under the cache: fetch the routed upstream URL, stream it back.

    :param protocol: a :class:`~cachefetch.protocols.Protocol`.
    :param upstream: the :class:`~cachefetch.upstream.Upstream` client.
    :param negative_ttl: seconds an upstream 404 is cached.
    """

    def __init__(self, protocol: Any, upstream: Upstream, negative_ttl: float = 60) -> None:
        if negative_ttl < 0:
            raise ValueError("negative_ttl must be >= 0")
        self.protocol = protocol
        self.upstream = upstream
        self.negative_ttl = int(negative_ttl)

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return plain_response(start_response, "405 Method Not Allowed", "this proxy is read-only",
                                  [("Allow", "GET, HEAD")])
        try:
            route = self.protocol.route(safe_path(environ), environ)
        except RouteError as exc:
            # Refusals cost nothing to repeat: storing them would let any
            # client fill the store with junk paths.
            return plain_response(start_response, status_line(exc.status), str(exc), [("Cache-Control", "no-store")])
        if isinstance(route, LocalAnswer):
            return _answer(start_response, route, method)
        return self._forward(environ, start_response, route, method)

    def _forward(self, environ: WSGIEnviron, start_response: StartResponse, route: Route,
                 method: str) -> Iterable[bytes]:
        send = {}
        for name in route.forward:
            value = environ.get("HTTP_" + name.upper().replace("-", "_"))
            if value is not None:
                send[name] = value
        if route.accept is not None:
            send["Accept"] = route.accept
        # Documents are read whole to be rewritten: ask for them compressed.
        upstream_method = "HEAD" if method == "HEAD" and route.rewrite is None else "GET"
        try:
            resp = self.upstream.get(route.url, send, method=upstream_method, decode=route.rewrite is not None)
            if route.digest is not None:
                resp = self._follow_redirects(resp, route.url, send, upstream_method)
        except UpstreamTimeout as exc:
            return self._failed(start_response, "timeout", "504 Gateway Timeout", f"the upstream timed out: {exc}",
                                route.fallback, method)
        except UpstreamError as exc:
            return self._failed(start_response, "connect", "502 Bad Gateway", f"the upstream is unreachable: {exc}",
                                route.fallback, method)
        headers = [(k, v) for k, v in resp.headers if k.lower() not in _DROP]
        log.debug("upstream %s %s -> %d", upstream_method, route.url, resp.status)
        if resp.status == 404:
            resp.close()
            log_fetch(route.url, 0, resp.started, "404 not found")
            # One body for every path: all negative entries share a single blob.
            return plain_response(start_response, "404 Not Found", "not found upstream",
                                  [("Cache-Control", f"public, max-age={self.negative_ttl}")])
        if resp.status >= 500:
            resp.close()
            return self._failed(start_response, "status", "502 Bad Gateway", f"the upstream answered {resp.status}",
                                route.fallback, method)
        if resp.status != 200:  # 3xx and 4xx: passed through as they are, never cached
            try:
                body = resp.content(_DOCUMENT_LIMIT) if upstream_method == "GET" else b""
            except UpstreamError as exc:
                return self._failed(start_response, "body", "502 Bad Gateway", str(exc))
            headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "content-encoding")]
            log_fetch(route.url, len(body), resp.started, f"{resp.status} passed through")
            start_response(f"{resp.status} {resp.reason}".strip(),
                           headers + [("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
            return [body] if method == "GET" else []

        if route.cache_control is not None:
            headers = [(k, v) for k, v in headers if k.lower() not in ("cache-control", "expires", "pragma")]
            headers.append(("Cache-Control", route.cache_control))
        if route.vary:
            existing = policy.vary_names(headers)
            headers = [(k, v) for k, v in headers if k.lower() != "vary"]
            headers.append(("Vary", ", ".join(sorted({*existing, *(v.lower() for v in route.vary)}))))
        headers.extend(route.headers)
        if route.rewrite is not None:
            try:
                document = resp.content(_DOCUMENT_LIMIT)
                content_type = policy.header(headers, "Content-Type") or "text/html"
                document, content_type = route.rewrite(document, content_type, route.url)
            except UpstreamTimeout as exc:
                return self._failed(start_response, "timeout", "504 Gateway Timeout", str(exc))
            except (UpstreamError, RouteError) as exc:
                return self._failed(start_response, "body", "502 Bad Gateway", str(exc))
            metrics.UPSTREAM_BYTES.inc(len(document))
            log_fetch(route.url, len(document), resp.started, "document rewritten")
            headers = [(k, v) for k, v in headers
                       if k.lower() not in ("content-length", "content-encoding", "content-type", "etag")]
            start_response("200 OK", headers + [("Content-Type", content_type),
                                                ("Content-Length", str(len(document)))])
            return [document] if method == "GET" else []
        if method == "HEAD":
            resp.close()
            start_response("200 OK", headers)
            return []
        chunks: Iterator[bytes] = _counted(resp.chunks())
        if route.digest is not None:
            chunks = verified(chunks, *route.digest)
        # The first chunk before the status: an upstream that times out or breaks
        # before any byte of its body still gets an answer that says so (504/502).
        try:
            first = next(chunks, b"")
        except UpstreamTimeout as exc:
            resp.close()
            return self._failed(start_response, "timeout", "504 Gateway Timeout", f"the upstream timed out: {exc}")
        except UpstreamError as exc:
            resp.close()
            return self._failed(start_response, "body", "502 Bad Gateway", f"the upstream body failed: {exc}")
        start_response("200 OK", headers)
        return _Body(chunks, resp, route.url, first)

    def _follow_redirects(self, resp: Any, url: str, send: dict[str, str], method: str) -> Any:
        """Follow the upstream's redirects for a body named by its digest.

        Registries send blob GETs to object storage (a 307 to a signed URL):
        passing that on would send every client around the cache. The digest
        check vouches for whatever comes back; credentials go only to the
        host the route named.
        """
        for _ in range(_MAX_REDIRECTS):
            location = policy.header(resp.headers, "Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.close()
            target = urljoin(url, location.strip())
            if not target.startswith(("http://", "https://")):
                raise UpstreamError(f"{url} redirected to {target!r}, not an http(s) URL")
            if netloc_of(target) != netloc_of(url):
                send = {k: v for k, v in send.items() if k.lower() != "authorization"}
            log.info("upstream %s %s -> %d, following to %s", method, url, resp.status, target)
            url = target
            resp = self.upstream.get(url, send, method=method)
        resp.close()
        raise UpstreamError(f"more than {_MAX_REDIRECTS} redirects from the upstream, last to {url}")

    @staticmethod
    def _failed(start_response: StartResponse, kind: str, status: str, message: str,
                fallback: LocalAnswer | None = None, method: str = "GET") -> Iterable[bytes]:
        metrics.UPSTREAM_ERRORS.labels(kind).inc()
        log.warning("%s: %s", status, message)
        if fallback is not None:
            return _answer(start_response, fallback, method)
        return plain_response(start_response, status, message)


def _answer(start_response: StartResponse, answer: LocalAnswer, method: str) -> list[bytes]:
    """Give a local answer; cheap to make again, so never stored."""
    start_response(answer.status, [*answer.headers, ("Content-Length", str(len(answer.body))),
                                   ("Cache-Control", "no-store")])
    return [answer.body] if method == "GET" else []


def log_fetch(url: str, size: int, started: float, outcome: str) -> None:
    """The one log line per upstream fetch: URL, body bytes, duration, outcome."""
    log.info("fetch %s: %d bytes in %.3fs, %s", url, size, time.monotonic() - started, outcome)


class _Body:
    """The upstream body as a WSGI iterable whose ``close`` closes the response.

    Logs one line per fetch when the body ends: URL, bytes, duration, outcome.
    """

    def __init__(self, chunks: Iterable[bytes], resp: Any, url: str, first: bytes = b"") -> None:
        self._chunks = iter(chunks)
        self._resp = resp
        self._url = url
        self._first = first
        self._size = 0
        self._logged = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            if self._first:
                self._size += len(self._first)
                yield self._first
            for chunk in self._chunks:
                self._size += len(chunk)
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._log(f"failed: {exc}")
            raise
        self._log("complete")

    def _log(self, outcome: str) -> None:
        if not self._logged:
            self._logged = True
            log_fetch(self._url, self._size, self._resp.started, outcome)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self._resp.close()
        self._log("stopped early")


class ProxyApp:
    """The proxy's WSGI app: ``/-/healthz``, ``/-/metrics``, and the cached forwarder."""

    def __init__(self, cached: CacheFetch, index: SQLiteIndex) -> None:
        self.cached = cached
        self.index = index

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/-/healthz":
            return plain_response(start_response, "200 OK", "ok", [("Cache-Control", "no-store")])
        if path == "/-/metrics":
            body = metrics.render(self.index.totals)
            start_response("200 OK", [("Content-Type", metrics.CONTENT_TYPE), ("Content-Length", str(len(body))),
                                      ("Cache-Control", "no-store")])
            return [body]

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            metrics.REQUESTS.labels(metrics.outcome_of(environ.get(policy.ENVIRON_KEY))).inc()
            length = policy.header(headers, "Content-Length")
            if length and length.isdigit() and environ.get("REQUEST_METHOD") != "HEAD":
                metrics.SERVED_BYTES.inc(int(length))
            return start_response(status, headers, exc_info)

        return self.cached(environ, start)

    def close(self) -> None:
        self.cached.close()
        self.cached.app.upstream.close()


def path_key(environ: WSGIEnviron) -> str:
    """The proxy's cache key: path and query. The upstream is fixed, so the
    Host a client sends must not split the cache (or its coalescing)."""
    query = environ.get("QUERY_STRING", "")
    return environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "") + (f"?{query}" if query else "")


def create_app(upstream: str, store: CAFS | str | os.PathLike[str], protocol: str = "generic", *,
               files_upstreams: Iterable[str] | None = None, index_ttl: float = 600, tag_ttl: float = 300,
               negative_ttl: float = 60, stale_if_error: float | None = 7 * 86400, threads: int = 32,
               connect_timeout: float = 5.0, read_timeout: float = 60.0, max_object_size: int | None = None,
               wait_timeout: float = 60.0, fsync: bool = True) -> ProxyApp:
    """A pull-through caching proxy for ``upstream`` as a WSGI app.

    :param upstream: base URL of the origin (``https://pypi.org``).
    :param store: a :class:`CAFS` or its directory (the index goes beside the blobs).
    :param protocol: ``generic``, ``pypi`` or ``oci``.
    :param files_upstreams: (pypi) other hosts file links may point at.
    :param index_ttl: (pypi) seconds an index page stays fresh.
    :param tag_ttl: (oci) seconds a manifest by tag stays fresh.
    :param negative_ttl: seconds an upstream 404 is remembered.
    :param stale_if_error: seconds past expiry a stale answer is served
        while the upstream is down or failing; ``None`` never.
    :param threads: the server's threads per worker (sizes the upstream pool).
    :raises ValueError: on any bad option, before serving anything.
    """
    proto = make_protocol(protocol, upstream, files_upstreams=files_upstreams, index_ttl=index_ttl,
                          tag_ttl=tag_ttl)
    client = Upstream(pool_size=threads, connect_timeout=connect_timeout, read_timeout=read_timeout)
    forwarder = Forwarder(proto, client, negative_ttl=negative_ttl)
    store = store if isinstance(store, CAFS) else CAFS(store, fsync=fsync)
    index = SQLiteIndex(store.layout.index_path)
    # Until the protocols say what is immutable route by route, an upstream
    # that states no freshness is taken to serve immutable files.
    cached = CacheFetch(forwarder, store, index=index, key=path_key, cache_statuses=(200, 404),
                        default_ttl=FOREVER, stale_if_error=stale_if_error, max_object_size=max_object_size,
                        wait_timeout=wait_timeout)
    return ProxyApp(cached, index)
