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
import io
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urljoin

from . import metrics, policy
from .config import RouteConfig
from .index import Index, SQLiteIndex
from .middleware import CacheFetch
from .protocols import (ALL_HEADERS, HOP_BY_HOP, LocalAnswer, Protocol, Route, RouteError, make_protocol,
                        netloc_of, safe_path)
from .wsgi import StartResponse, WSGIEnviron, plain_response, status_line
from .store import CAFS
from .upstream import (Upstream, UpstreamError, UpstreamTimeout)

__all__ = ["create_app", "Forwarder", "DigestMismatch", "route_key", "Router", "Mount", "build_router"]

log = logging.getLogger("cachefetch.proxy")

# Request headers a reverse proxy sets itself rather than forwards.
_NOT_FORWARDED = frozenset({"host", "accept-encoding", "via", "x-forwarded-for", "x-forwarded-proto",
                            "x-forwarded-host", "expect"})
_VIA = "1.1 cachefetch"
_MAX_BODY = 1 << 62
# RFC 9111 alone (no deployment default): does an answer state its own freshness?
_NO_DEFAULTS = policy.CacheRules()
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

    A reverse proxy: every method (unless ``read_only``), every end-to-end
    request header the route forwards, request bodies streamed; the
    upstream's status, end-to-end headers and body come back as sent. Only
    the proxy's own failures (connect, timeout, a broken or unverifiable
    body) are local answers: one line saying why, never stored.

    Runs in the request's thread (as the cache's app).

    :param router: the :class:`Router` mapping requests to protocols' routes.
    :param upstream: the :class:`~cachefetch.upstream.Upstream` client.
    :param negative_ttl: seconds an upstream 404 that states no freshness is cached.
    :param read_only: answer every method but GET and HEAD with 405.
    :raises ValueError: on a bad number.
    """

    def __init__(self, router: "Router", upstream: Upstream, negative_ttl: float = 60, *,
                 read_only: bool = False) -> None:
        if isinstance(negative_ttl, bool) or not negative_ttl >= 0:
            raise ValueError("negative_ttl must be >= 0")
        self.router = router
        self.upstream = upstream
        self.negative_ttl = int(negative_ttl)
        self.read_only = bool(read_only)
        #: ``seed(route, status, headers, body)``: store an answer under another route too (set by ProxyApp).
        self.seed: Callable[[Route, str, list[tuple[str, str]], bytes], None] | None = None

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        protocol, route = environ.get(ROUTE_KEY) or self.router.resolve(environ)
        if method not in ("GET", "HEAD") and self.read_only:
            return local_error(start_response, protocol, 405, "this proxy is read-only", [("Allow", "GET, HEAD")])
        if isinstance(route, RouteError):
            # Refusals cost nothing to repeat: storing them would let any
            # client fill the store with junk paths.
            return local_error(start_response, protocol, route.status, str(route))
        if isinstance(route, LocalAnswer):
            return _answer(start_response, route, method)
        prefetched = environ.get(PREFETCHED_KEY)
        if prefetched is not None:
            status, headers, body = prefetched
            start_response(status, [*headers, ("Content-Length", str(len(body)))])
            return [body]
        if environ.get(OFFLINE_KEY):
            return local_error(start_response, protocol, 504, "not in the cache, and the upstream failed")
        return self._forward(environ, start_response, protocol, route, method)

    def _forward(self, environ: WSGIEnviron, start_response: StartResponse, protocol: Protocol, route: Route,
                 method: str) -> Iterable[bytes]:
        send = request_headers(environ, route)
        document = method in ("GET", "HEAD") and (route.rewrite is not None or route.also_under is not None)
        if route.rewrite is not None and "If-None-Match" in send:
            send["If-None-Match"] = unwrap_etags(send["If-None-Match"])
        upstream_method = "GET" if document else method
        try:
            body = request_body(environ)
        except RouteError as exc:
            return local_error(start_response, protocol, exc.status, str(exc))
        try:
            resp = self.upstream.get(route.url, send, method=upstream_method, decode=route.rewrite is not None,
                                     body=body)
            if route.digest is not None:
                resp = self._follow_redirects(resp, protocol, route.url, send, upstream_method)
        except UpstreamTimeout as exc:
            return self._failed(start_response, protocol, "timeout", 504, f"the upstream timed out: {exc}",
                                route.fallback, method)
        except UpstreamError as exc:
            return self._failed(start_response, protocol, "connect", 502, f"the upstream is unreachable: {exc}",
                                route.fallback, method)
        log.debug("upstream %s %s -> %d", upstream_method, route.url, resp.status)
        if resp.status >= 500 and route.fallback is not None:
            resp.close()
            return self._failed(start_response, protocol, "status", 502, f"the upstream answered {resp.status}",
                                route.fallback, method)
        headers = response_headers(resp.headers, route)
        status = f"{resp.status} {resp.reason}".strip()
        if resp.status in _REDIRECTS:
            headers = self._local_redirect(headers, protocol, route.url)
        if resp.status == 200:
            headers = with_freshness(headers, route.cache_control, replace=True)
        elif resp.status == 404:
            headers = with_freshness(headers, f"max-age={self.negative_ttl}", replace=False)
        if document and resp.status == 200:
            return self._document(start_response, protocol, route, resp, status, headers, method)
        if route.rewrite is not None:
            headers = [(k, wrap_etag(v, route) if k.lower() == "etag" else v) for k, v in headers]
        if method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
            resp.close()
            start_response(status, headers)
            return []
        chunks: Iterator[bytes] = _counted(resp.chunks())
        if route.digest is not None and resp.status == 200:
            chunks = verified(chunks, *route.digest)
        # The first chunk before the status: an upstream that times out or breaks
        # before any byte of its body still gets an answer that says so (504/502).
        try:
            first = next(chunks, b"")
        except UpstreamTimeout as exc:
            resp.close()
            return self._failed(start_response, protocol, "timeout", 504, f"the upstream timed out: {exc}")
        except UpstreamError as exc:
            resp.close()
            return self._failed(start_response, protocol, "body", 502, f"the upstream body failed: {exc}")
        start_response(status, headers)
        return _Body(chunks, resp, route.url, first)

    def _document(self, start_response: StartResponse, protocol: Protocol, route: Route, resp: Any, status: str,
                  headers: list[tuple[str, str]], method: str) -> Iterable[bytes]:
        """A small document read whole: rewritten, or also stored under another route."""
        try:
            body = resp.content(_DOCUMENT_LIMIT)
            if route.also_under is not None:
                announced = policy.header(headers, "Docker-Content-Digest")
                other = route.also_under(body)
                if other is not None and announced and other.digest and announced.strip() != \
                        f"{other.digest[0]}:{other.digest[1]}":
                    metrics.VERIFY_FAILURES.inc()
                    raise DigestMismatch(f"the body's digest is {other.digest[1]}, the upstream said {announced}")
                if other is not None and self.seed is not None:
                    self.seed(other, status, response_headers(resp.headers, other), body)
            if route.rewrite is not None:
                content_type = policy.header(headers, "Content-Type") or "text/html"
                body, content_type = route.rewrite(body, content_type, route.url)
                headers = [(k, wrap_etag(v, route) if k.lower() == "etag" else v) for k, v in headers
                           if k.lower() not in ("content-type", "content-encoding")]
                headers.append(("Content-Type", content_type))
        except UpstreamTimeout as exc:
            return self._failed(start_response, protocol, "timeout", 504, str(exc))
        except (UpstreamError, RouteError) as exc:
            return self._failed(start_response, protocol, "body", 502, str(exc))
        metrics.UPSTREAM_BYTES.inc(len(body))
        log_fetch(route.url, len(body), resp.started, "document read")
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, headers + [("Content-Length", str(len(body)))])
        return [body] if method == "GET" else []

    def _follow_redirects(self, resp: Any, protocol: Protocol, url: str, send: dict[str, str], method: str) -> Any:
        """Follow the upstream's redirects for a body named by its digest, to allowed hosts only.

        Registries send blob GETs to object storage (a 307 to a signed URL):
        passing that on would send every client around the cache. The digest
        check vouches for whatever comes back; credentials go only to the
        host the route named.

        :raises UpstreamError: for a redirect to any other host (nothing of it is fetched).
        """
        for _ in range(_MAX_REDIRECTS):
            location = policy.header(resp.headers, "Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.close()
            target = urljoin(url, location.strip())
            if not allowed_target(protocol, target):
                raise UpstreamError(f"redirected to {netloc_of(target) or target!r}, not an allowed upstream")
            if netloc_of(target) != netloc_of(url):
                send = {k: v for k, v in send.items() if k.lower() != "authorization"}
            log.info("upstream %s %s -> %d, following to %s", method, url, resp.status, target)
            url = target
            resp = self.upstream.get(url, send, method=method)
        resp.close()
        raise UpstreamError(f"more than {_MAX_REDIRECTS} redirects from the upstream, last to {url}")

    @staticmethod
    def _local_redirect(headers: list[tuple[str, str]], protocol: Protocol, url: str) -> list[tuple[str, str]]:
        """A redirect to a URL this proxy serves points back through the proxy;
        any other target is passed on unchanged (and never fetched here)."""
        out = []
        for k, v in headers:
            if k.lower() == "location":
                local = protocol.local_path(urljoin(url, v.strip()))
                v = local if local is not None else v
            out.append((k, v))
        return out

    @staticmethod
    def _failed(start_response: StartResponse, protocol: Protocol, kind: str, status: int, message: str,
                fallback: LocalAnswer | None = None, method: str = "GET") -> Iterable[bytes]:
        metrics.UPSTREAM_ERRORS.labels(kind).inc()
        log.warning("%d: %s", status, message)
        if fallback is not None:
            return _answer(start_response, fallback, method)
        return local_error(start_response, protocol, status, message)


ROUTE_KEY = "cachefetch.route"
PREFETCHED_KEY = "cachefetch.prefetched"
OFFLINE_KEY = "cachefetch.offline"


def local_error(start_response: StartResponse, protocol: Protocol, status: int, message: str,
                extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    """The proxy's own error answer, in the protocol's shape; never stored."""
    content_type, body = protocol.error(status, message)
    start_response(status_line(status), [("Content-Type", content_type), ("Content-Length", str(len(body))),
                                         ("Cache-Control", "no-store"), *extra])
    return [body]


def with_freshness(headers: list[tuple[str, str]], cache_control: str | None,
                   replace: bool) -> list[tuple[str, str]]:
    """``headers`` with ``cache_control``: instead of the upstream's own
    (``replace``), or only where the upstream states no freshness."""
    if cache_control is None:
        return headers
    if not replace and policy.freshness_lifetime(404, headers, _NO_DEFAULTS, time.time()).explicit:
        return headers
    kept = [(k, v) for k, v in headers if k.lower() not in ("cache-control", "expires", "pragma")]
    return kept + [("Cache-Control", cache_control)]


def request_headers(environ: WSGIEnviron, route: Route) -> dict[str, str]:
    """The headers to send upstream for ``route``: those it forwards (every
    end-to-end one for a reverse proxy, with Via and X-Forwarded-*), and its
    own ``Accept``."""
    send: dict[str, str] = {}
    if route.forward is ALL_HEADERS:
        named = {n.strip().lower() for n in environ.get("HTTP_CONNECTION", "").split(",")}
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name = key[5:].replace("_", "-").title()
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
                name = key.replace("_", "-").title()
            else:
                continue
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in named or lower in _NOT_FORWARDED:
                continue
            send[name] = value
        host = environ.get("HTTP_HOST")
        client = environ.get("REMOTE_ADDR")
        prior = environ.get("HTTP_X_FORWARDED_FOR")
        if client:
            send["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
        send["X-Forwarded-Proto"] = environ.get("wsgi.url_scheme", "http")
        if host:
            send["X-Forwarded-Host"] = host
        via = environ.get("HTTP_VIA")
        send["Via"] = f"{via}, {_VIA}" if via else _VIA
    else:
        for name in route.forward:
            value = environ.get("HTTP_" + name.upper().replace("-", "_"))
            if value is not None:
                send[name] = value
    if route.accept is not None:
        send["Accept"] = route.accept
    return send


class _InputBody:
    """``wsgi.input`` read up to its Content-Length, as requests sends a file."""

    def __init__(self, stream: Any, length: int) -> None:
        self._stream = stream
        self._left = length
        self._length = length

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._stream.read(size)
        self._left -= len(data)
        if not data:
            self._left = 0
        return data


def _chunked_input(stream: Any) -> Iterator[bytes]:
    while chunk := stream.read(1 << 16):
        yield chunk


def request_body(environ: WSGIEnviron) -> Any:
    """The request body to stream upstream, or ``None`` for none.

    :raises RouteError: (400) for a Content-Length no body could have.
    """
    length = environ.get("CONTENT_LENGTH", "")
    stream = environ.get("wsgi.input")
    if stream is None:
        return None
    if length and length.strip().isdigit():
        if int(length) > _MAX_BODY:
            raise RouteError(400, "the request's Content-Length is out of range")
        return _InputBody(stream, int(length)) if int(length) > 0 else None
    if environ.get("wsgi.input_terminated") and "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return _chunked_input(stream)
    return None


def response_headers(upstream: Iterable[tuple[str, str]], route: Route) -> list[tuple[str, str]]:
    """The upstream's end-to-end response headers for a client.

    Dropped: hop-by-hop ones and those the upstream's Connection names;
    ``Set-Cookie`` on a route the protocol vouches is the same for all;
    ``Accept-Encoding`` in Vary (the proxy fetches ``identity``), the
    fields whose representation the route's ``variant`` already names, and
    (on a route that forwards only some headers) those it did not send.
    The route's own headers replace the upstream's of the same name, and
    ``Via`` gains this proxy.
    """
    upstream = list(upstream)
    named = {n.strip().lower() for n in (policy.header(upstream, "Connection") or "").split(",") if n.strip()}
    own = {k.lower() for k, _ in route.headers}
    dropped = HOP_BY_HOP | named | own | ({"set-cookie", "set-cookie2"} if route.shared else set())
    out = [(k, v) for k, v in upstream if k.lower() not in dropped and k.lower() not in ("vary", "via")]
    vary = [n for n in policy.vary_names(upstream) if n != "accept-encoding" and n not in
            {v.lower() for v in route.vary}]
    if route.forward is not ALL_HEADERS:  # the upstream saw none of the others: its answer cannot vary on them
        vary = [n for n in vary if n == "*" or n in {f.lower() for f in route.forward}]
    if vary:
        out.append(("Vary", ", ".join(vary)))
    via = policy.header(upstream, "Via")
    out.append(("Via", f"{via}, {_VIA}" if via else _VIA))
    return out + list(route.headers)


def _etag_suffix(route: Route) -> str:
    return ".cf-" + hashlib.sha256(route.key.encode()).hexdigest()[:8]


def wrap_etag(value: str, route: Route) -> str:
    """The ETag of a rewritten document: the upstream's, marked as this
    proxy's representation (so it is never mistaken for the upstream's bytes)."""
    value = value.strip()
    if not value.endswith('"') or len(value) < 2:
        return value
    return value[:-1] + _etag_suffix(route) + '"'


def unwrap_etags(value: str) -> str:
    """An If-None-Match list with this proxy's ETag marks taken off again."""
    return re.sub(r'\.cf-[0-9a-f]{8}"', '"', value)


def allowed_target(protocol: Protocol, url: str) -> bool:
    """Whether a redirect target is on a host the protocol may fetch from."""
    if not url.startswith(("http://", "https://")):
        return False
    return protocol.local_path(url) is not None or netloc_of(url) in getattr(protocol, "allowed", {})


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


@dataclass(frozen=True)
class Mount:
    """A protocol served under a path prefix (``""`` for the root)."""

    prefix: str
    protocol: Protocol


class Router:
    """Which protocol serves a request, and its route: the longest mount
    prefix that holds the path wins.

    :param mounts: at least one; prefixes distinct.
    :raises ValueError: for none, or two with one prefix.
    """

    def __init__(self, mounts: Iterable[Mount]) -> None:
        self.mounts = sorted(mounts, key=lambda m: len(m.prefix), reverse=True)
        if not self.mounts:
            raise ValueError("a proxy needs at least one route")
        prefixes = [m.prefix for m in self.mounts]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"two routes share a prefix: {sorted(prefixes)}")

    def resolve(self, environ: WSGIEnviron) -> tuple[Protocol, Route | LocalAnswer | RouteError]:
        """``(protocol, what it answers)``: a route, a local answer, or the refusal."""
        try:
            path = safe_path(environ)
        except RouteError as exc:
            return self.mounts[-1].protocol, exc
        for mount in self.mounts:
            if mount.prefix and path != mount.prefix and not path.startswith(mount.prefix + "/"):
                continue
            protocol = mount.protocol
            below = path if getattr(protocol, "whole_path", False) else path[len(mount.prefix):] or "/"
            try:
                return protocol, protocol.route(below, environ)
            except RouteError as exc:
                return protocol, exc
        return self.mounts[-1].protocol, RouteError(404, "no route serves this path")


def route_key(environ: WSGIEnviron) -> str | None:
    """The proxy's cache key: the exact upstream URL the route fetches (plus
    its representation), so two keys never name one upstream resource nor
    one key two. ``None`` (not cached) for local answers and refusals."""
    resolved = environ.get(ROUTE_KEY)
    route = resolved[1] if resolved is not None else None
    return route.key if isinstance(route, Route) else None


class ProxyApp:
    """The proxy's WSGI app: ``/-/healthz``, ``/-/metrics``, and the cached forwarder.

    Routes each request once (the key and the forwarder read the route from
    the environ), tells clients ``Vary`` for negotiated routes, and, when the
    upstream fails, serves another stored representation the client accepts.
    """

    def __init__(self, cached: CacheFetch, index: Index) -> None:
        self.cached = cached
        self.index = index
        self.forwarder: Forwarder = cached.app
        self.forwarder.seed = self.seed

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/-/healthz":
            return plain_response(start_response, "200 OK", "ok", [("Cache-Control", "no-store")])
        if path.startswith("/-/fleet/") and self.cached.fleet_endpoint is not None:
            return self.cached.fleet_endpoint(environ, start_response)
        if path == "/-/metrics":
            body = metrics.render(self.index.totals)
            start_response("200 OK", [("Content-Type", metrics.CONTENT_TYPE), ("Content-Length", str(len(body))),
                                      ("Cache-Control", "no-store")])
            return [body]
        resolved = environ.get(ROUTE_KEY) or self.forwarder.router.resolve(environ)
        environ[ROUTE_KEY] = resolved
        route = resolved[1]
        vary = route.vary if isinstance(route, Route) else ()
        counted = _Counting(start_response, environ, vary)
        if not isinstance(route, Route) or not route.alternatives:
            return self.cached(environ, counted)
        held = _Holding(counted)
        result = self.cached(environ, held)
        if not held.failed:
            return result
        for other in route.alternatives:
            attempt = _Holding(counted, accept_only=True)
            answer = self.cached({**environ, ROUTE_KEY: (resolved[0], other), OFFLINE_KEY: True}, attempt)
            if not attempt.failed:
                log.warning("upstream failed for %s; served the stored %r representation", route.key, other.variant)
                _close(result)
                return answer
            _close(answer)
        held.release()
        return result

    def seed(self, route: Route, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        """Store ``body`` under ``route`` too, through the cache (so as any
        other answer: one flight, the same index), without asking the upstream.
        Runs in the request's thread."""
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": "", "SERVER_NAME": "seed",
                   "SERVER_PORT": "0", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
                   "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
                   ROUTE_KEY: (None, route), PREFETCHED_KEY: (status, headers, body)}
        if route.accept:
            environ["HTTP_ACCEPT"] = route.accept
        result = self.cached(environ, lambda status, headers, exc_info=None: (lambda data: None))
        try:
            for _ in result:
                pass
        finally:
            _close(result)

    def close(self) -> None:
        self.cached.close()
        self.forwarder.upstream.close()


class _Counting:
    """start_response that counts the answer in the metrics and tells clients the route's Vary."""

    def __init__(self, start_response: StartResponse, environ: WSGIEnviron, vary: tuple[str, ...]) -> None:
        self._start = start_response
        self._environ = environ
        self._head = environ.get("REQUEST_METHOD") == "HEAD"
        self._vary = vary

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        metrics.REQUESTS.labels(metrics.outcome_of(self._environ.get(policy.ENVIRON_KEY))).inc()
        length = policy.header(headers, "Content-Length")
        if length and length.isdigit() and not self._head:
            metrics.SERVED_BYTES.inc(int(length))
        if self._vary:
            names = [*policy.vary_names(headers), *(v.lower() for v in self._vary)]
            headers = [(k, v) for k, v in headers if k.lower() != "vary"]
            headers.append(("Vary", ", ".join(dict.fromkeys(names))))
        return self._start(status, headers, exc_info)


class _Holding:
    """start_response that holds back a 502/504 (to try another representation
    first); with ``accept_only``, anything but a 200 counts as failed."""

    def __init__(self, start_response: StartResponse, accept_only: bool = False) -> None:
        self._start = start_response
        self._accept_only = accept_only
        self.failed = False
        self._held: tuple[Any, ...] | None = None

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        code = status[:3]
        if (code in ("502", "504")) or (self._accept_only and code not in ("200", "304")):
            self.failed = True
            self._held = (status, headers, exc_info)
            self._body: list[bytes] = []
            return self._body.append
        return self._start(status, headers, exc_info)

    def release(self) -> None:
        """Start the held answer after all (its body is still the caller's to return)."""
        assert self._held is not None
        write = self._start(*self._held)
        for data in self._body:
            write(data)


def _close(obj: object) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


def build_router(routes: Iterable[RouteConfig], **defaults: Any) -> Router:
    """A router over ``routes``; each route's own options win over ``defaults``.

    :raises ValueError: on any bad route or option.
    """
    mounts = []
    for rc in routes:
        mount = rc.prefix.rstrip("/")
        options = {**defaults, **rc.options, "mount": mount}
        if rc.protocol == "oci":
            options["mount"] = "" if mount in ("", "/v2") else mount
        mounts.append(Mount(mount, make_protocol(rc.protocol, rc.upstream, **options)))
    return Router(mounts)


def create_app(upstream: str | None, store: CAFS | str | os.PathLike[str], protocol: str = "generic", *,
               routes: Iterable[RouteConfig] | None = None,
               files_upstreams: Iterable[str] | None = None, index_ttl: float = 600, tag_ttl: float = 300,
               packument_ttl: float = 300, negative_ttl: float = 60, stale_if_error: float | None = 7 * 86400,
               threads: int = 32, connect_timeout: float = 5.0, read_timeout: float = 60.0,
               max_object_size: int | None = None, wait_timeout: float = 60.0, fsync: bool = True,
               read_only: bool = False, default_ttl: float | str | None = None,
               fetch_timeout: float | None = 3600.0, idle_timeout: float | None = 60.0,
               fleet: Any = None, cache_status: bool = True) -> ProxyApp:
    """A pull-through caching proxy for ``upstream`` (or several ``routes``) as a WSGI app.

    :param upstream: base URL of the origin (``https://pypi.org``), served at
        the root with ``protocol``; ``None`` when ``routes`` are given.
    :param store: a :class:`CAFS` or its directory (the index goes beside the blobs).
    :param protocol: ``generic``, ``pypi``, ``npm`` or ``oci``.
    :param routes: several upstreams in one server (from ``--config``), one store.
    :param files_upstreams: (pypi, npm) other hosts file links may point at.
    :param index_ttl: (pypi) seconds an index page stays fresh.
    :param tag_ttl: (oci) seconds a manifest by tag, tag list or referrers list stays fresh.
    :param packument_ttl: (npm) seconds a packument stays fresh.
    :param negative_ttl: seconds an upstream 404 is remembered.
    :param stale_if_error: seconds past expiry a stale answer is served
        while the upstream is down or failing; ``None`` never.
    :param threads: the server's threads per worker (sizes the upstream pool).
    :param read_only: refuse (405) every method but GET and HEAD.
    :param default_ttl: freshness of an answer stating none: ``None`` (the
        default) for RFC 9111's heuristics (``Last-Modified``) and
        revalidation, seconds, or ``"forever"`` for an upstream known to serve
        immutable files that states nothing.
    :param fetch_timeout: seconds an upstream fetch may take in all (see :class:`CacheFetch`).
    :param idle_timeout: seconds an upstream fetch may go without a byte.
    :param fleet: a :class:`~cachefetch.fleet.Fleet` (or ``redis://`` URL)
        to share entries, blobs and fetches with other hosts; ``None``: alone.
    :param cache_status: whether answers carry ``Cache-Status`` (see :class:`CacheFetch`).
    :raises ValueError: on any bad option, before serving anything.
    """
    if routes is None:
        if upstream is None:
            raise ValueError("give an upstream or routes")
        routes = [RouteConfig("/", protocol, upstream)]
    elif upstream is not None:
        raise ValueError("give an upstream or routes, not both")
    router = build_router(routes, files_upstreams=files_upstreams, index_ttl=index_ttl, tag_ttl=tag_ttl,
                          packument_ttl=packument_ttl)
    client = Upstream(pool_size=threads, connect_timeout=connect_timeout, read_timeout=read_timeout)
    forwarder = Forwarder(router, client, negative_ttl=negative_ttl, read_only=read_only)
    store = store if isinstance(store, CAFS) else CAFS(store, fsync=fsync)
    index = SQLiteIndex(store.layout.index_path)
    cached = CacheFetch(forwarder, store, index=index, key=route_key, cache_statuses=(200, 404),
                        default_ttl=default_ttl, stale_if_error=stale_if_error, max_object_size=max_object_size,
                        wait_timeout=wait_timeout, fetch_timeout=fetch_timeout, idle_timeout=idle_timeout,
                        fleet=fleet, cache_status=cache_status)
    return ProxyApp(cached, index)
