"""Answer from a stored response: the replay layer.

``serve_blob_file`` answers GET and HEAD for one blob with its stored
status and fields: a validator (the origin's ETag, or a strong one from the
hash), the client's conditionals (304/412), a single byte ``Range``
(206/416), and the body through ``wsgi.file_wrapper`` so gunicorn can
``sendfile`` it. The decisions are :func:`cachefetch.policy.evaluate`'s.
``serve_from_store`` (the seed's contract, also importable from
:mod:`cachefetch.serve`) opens the blob first.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

from .policy.conditionals import Outcome, evaluate
from .store import CAFS, Blob, BlobNotFound
from .wsgi import StartResponse, WSGIEnviron, normalize_headers, plain_response  # noqa: F401  (re-exported)

__all__ = ["ServeOptions", "serve_from_store", "serve_blob_file", "whole_fields", "file_body", "fd_body", "etag_for",
           "normalize_headers", "plain_response"]

log = logging.getLogger("cachefetch.serve")  # the seed's logger name, kept for log configs

_BLOCK_SIZE = 1 << 16
_CONTENT_HEADERS = frozenset({"content-type", "content-length", "content-range", "accept-ranges", "etag"})


@dataclass(frozen=True)
class ServeOptions:
    """How to describe a blob on the wire.

    :param content_type: the ``Content-Type`` of every response body.
    :param extra_headers: more headers for every answer (mapping or pairs);
        ones that this module sets itself (Content-Type, Content-Length,
        Content-Range, Accept-Ranges, ETag) are ignored there.
    :param etag: the quoted ETag to send and match instead of the one made
        from the hash (a cache replays the origin's own validator); a weak
        one never satisfies ``If-Range``.
    :param status: the status to answer a full GET with. Anything but 200 is
        replayed as is: no Range, no 304.
    :param last_modified: the stored ``Last-Modified`` (for
        ``If-Modified-Since``, ``If-Unmodified-Since`` and a date ``If-Range``).
    :param memory_limit: bodies of at most this many bytes are read and sent
        from memory rather than through ``wsgi.file_wrapper``: for a small
        body, setting up ``sendfile`` costs more than the copy it saves.
    :raises TypeError, ValueError: as :func:`normalize_headers`, or for a
        status that is not ``"NNN reason"``.
    """

    content_type: str = "application/octet-stream"
    extra_headers: Mapping[str, str] | Iterable[tuple[str, str]] = field(default_factory=dict)
    etag: str | None = None
    status: str = "200 OK"
    memory_limit: int = 0
    last_modified: str | None = None
    # extra_headers less the fields this module sets itself: worked out once, not per answer.
    _extra: tuple[tuple[str, str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        normalize_headers([("Content-Type", self.content_type)])
        if self.etag is not None:
            normalize_headers([("ETag", self.etag)])
        if not isinstance(self.status, str) or len(self.status) < 5 or not self.status[:3].isdigit():
            raise ValueError(f"status must look like '200 OK', got {self.status!r}")
        if isinstance(self.memory_limit, bool) or not isinstance(self.memory_limit, int) or self.memory_limit < 0:
            raise ValueError(f"memory_limit must be bytes >= 0, got {self.memory_limit!r}")
        object.__setattr__(self, "extra_headers", normalize_headers(self.extra_headers))
        object.__setattr__(self, "_extra", tuple((k, v) for k, v in self.extra_headers
                                                 if k.lower() not in _CONTENT_HEADERS))


_DEFAULT_OPTIONS = ServeOptions()


def etag_for(blob: Blob) -> str:
    """The strong ETag (quoted) of a blob: its hex hash."""
    return f'"{blob.hash.hex}"'


def _validators(opts: ServeOptions, etag: str) -> list[tuple[str, str]]:
    """ETag always; Accept-Ranges only where a Range is honoured (a replayed 200)."""
    return [("ETag", etag), ("Accept-Ranges", "bytes")] if opts.status.startswith("200") else [("ETag", etag)]


def whole_fields(opts: ServeOptions, etag: str, size: int) -> list[tuple[str, str]]:
    """The fields :func:`serve_blob_file` answers a whole body of ``size``
    bytes with (status ``opts.status``), before the per-answer ``added`` ones."""
    return [("Content-Type", opts.content_type), ("Content-Length", str(size)), *_validators(opts, etag),
            *opts._extra]


class _FileRange:
    """``length`` bytes of an open file from its current position: ``fileno``
    so gunicorn's file_wrapper can ``sendfile`` it (it sends Content-Length
    bytes from the current offset), ``read`` for other servers.

    :param fd: the file's descriptor.
    :param read: reads up to n bytes at the file's position (a file
        object's ``read``, or ``os.read`` on a bare descriptor).
    :param close: closes the file; called once, by :meth:`close` or else on
        collection (a server or middleware that breaks PEP 3333 must not
        leak the descriptor, and a second call must not close a number the
        process has since given to another file).
    """

    __slots__ = ("_fd", "_read", "_close", "_left")

    def __init__(self, fd: int, read: Callable[[int], bytes], close: Callable[[], None], length: int) -> None:
        self._fd, self._read, self._close, self._left = fd, read, close, length

    def fileno(self) -> int:
        return self._fd

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        if size is None or size < 0 or size > self._left:
            size = self._left
        data = self._read(size)
        self._left -= len(data)
        if not data:
            self._left = 0  # the file ended early: no more to read
        return data

    def close(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            close()

    def __del__(self) -> None:
        self.close()


class _FileChunks:
    """A ``_FileRange`` as a WSGI iterable; ``close()`` closes the file even
    if iteration never started (a client that left before the body)."""

    def __init__(self, file: _FileRange) -> None:
        self._file = file

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self._file.read(_BLOCK_SIZE):
            yield chunk
        self._file.close()

    def close(self) -> None:
        self._file.close()


def serve_from_store(environ: WSGIEnviron, start_response: StartResponse, store: CAFS,
                     result: Blob, opts: ServeOptions | None = None) -> Iterable[bytes]:
    """Answer the request in ``environ`` with blob ``result`` from ``store``.

    GET gets the body (through ``wsgi.file_wrapper`` when the server offers
    one); HEAD gets the same headers and no body; a matching ``If-None-Match``
    (or an ``If-Modified-Since`` the stored ``Last-Modified`` satisfies) gets
    304; a failing ``If-Match``/``If-Unmodified-Since`` 412; one satisfiable
    byte ``Range`` gets 206 with ``Content-Range`` (honouring ``If-Range``),
    an unsatisfiable one 416. A blob missing from
    the store is logged and answered with 500.

    :raises TypeError: if ``store`` is not a :class:`CAFS` or ``result`` not a
        :class:`Blob`.
    """
    if not isinstance(store, CAFS):
        raise TypeError(f"store must be a CAFS, not {type(store).__name__}")
    if not isinstance(result, Blob):
        raise TypeError(f"result must be a Blob/Result, not {type(result).__name__}")
    try:
        file = store.open(result.hash, buffered=False)
    except BlobNotFound:
        log.error("blob %s is in the index but not in the store %s", result.hash.hex, store.root)
        return plain_response(start_response, "500 Internal Server Error", "cached object is missing from the store")
    return serve_blob_file(environ, start_response, file, result, opts)


def serve_blob_file(environ: WSGIEnviron, start_response: StartResponse, file: BinaryIO, result: Blob,
                    opts: ServeOptions | None = None, added: Iterable[tuple[str, str]] = ()) -> Iterable[bytes]:
    """:func:`serve_from_store` for a blob the caller has already opened.

    Takes ownership of ``file``: it is closed when the response is done.
    ``added`` are header fields for this answer only, after ``opts``'s
    ``extra_headers`` (so one ``opts`` can serve many answers, e.g. each
    with its own ``Age``); checked as :func:`normalize_headers` does.

    :raises TypeError, ValueError: for a bad field in ``added`` (``file`` is then closed).
    """
    opts = opts or _DEFAULT_OPTIONS
    etag = opts.etag or etag_for(result)
    try:
        own = [(k, v) for k, v in normalize_headers(added) if k.lower() not in _CONTENT_HEADERS]
    except BaseException:
        file.close()
        raise
    validators = _validators(opts, etag)
    extra = list(opts._extra) + own
    size = os.fstat(file.fileno()).st_size
    if size != result.size:
        log.warning("blob %s is %d bytes, its result says %d", result.hash.hex, size, result.size)

    answer = evaluate(environ, status=int(opts.status[:3]), etag=etag, last_modified=opts.last_modified, size=size)
    if answer.outcome is Outcome.NOT_MODIFIED:
        file.close()
        start_response("304 Not Modified", validators + extra)
        return []
    if answer.outcome is Outcome.PRECONDITION_FAILED:
        file.close()
        start_response("412 Precondition Failed", [("Content-Length", "0")] + validators + extra)
        return []
    if answer.outcome is Outcome.UNSATISFIABLE:
        file.close()
        start_response("416 Range Not Satisfiable",
                       [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")] + validators + extra)
        return []
    if answer.outcome is Outcome.PARTIAL:
        start, length = answer.start, answer.stop - answer.start
        start_response("206 Partial Content",
                       [("Content-Type", opts.content_type),
                        ("Content-Range", f"bytes {answer.start}-{answer.stop - 1}/{size}"),
                        ("Content-Length", str(length))] + validators + extra)
    else:
        start, length = 0, size
        start_response(opts.status, whole_fields(opts, etag, size) + own)

    if environ.get("REQUEST_METHOD") == "HEAD":
        file.close()
        return []
    if length <= opts.memory_limit:
        with file:
            return [os.pread(file.fileno(), length, start)]
    if start:
        file.seek(start)
    return file_body(environ, file, length)


def file_body(environ: WSGIEnviron, file: BinaryIO, length: int) -> Iterable[bytes]:
    """``length`` bytes of ``file`` from its current position as a WSGI body:
    the server's ``wsgi.file_wrapper`` (gunicorn ``sendfile``s it) when it
    offers one, else chunks read in turn. Takes ownership of ``file``."""
    return _range_body(environ, _FileRange(file.fileno(), file.read, file.close, length))


def fd_body(environ: WSGIEnviron, fd: int, length: int) -> Iterable[bytes]:
    """:func:`file_body` for a bare descriptor (opened with ``os.open``): the
    same body, without the file object (and the ``fstat`` that builds it).
    Takes ownership of ``fd``."""
    return _range_body(environ, _FileRange(fd, functools.partial(os.read, fd), functools.partial(os.close, fd),
                                           length))


def _range_body(environ: WSGIEnviron, body: _FileRange) -> Iterable[bytes]:
    wrapper = environ.get("wsgi.file_wrapper")
    if wrapper is not None:
        return wrapper(body, _BLOCK_SIZE)
    return _FileChunks(body)
