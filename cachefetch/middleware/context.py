"""What every path of the middleware shares: a typed record, and small WSGI helpers."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .. import policy
from ..flights import FlightsSeam
from ..index import Entry, Index
from ..policy import CacheRules, CacheStatus
from ..store import CAFS
from ..stream import Committer
from ..wsgi import StartResponse, WSGIEnviron, close_quietly

__all__ = ["FetchBounds", "Context", "AppResponse", "call_app", "Prepended", "close_quietly", "Retry", "respond",
           "passthrough", "without_conditionals"]

log = logging.getLogger("cachefetch.middleware")

WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]

# The cache answers these itself; what it fetches must be the whole response.
_CONDITIONAL = frozenset({"HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_MATCH",
                          "HTTP_IF_UNMODIFIED_SINCE", "HTTP_RANGE", "HTTP_IF_RANGE"})


@dataclass(frozen=True)
class FetchBounds:
    """Bounds on every fetch, whether or not a client still reads it.

    :param total: seconds a fetch may take in all; ``None``: no limit.
    :param idle: seconds without a byte from the app/upstream.
    :param detached: fetches no client reads any more that a process keeps going.
    """

    total: float | None = 3600.0
    idle: float | None = 60.0
    detached: int = 64


@dataclass
class Context:
    """The parts and options one :class:`~cachefetch.CacheFetch` carries out its plans with.

    Set once at construction; the parts are thread-safe.
    """

    app: WSGIApp
    store: CAFS
    index: Index
    flights: FlightsSeam
    committer: Committer
    rules: CacheRules
    key: Callable[[WSGIEnviron], str | None]
    clock: Callable[[], float]
    wait_timeout: float
    on_wait_timeout: str
    max_object_size: int | None
    record_use: Callable[[Entry], None] = field(default=lambda entry: None)
    bounds: FetchBounds = field(default_factory=FetchBounds)
    status_field: bool = True  # send Cache-Status (it is always left in the environ)

    def respond(self, environ: WSGIEnviron, start_response: StartResponse, status: CacheStatus) -> StartResponse:
        """:func:`respond`, with this middleware's choice of sending ``Cache-Status``."""
        return respond(environ, start_response, status, self.status_field)


class Retry(Exception):
    """The flight we followed ended without an answer for us: plan again.

    :param flight: follow or lead this flight key instead (our variant differs).
    :param refreshed: the flight refreshed the stored response: serve it as it is now.
    :param settled: the flight ended normally (its entry is in the index), so
        even a request that cannot lead (a HEAD) may plan again.
    """

    def __init__(self, flight: str | None = None, refreshed: bool = False, settled: bool = False) -> None:
        super().__init__(flight)
        self.flight = flight
        self.refreshed = refreshed
        self.settled = settled or refreshed


@dataclass
class AppResponse:
    """What the app answered: status line, fields, body, and when (epoch seconds)."""

    status: str
    headers: list[tuple[str, str]]
    body: Iterable[bytes]
    request_time: float
    response_time: float

    @property
    def code(self) -> int:
        return int(self.status[:3])

    def close(self) -> None:
        close_quietly(self.body)


def without_conditionals(environ: WSGIEnviron, extra: dict[str, str] | None = None) -> WSGIEnviron:
    """A copy of ``environ`` without the client's conditionals and Range, plus ``extra``."""
    app_environ = {k: v for k, v in environ.items() if k not in _CONDITIONAL}
    if extra:
        app_environ.update(extra)
    return app_environ


def call_app(app: WSGIApp, environ: WSGIEnviron, clock: Callable[[], float]) -> AppResponse:
    """Call ``app`` and wait for its status and fields (an app may call
    ``start_response`` on its first chunk, or use the legacy ``write()``).

    :raises RuntimeError: if the app returns without calling ``start_response``.
    :raises: whatever the app raises.
    """
    started: list[Any] = []
    written: list[bytes] = []

    def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, list(headers)]
        return written.append  # the legacy write(): buffered before the body

    request_time = clock()
    body: Iterable[bytes] = app(environ, capture)
    if not started:
        chunks = iter(body)
        try:
            first = next(chunks, b"")
        except BaseException:
            close_quietly(body)
            raise
        body = Prepended([first], chunks, body)
    if not started:
        close_quietly(body)
        raise RuntimeError("the WSGI app returned without calling start_response")
    if written:
        body = Prepended(written, iter(body), body)
    return AppResponse(started[0], started[1], body, request_time, clock())


class Prepended:
    """``head`` chunks, then ``rest``; ``close()`` closes ``owner`` (PEP 3333).

    A ``rest`` that offers ``sendfile_spans()`` (a fill's or a journal's
    reader of the body file) is offered as such, after ``head``, to a server
    that can send file spans without copying them through Python (cachefetch's
    worker).
    """

    def __init__(self, head: list[bytes], rest: Iterable[bytes], owner: object) -> None:
        self._head = head
        self._chunks = itertools.chain(head, rest)
        self._rest = rest
        self._owner = owner
        if callable(getattr(rest, "sendfile_spans", None)):
            self.sendfile_spans = self._spans

    def _spans(self) -> Iterator[tuple[int, int, int] | bytes]:
        yield from self._head
        yield from self._rest.sendfile_spans()  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        close_rest = getattr(self._rest, "close", None)
        if close_rest is not None and self._rest is not self._owner:
            close_rest()
        close_quietly(self._owner)


def respond(environ: WSGIEnviron, start_response: StartResponse, status: CacheStatus,
            field: bool = True) -> StartResponse:
    """A ``start_response`` that adds ``Cache-Status`` (unless ``field`` is
    false) and leaves ``status`` in the environ (``cachefetch.cache_status``)
    for metrics and logs."""
    environ[policy.ENVIRON_KEY] = status
    if not field:
        return start_response

    def start(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return start_response(line, list(headers) + [CacheStatus.header(status)], exc_info)

    return start


def passthrough(ctx: Context, environ: WSGIEnviron, start_response: StartResponse,
                status: CacheStatus) -> Iterable[bytes]:
    """Call the app without caching, telling the client why in Cache-Status."""
    return ctx.app(environ, ctx.respond(environ, start_response, status))
