"""The seed's download contract: coalesce fetches into the store, then serve.

A :class:`Downloader` runs one fetch per key at a time; every caller for that
key gets the same :class:`Result` (the committed blob). :func:`handle_result`
turns the outcome of :meth:`Downloader.do` into a WSGI response.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable

from .serve import ServeOptions, StartResponse, WSGIEnviron, plain_response, serve_from_store
from .singleflight import Group, WaitTimeout
from .store import CAFS, Blob
from .stream import StreamThroughOptions, StreamThroughResult, stream_through

__all__ = [
    "Result", "Downloader", "HandleResultParams", "handle_result",
    "ServeOptions", "serve_from_store",
    "StreamThroughOptions", "StreamThroughResult", "stream_through", "WaitTimeout",
]

log = logging.getLogger("cachefetch.download")

#: What a download produces: the committed blob's hash and size.
Result = Blob


class Downloader:
    """Coalesces downloads by key.

    :param group: the :class:`~cachefetch.singleflight.Group` to run flights
        in; a new one (with its own executor) by default.
    """

    def __init__(self, group: Group[Result] | None = None) -> None:
        if group is not None and not isinstance(group, Group):
            raise TypeError(f"group must be a singleflight.Group, not {type(group).__name__}")
        self.group: Group[Result] = group if group is not None else Group()

    def do(self, key: Hashable, fn: Callable[[], Result], timeout: float | None = None) -> tuple[Result, bool]:
        """Run ``fn`` once for all concurrent callers of ``key``.

        ``fn`` runs on the group's executor, detached from every caller: a
        caller that times out does not cancel it.

        :returns: ``(result, shared)``.
        :raises WaitTimeout: this caller waited ``timeout`` seconds.
        :raises TypeError: ``fn`` returned something other than a
            :class:`Result` (raised in every caller).
        :raises BaseException: whatever ``fn`` raised, in every caller.
        """
        def checked() -> Result:
            result = fn()
            if not isinstance(result, Blob):
                raise TypeError(f"download function returned {type(result).__name__}, not a Result")
            return result

        return self.group.do(key, checked, timeout)

    def forget(self, key: Hashable) -> None:
        """Make the next :meth:`do` for ``key`` start a new download."""
        self.group.forget(key)


@dataclass
class HandleResultParams:
    """Everything :func:`handle_result` needs (the seed's ``HandleResultParams``).

    :param is_not_found: tells whether ``error`` means "no such object";
        ``None`` means no error is a not-found.
    :param not_found_handler: builds the not-found response instead of the
        default 404: called with no arguments, its return value is returned.
    """

    environ: WSGIEnviron
    start_response: StartResponse
    downloader: Downloader
    key: Hashable
    result: Result | None
    error: BaseException | None
    store: CAFS
    is_not_found: Callable[[BaseException], bool] | None = None
    not_found_handler: Callable[[], Iterable[bytes]] | None = None
    opts: ServeOptions = field(default_factory=ServeOptions)


def handle_result(params: HandleResultParams) -> Iterable[bytes]:
    """Answer a request from the outcome of :meth:`Downloader.do`.

    - not found: forget the key, then ``not_found_handler()`` or 404;
    - this caller's :class:`WaitTimeout`: 504, the key is *not* forgotten
      (the download goes on for the others);
    - any other ``TimeoutError`` (the upstream timed out): forget, 504;
    - any other error: forget, log, 502;
    - success: :func:`serve_from_store`.

    :raises ValueError: if neither or both of ``result`` and ``error`` are set.
    """
    p = params
    if (p.result is None) == (p.error is None):
        raise ValueError("HandleResultParams needs exactly one of result and error")
    if p.error is None:
        return serve_from_store(p.environ, p.start_response, p.store, p.result, p.opts)
    err = p.error
    if p.is_not_found is not None and p.is_not_found(err):
        p.downloader.forget(p.key)
        if p.not_found_handler is not None:
            return p.not_found_handler()
        return plain_response(p.start_response, "404 Not Found", "not found")
    if isinstance(err, WaitTimeout):
        log.info("gave up waiting for %r: %s", p.key, err)
        return plain_response(p.start_response, "504 Gateway Timeout", "timed out waiting for the download")
    p.downloader.forget(p.key)
    if isinstance(err, TimeoutError):
        log.warning("download of %r timed out: %s", p.key, err)
        return plain_response(p.start_response, "504 Gateway Timeout", "the upstream timed out")
    log.error("download of %r failed: %r", p.key, err)
    return plain_response(p.start_response, "502 Bad Gateway", f"download failed: {type(err).__name__}")
