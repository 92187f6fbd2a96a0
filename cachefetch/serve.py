"""Serve a committed blob as a first-class HTTP response.

``serve_from_store`` answers GET and HEAD for one blob: a strong ETag from its
hash, ``If-None-Match`` (304), a single byte ``Range`` (206/416) and the body
through ``wsgi.file_wrapper`` so gunicorn can ``sendfile`` it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator, Mapping

from werkzeug.http import parse_etags, parse_if_range_header, parse_range_header

from .store import CAFS, Blob, BlobNotFound
from .wsgi import StartResponse, WSGIEnviron, normalize_headers, plain_response  # noqa: F401  (re-exported)

__all__ = ["ServeOptions", "serve_from_store", "serve_blob_file", "etag_for", "normalize_headers", "plain_response"]

log = logging.getLogger("cachefetch.serve")

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

    def __post_init__(self) -> None:
        normalize_headers([("Content-Type", self.content_type)])
        if self.etag is not None:
            normalize_headers([("ETag", self.etag)])
        if not isinstance(self.status, str) or len(self.status) < 5 or not self.status[:3].isdigit():
            raise ValueError(f"status must look like '200 OK', got {self.status!r}")
        if isinstance(self.memory_limit, bool) or not isinstance(self.memory_limit, int) or self.memory_limit < 0:
            raise ValueError(f"memory_limit must be bytes >= 0, got {self.memory_limit!r}")
        object.__setattr__(self, "extra_headers", normalize_headers(self.extra_headers))


def etag_for(blob: Blob) -> str:
    """The strong ETag (quoted) of a blob: its hex hash."""
    return f'"{blob.hash.hex}"'


class _FileRange:
    """A file limited to ``length`` bytes from its current position.

    Keeps ``fileno`` so gunicorn's file_wrapper can ``sendfile`` it (it sends
    Content-Length bytes from the current offset); other servers ``read`` it.
    """

    __slots__ = ("_file", "_left")

    def __init__(self, file: BinaryIO, length: int) -> None:
        self._file = file
        self._left = length

    def fileno(self) -> int:
        return self._file.fileno()

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        if size is None or size < 0 or size > self._left:
            size = self._left
        data = self._file.read(size)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._file.close()


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


def _unquote_etag(etag: str) -> tuple[str, bool]:
    weak = etag.startswith(("W/", "w/"))
    return (etag[2:] if weak else etag).strip('"'), weak


def _byte_range(environ: WSGIEnviron, size: int, etag: str) -> tuple[int, int] | None | bool:
    """The ``(start, stop)`` a request asks for, ``None`` for all, ``False`` if unsatisfiable."""
    header = environ.get("HTTP_RANGE")
    if not header or environ.get("REQUEST_METHOD") != "GET":
        return None
    if_range = environ.get("HTTP_IF_RANGE")
    if if_range is not None:
        tag, weak = _unquote_etag(etag)
        # If-Range compares strongly: a weak validator never matches, ours or
        # the client's (werkzeug's parser drops the client's W/, so look first).
        if weak or _unquote_etag(if_range.strip())[1] or parse_if_range_header(if_range).etag != tag:
            return None  # the client's copy is another version: send it all
    if header.partition("=")[2].strip() == "-0":
        return False  # a zero-length suffix: werkzeug reads it as "0-"
    rng = parse_range_header(header)
    # Malformed, multi-range or other units: RFC 9110 lets us ignore the header.
    if rng is None or rng.units != "bytes" or len(rng.ranges) != 1:
        return None
    begin, end = rng.ranges[0]
    if begin < 0:  # suffix range: the last -begin bytes, all of them if shorter
        if size == 0 or end is not None:
            return False
        return max(0, size + begin), size
    if begin >= size:
        return False
    return begin, size if end is None else min(end, size)


def serve_from_store(environ: WSGIEnviron, start_response: StartResponse, store: CAFS,
                     result: Blob, opts: ServeOptions | None = None) -> Iterable[bytes]:
    """Answer the request in ``environ`` with blob ``result`` from ``store``.

    GET gets the body (through ``wsgi.file_wrapper`` when the server offers
    one); HEAD gets the same headers and no body; a matching ``If-None-Match``
    gets 304; one satisfiable byte ``Range`` gets 206 with ``Content-Range``
    (honouring ``If-Range``), an unsatisfiable one 416. A blob missing from
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
                    opts: ServeOptions | None = None) -> Iterable[bytes]:
    """:func:`serve_from_store` for a blob the caller has already opened.

    Takes ownership of ``file``: it is closed when the response is done.
    """
    opts = opts or ServeOptions()
    etag = opts.etag or etag_for(result)
    extra = [(k, v) for k, v in opts.extra_headers if k.lower() not in _CONTENT_HEADERS]
    conditional = opts.status.startswith("200")
    validators = [("ETag", etag), ("Accept-Ranges", "bytes")] if conditional else [("ETag", etag)]

    inm = environ.get("HTTP_IF_NONE_MATCH")
    if (conditional and inm and environ.get("REQUEST_METHOD") in ("GET", "HEAD")
            and parse_etags(inm).contains_weak(_unquote_etag(etag)[0])):
        file.close()
        start_response("304 Not Modified", validators + extra)
        return []

    size = os.fstat(file.fileno()).st_size
    if size != result.size:
        log.warning("blob %s is %d bytes, its result says %d", result.hash.hex, size, result.size)

    span = _byte_range(environ, size, etag) if conditional else None
    if span is False:
        file.close()
        start_response("416 Range Not Satisfiable",
                       [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")] + validators + extra)
        return []
    headers = [("Content-Type", opts.content_type)]
    if span is None:
        status, start, length = opts.status, 0, size
    else:
        start, stop = span
        status, length = "206 Partial Content", stop - start
        headers.append(("Content-Range", f"bytes {start}-{stop - 1}/{size}"))
    headers.append(("Content-Length", str(length)))
    start_response(status, headers + validators + extra)

    if environ.get("REQUEST_METHOD") == "HEAD":
        file.close()
        return []
    if length <= opts.memory_limit:
        with file:
            return [os.pread(file.fileno(), length, start)]
    if start:
        file.seek(start)
    body = _FileRange(file, length)
    wrapper = environ.get("wsgi.file_wrapper")
    if wrapper is not None:
        return wrapper(body, _BLOCK_SIZE)
    return _FileChunks(body)
