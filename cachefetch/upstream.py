"""Fetching from an HTTP upstream with requests: pooled, bounded, and honest about failures.

:class:`Upstream` wraps a :class:`requests.Session` whose connection pool is
sized to the server's threads. It retries connection failures (nothing has
been received yet, so a retry is safe), never a read, and turns requests'
exceptions into three of its own that a proxy can map to status codes.
"""
from __future__ import annotations

import email.parser
import http.client
import logging
import time
from dataclasses import dataclass
import re
import select
import ssl
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import requests
import urllib3
import urllib3.connection
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

__all__ = ["Upstream", "UpstreamResponse", "UpstreamError", "UpstreamUnavailable", "UpstreamTimeout",
           "UpstreamBodyError", "validate_base_url", "reason"]

log = logging.getLogger("cachefetch.upstream")

CHUNK_SIZE = 1 << 20
#: A body read shorter than this waits, up to :data:`COALESCE_WAIT` seconds at
#: a time, for the bytes that follow it (see :func:`_coalesced`).
COALESCE_SIZE = 512 << 10
COALESCE_WAIT = 0.001
#: The most a chunk's first bytes wait for the ones that follow them, in all.
COALESCE_LIMIT = 0.005
_CONTROL = re.compile(r"[\r\n\x00]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class UpstreamError(Exception):
    """The upstream could not give a usable answer."""


class UpstreamUnavailable(UpstreamError):
    """Could not connect, or the connection broke before any response (502)."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not answer in time (504)."""


class UpstreamBodyError(UpstreamError):
    """The body broke off after the response started."""


def validate_base_url(url: str) -> str:
    """Check an upstream base URL (http or https, a host, no query or fragment).

    :returns: the URL without a trailing slash.
    :raises ValueError: otherwise.
    """
    if not isinstance(url, str):
        raise ValueError(f"upstream URL must be a string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream URL must be http(s)://host[:port][/path], got {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"upstream URL must not have a query, fragment or credentials: {url!r}")
    try:
        _ = parts.port  # parses it: raises for a port out of range
    except ValueError as exc:
        raise ValueError(f"bad port in upstream URL {url!r}") from exc
    return url.rstrip("/")


@dataclass
class UpstreamResponse:
    """A streaming response: status, headers, and the body as chunks."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw: requests.Response
    started: float

    def chunks(self) -> Iterator[bytes]:
        """The body in chunks of up to 1 MiB, as sent (no content decoding),
        each as soon as it arrives: a trickling upstream's first bytes reach
        the client without waiting for a whole chunk to fill. A short read of
        a fast plain-HTTP body waits at most a millisecond at a time for what
        follows it (:func:`_coalesced`).

        :raises UpstreamBodyError: if the connection breaks mid-body.
        :raises UpstreamTimeout: if a read times out mid-body.
        """
        body = self.raw.raw
        ready = _readiness(body)
        try:
            while True:
                chunk = body.read1(CHUNK_SIZE, decode_content=False)
                if not chunk:
                    break
                if ready is not None and len(chunk) < COALESCE_SIZE and ready():
                    chunk = _coalesced(body, chunk, ready)
                yield chunk
        except requests.exceptions.ConnectionError as exc:
            raise UpstreamBodyError(f"upstream body broke off: {reason(exc)}") from exc
        except Exception as exc:
            if _is_timeout(exc):
                raise UpstreamTimeout("upstream body read timed out") from exc
            raise UpstreamBodyError(f"upstream body broke off: {reason(exc)}") from exc
        finally:
            self.close()

    def content(self, limit: int) -> bytes:
        """The whole (decoded) body, for small documents such as index pages.

        :raises UpstreamBodyError: if it is larger than ``limit`` or breaks off.
        """
        out = bytearray()
        try:
            for chunk in self.raw.iter_content(CHUNK_SIZE):
                out += chunk
                if len(out) > limit:
                    raise UpstreamBodyError(f"upstream document larger than {limit} bytes")
        except requests.exceptions.RequestException as exc:
            if _is_timeout(exc):
                raise UpstreamTimeout("upstream body read timed out") from exc
            raise UpstreamBodyError(f"upstream body broke off: {reason(exc)}") from exc
        finally:
            self.close()
        return bytes(out)

    def close(self) -> None:
        self.raw.close()


def _parse_headers(fp: Any, _class: type = http.client.HTTPMessage) -> http.client.HTTPMessage:
    """http.client's header parser, but a bare CR or a NUL inside a header
    line becomes a space first: the email parser under it would take a bare
    CR as a line end, so ``X: a<CR>Injected: yes`` would become two headers
    (RFC 9112 §5.5 lets a recipient replace them with SP)."""
    lines = http.client._read_headers(fp)  # type: ignore[attr-defined]
    cleaned = []
    for line in lines:
        text = line.rstrip(b"\r\n")
        cleaned.append(text.replace(b"\r", b" ").replace(b"\x00", b" ") + b"\r\n")
    return email.parser.Parser(_class=_class).parsestr(b"".join(cleaned).decode("iso-8859-1"))


# The stdlib has no hook for this: its module-level parser is what every
# HTTPResponse (so requests and urllib3) calls. Installed only where the
# private helper it builds on exists.
if hasattr(http.client, "_read_headers"):
    http.client.parse_headers = _parse_headers  # type: ignore[assignment]


def reason(exc: BaseException) -> str:
    """One line saying why a request failed: the innermost OS error's text
    (``Connection refused``), not the chain of urllib3 wrappers around it."""
    found: BaseException | None = None
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            found = e
        stack.extend([e.__cause__, e.__context__, *[a for a in getattr(e, "args", ()) if isinstance(a, BaseException)],
                      getattr(e, "reason", None) if isinstance(getattr(e, "reason", None), BaseException) else None])
    if found is not None:
        return found.strerror.lower() if isinstance(found.strerror, str) else str(found)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _is_timeout(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, (requests.exceptions.Timeout, TimeoutError)) or "timed out" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _readiness(body: Any) -> Callable[[], bool] | None:
    """A check that more of ``body`` arrives within :data:`COALESCE_WAIT`
    seconds (a poll of its socket), or ``None`` where a poll cannot say so:
    no plain socket to reach, TLS (decrypted bytes may wait inside the TLS
    object, and a readable socket may hold half a record), or a chunked body
    (a readable socket may hold half a chunk-size line). Then every read is
    its own chunk."""
    if getattr(body, "chunked", True):
        return None
    sock = getattr(getattr(body, "connection", None), "sock", None)
    if sock is None or isinstance(sock, ssl.SSLSocket):
        return None
    try:
        fd = sock.fileno()
    except (AttributeError, OSError):
        return None
    if fd < 0:
        return None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    wait_ms = COALESCE_WAIT * 1000
    return lambda: bool(poller.poll(wait_ms))


def _coalesced(body: Any, first: bytes, ready: Callable[[], bool]) -> bytes:
    """``first`` and what follows it closely, up to :data:`COALESCE_SIZE` bytes.

    A fast upstream on a loaded machine hands each read only what one
    scheduling slice delivered (often 64-128 KiB); every chunk then costs
    the hash, the write, the wake-up and the send of the layers above it.
    Waiting a millisecond at most for the next bytes (five in all) makes
    chunks of half a megabyte and more, while a trickle's bytes go on within
    that millisecond, and a steady slow stream's within five."""
    parts, size = [first], len(first)
    deadline = time.monotonic() + COALESCE_LIMIT
    while size < COALESCE_SIZE and time.monotonic() < deadline and ready():
        more = body.read1(CHUNK_SIZE - size, decode_content=False)
        if not more:
            break
        parts.append(more)
        size += len(more)
    return b"".join(parts) if len(parts) > 1 else first


class _FinalResponse(http.client.HTTPResponse):
    """A response that passes over interim 1xx answers (102 Processing, 103
    Early Hints…): http.client skips only 100 Continue, and would take a 103
    for the final answer. 101 is final (the connection changes protocol)."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 102 <= status < 200:
                return version, status, reason
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]  # the interim answer's fields


class _Connection(urllib3.connection.HTTPConnection):
    response_class = _FinalResponse


class _TLSConnection(urllib3.connection.HTTPSConnection):
    response_class = _FinalResponse


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _Adapter(HTTPAdapter):
    """requests' adapter, on connections that pass over interim answers."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}


class Upstream:
    """A pooled HTTP client for one proxy.

    :param pool_size: connections kept per upstream host; match the threads.
    :param connect_timeout: seconds to connect.
    :param read_timeout: seconds to wait for each read (headers or a chunk).
    :param connect_retries: retries of a failed connection before giving up.
    :raises ValueError: on a bad number.
    """

    def __init__(self, pool_size: int = 32, connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 connect_retries: int = 2) -> None:
        if pool_size < 1 or connect_timeout <= 0 or read_timeout <= 0 or connect_retries < 0:
            raise ValueError("pool_size >= 1, timeouts > 0 and connect_retries >= 0 are required")
        self.timeout = (connect_timeout, read_timeout)
        retry = Retry(total=connect_retries, connect=connect_retries, read=0, status=0, other=0,
                      redirect=0, backoff_factor=0.1, raise_on_status=False)
        adapter = _Adapter(pool_connections=8, pool_maxsize=pool_size, max_retries=retry, pool_block=False)
        self.session = requests.Session()
        self.session.trust_env = False  # a proxy's own upstream must not be rerouted by env proxies
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def get(self, url: str, headers: Mapping[str, str] | None = None, method: str = "GET",
            decode: bool = False, body: Any = None) -> UpstreamResponse:
        """Send ``method`` to ``url`` and return once the response headers are in.

        Redirects are not followed: the caller decides whether a Location is
        allowed. Header values holding CR, LF or NUL have each replaced by a
        space (RFC 9112 §5.5), so no value can become a header line of its own.

        :param decode: ask for gzip and decode it (for documents read whole).
        :param body: the request body: a file-like object with ``__len__``
            (sent with Content-Length) or an iterable of bytes (chunked).
        :raises UpstreamUnavailable: connection refused/reset/DNS failure.
        :raises UpstreamTimeout: connect or first read timed out.
        """
        send = dict(headers or {})
        send["Accept-Encoding"] = "gzip" if decode else "identity"
        started = time.monotonic()
        try:
            raw = self.session.request(method, url, headers=send, stream=True, timeout=self.timeout,
                                       allow_redirects=False, data=body)
        except requests.exceptions.Timeout as exc:
            raise UpstreamTimeout(f"{_where(url)}: timed out") from exc
        except requests.exceptions.ConnectionError as exc:
            if _is_timeout(exc):
                raise UpstreamTimeout(f"{_where(url)}: timed out") from exc
            raise UpstreamUnavailable(f"{_where(url)}: {reason(exc)}") from exc
        except requests.exceptions.RequestException as exc:
            raise UpstreamUnavailable(f"{_where(url)}: {reason(exc)}") from exc
        headers_out = [(k, _CONTROL.sub(" ", v)) for k, v in raw.raw.headers.items()
                       if _TOKEN.fullmatch(k)]
        return UpstreamResponse(raw.status_code, raw.reason or "", headers_out, raw, started)

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()
