"""Stream-through: send a body to the client while caching it, in one pass.

:func:`stream_through` returns the WSGI iterable a server consumes: every
upstream chunk is written to a temp file, fed to the BLAKE3 hasher (and any
extra hashers) and yielded to the client. When the body is complete and of
the announced length, ``on_complete(result, tmp_path)`` takes the temp file
(:class:`Committer` renames it into a :class:`~cachefetch.store.CAFS`).

Temp-file lifecycle: it is deleted when the stream fails, when the client
disconnects before the end (unless ``finish_on_disconnect``), and when
``on_complete`` raises; once ``on_complete`` returns, it is the callee's.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from .hashing import Hash, Hasher
from .logutil import warn_limited
from .wsgi import StartResponse, WSGIEnviron, normalize_headers, plain_response
from .wsgi import close_quietly as _close_quietly
from .store import CAFS, Blob

__all__ = ["StreamThroughOptions", "StreamThroughResult", "stream_through", "Committer", "UpstreamError",
           "LengthMismatch", "CacheAbandoned"]

log = logging.getLogger("cachefetch.stream")

_READ_SIZE = 1 << 18


class SupportsUpdate(Protocol):
    def update(self, data: bytes, /) -> Any: ...


class UpstreamError(Exception):
    """The upstream body failed after the response had started."""


class LengthMismatch(UpstreamError):
    """The upstream sent more or fewer bytes than ``content_length``."""


class CacheAbandoned(Exception):
    """Caching stopped for a reason on the cache's side (size limit, disk
    error); the client still gets the whole body."""


@dataclass(frozen=True, slots=True)
class StreamThroughResult:
    """What a completed stream produced: the body's hash and size."""

    hash: Hash
    size: int


@dataclass(frozen=True)
class StreamThroughOptions:
    """How :func:`stream_through` answers and what it checks.

    :param content_type: the response's ``Content-Type``.
    :param extra_headers: more response headers (mapping or pairs).
    :param content_length: the expected body length, sent as
        ``Content-Length`` and enforced; ``-1`` if unknown.
    :param extra_hashers: objects with ``update(bytes)`` fed every chunk
        (e.g. ``hashlib.sha256()`` to check a digest the protocol knows).
    :param temp_dir: where the temp file goes; use the store's ``temp_dir``
        so committing is a rename. Default: the system temp dir.
    :param temp_prefix: the temp file's name starts with this (a file name
        part, no separators), so its owner can find it after a crash.
    :param status: the response status line.
    :param max_size: stop caching past this many bytes (the client still gets
        the whole body; ``on_abort`` is told); ``None`` for no limit.
    :param finish_on_disconnect: when the client goes away early, keep reading
        the upstream into the temp file on a background thread (up to
        ``max_size``) and complete as usual, instead of discarding.
    :param on_start: called with the temp path once it exists, before the
        upstream is read (so others can follow the file as it grows). If it
        raises :class:`CacheAbandoned`, the body streams on uncached.
    :param on_abort: called with the reason (an exception) when the temp file
        is discarded for any reason but a HEAD request.
    :raises TypeError, ValueError: on an option of the wrong type or range.
    """

    content_type: str = "application/octet-stream"
    extra_headers: Mapping[str, str] | Iterable[tuple[str, str]] = field(default_factory=dict)
    content_length: int = -1
    extra_hashers: Sequence[SupportsUpdate] = ()
    temp_dir: str | os.PathLike[str] | None = None
    temp_prefix: str = "cf-"
    status: str = "200 OK"
    max_size: int | None = None
    finish_on_disconnect: bool = False
    on_start: Callable[[str], None] | None = None
    on_abort: Callable[[BaseException], None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_headers", normalize_headers(self.extra_headers))
        normalize_headers([("Content-Type", self.content_type)])
        if not isinstance(self.content_length, int) or self.content_length < -1:
            raise ValueError(f"content_length must be an int >= -1, got {self.content_length!r}")
        if self.max_size is not None and (not isinstance(self.max_size, int) or self.max_size < 0):
            raise ValueError(f"max_size must be an int >= 0 or None, got {self.max_size!r}")
        if not isinstance(self.status, str) or not self.status[:3].isdigit() or len(self.status) < 4:
            raise ValueError(f"status must look like '200 OK', got {self.status!r}")
        if not isinstance(self.temp_prefix, str) or os.sep in self.temp_prefix or "\0" in self.temp_prefix:
            raise ValueError(f"temp_prefix must be a file name part, got {self.temp_prefix!r}")
        hashers = tuple(self.extra_hashers)
        for h in hashers:
            if not callable(getattr(h, "update", None)):
                raise TypeError(f"extra hasher {h!r} has no update(bytes)")
        object.__setattr__(self, "extra_hashers", hashers)


def _chunks(upstream: Iterable[bytes] | BinaryIO) -> Iterator[bytes]:
    read = getattr(upstream, "read", None)
    if callable(read):
        return iter(lambda: read(_READ_SIZE), b"")
    return iter(upstream)


class _Tee:
    """The WSGI iterable: yield each chunk after it is in the temp file."""

    def __init__(self, upstream: Iterable[bytes] | BinaryIO, opts: StreamThroughOptions,
                 on_complete: Callable[[StreamThroughResult, str], Any]) -> None:
        self._upstream = upstream
        self._chunks = _chunks(upstream)
        self._opts = opts
        self._on_complete = on_complete
        self._hasher = Hasher()
        self._hashers = (self._hasher, *opts.extra_hashers)
        temp_dir = os.fspath(opts.temp_dir) if opts.temp_dir is not None else None
        fd, self.temp_path = tempfile.mkstemp(prefix=opts.temp_prefix, suffix=".part", dir=temp_dir)
        self._file: BinaryIO | None = os.fdopen(fd, "wb", buffering=0)
        self.size = 0  # bytes sent upstream-to-client so far
        self._finished = False
        self._pending: bytes | None = None  # the first chunk, read before the response starts

    # -- caching side ----------------------------------------------------

    def _abandon(self, reason: BaseException) -> None:
        """Stop caching: drop the temp file, tell ``on_abort``."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        _unlink(self.temp_path)
        if self._opts.on_abort is not None:
            try:
                self._opts.on_abort(reason)
            except Exception:
                log.exception("on_abort failed")

    def _take(self, chunk: bytes) -> None:
        """Account for one chunk: length check, temp file, hashers."""
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"upstream yielded {type(chunk).__name__}, not bytes")
        self.size += len(chunk)
        limit = self._opts.content_length
        if limit >= 0 and self.size > limit:
            raise LengthMismatch(f"upstream sent more than the {limit} bytes it announced")
        if self._file is None:
            return
        if self._opts.max_size is not None and self.size > self._opts.max_size:
            self._abandon(CacheAbandoned(f"body exceeds max_size {self._opts.max_size}"))
            return
        try:
            # A raw write may take only part (a nearly full disk): the rest must
            # follow, or the file would not be what the hash names.
            view = memoryview(chunk)
            while view:
                view = view[self._file.write(view):]
        except OSError as exc:  # a full disk must not cost the client its body
            warn_limited(log, "temp-write", "not caching: writing %s failed: %s", self.temp_path, exc)
            self._abandon(CacheAbandoned(f"writing the temp file failed: {exc}"))
            return
        for h in self._hashers:
            h.update(chunk)

    def _finish(self) -> None:
        """Upstream exhausted: check the length, hand the temp file over."""
        self._finished = True
        _close_quietly(self._upstream)
        limit = self._opts.content_length
        if limit >= 0 and self.size != limit:
            raise LengthMismatch(f"upstream sent {self.size} bytes, announced {limit}")
        if self._file is None:
            return
        self._file.close()
        self._file = None
        result = StreamThroughResult(self._hasher.finalize(), self._hasher.size)
        try:
            self._on_complete(result, self.temp_path)
        except Exception as exc:
            log.exception("on_complete failed for %s; discarding it", self.temp_path)
            _unlink(self.temp_path)
            if self._opts.on_abort is not None:
                self._opts.on_abort(exc)

    def _fail(self, exc: BaseException) -> None:
        self._finished = True
        _close_quietly(self._upstream)
        self._abandon(exc)

    # -- start -----------------------------------------------------------

    def read_first(self) -> None:
        """Read and store the first chunk (so a dead upstream can still get a 502)."""
        for chunk in self._chunks:
            self._take(chunk)
            if chunk:
                self._pending = bytes(chunk)
                return
        self._pending = b""
        self._finish_safely()

    def _finish_safely(self) -> None:
        try:
            self._finish()
        except BaseException as exc:
            self._fail(exc)
            raise

    # -- WSGI iterable ---------------------------------------------------

    def __iter__(self) -> "_Tee":
        return self

    def __next__(self) -> bytes:
        if self._pending is not None:
            chunk, self._pending = self._pending, None
            if chunk:
                return chunk
        if self._finished:
            raise StopIteration
        try:
            for chunk in self._chunks:
                self._take(chunk)
                if chunk:
                    return bytes(chunk) if not isinstance(chunk, bytes) else chunk
        except BaseException as exc:
            log.error("upstream failed after %d bytes: %r", self.size, exc)
            self._fail(exc)
            raise UpstreamError(f"upstream failed after {self.size} bytes: {exc!r}") from exc
        try:
            self._finish()
        except LengthMismatch as exc:
            log.error("%s; not caching", exc)
            self._fail(exc)
            raise
        raise StopIteration

    def close(self) -> None:
        """Called by the server when it is done; early means the client left."""
        if self._finished:
            return
        if self._opts.finish_on_disconnect and self._file is not None:
            self._finished = True
            threading.Thread(target=self._drain, name="cachefetch-detached", daemon=False).start()
            return
        log.info("client left after %d bytes; not caching", self.size)
        self._fail(ConnectionAbortedError("client disconnected before the end of the body"))

    def _drain(self) -> None:
        """Finish reading the upstream with no client (on a background thread)."""
        try:
            for chunk in self._chunks:
                self._take(chunk)
                if self._file is None:  # max_size or disk: nothing left to cache
                    _close_quietly(self._upstream)
                    self._finished = True
                    return
            self._finish()
        except BaseException as exc:
            log.warning("detached fetch failed after %d bytes: %r", self.size, exc)
            self._fail(exc)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def stream_through(environ: WSGIEnviron, start_response: StartResponse,
                   upstream: Iterable[bytes] | BinaryIO, opts: StreamThroughOptions,
                   on_complete: Callable[[StreamThroughResult, str], Any]) -> Iterable[bytes]:
    """Answer with ``upstream``'s bytes while caching them in one pass.

    The first chunk is read before the response starts: an upstream that fails
    then gets a 502 (nothing cached). Later failures, and a length different
    from ``opts.content_length``, make the iterable raise, so the server drops
    the connection and the client never sees a complete-looking body. HEAD
    gets the headers only and the upstream is not read.

    :returns: a WSGI iterable with ``close()``; it also has ``temp_path``.
    :raises TypeError: if ``opts`` is not a :class:`StreamThroughOptions` or
        ``on_complete`` is not callable.
    """
    if not isinstance(opts, StreamThroughOptions):
        raise TypeError(f"opts must be StreamThroughOptions, not {type(opts).__name__}")
    if not callable(on_complete):
        raise TypeError("on_complete must be callable")
    headers = [("Content-Type", opts.content_type)]
    if opts.content_length >= 0:
        headers.append(("Content-Length", str(opts.content_length)))
    headers.extend(opts.extra_headers)
    if environ.get("REQUEST_METHOD") == "HEAD":
        _close_quietly(upstream)
        start_response(opts.status, headers)
        return []
    tee = _Tee(upstream, opts, on_complete)
    if opts.on_start is not None:
        try:
            opts.on_start(tee.temp_path)
        except CacheAbandoned as exc:  # stream on, uncached
            tee._abandon(exc)
        except BaseException:
            tee._fail(RuntimeError("on_start failed"))
            raise
    try:
        tee.read_first()
    except Exception as exc:
        log.error("upstream failed before the first byte: %r", exc)
        tee._fail(exc)
        return plain_response(start_response, "502 Bad Gateway", "the upstream failed before sending a byte")
    except BaseException as exc:  # not ours to answer, but the temp file is ours to remove
        tee._fail(exc)
        raise
    start_response(opts.status, headers)
    return tee


class Committer:
    """The usual ``on_complete``: commit temp files into ``store`` in the background.

    Commits run on a small executor with ``trusted=True``: the tee hashed the
    bytes as it wrote them, so the file is renamed without being read again.

    :param store: the :class:`CAFS` to commit into.
    :param workers: commit threads (commits are mostly fsync waits).
    """

    def __init__(self, store: CAFS, workers: int = 2) -> None:
        if not isinstance(store, CAFS):
            raise TypeError(f"store must be a CAFS, not {type(store).__name__}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError("workers must be an int >= 1")
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cachefetch-commit")
        self._lock = threading.Lock()
        self._pending: set[Future[Blob]] = set()

    @property
    def temp_dir(self) -> str:
        """The store's temp dir: pass it as ``StreamThroughOptions.temp_dir``."""
        return self.store.temp_dir

    def __call__(self, result: StreamThroughResult, tmp_path: str) -> None:
        """Queue ``tmp_path`` for commit as ``result.hash`` (the ``on_complete`` signature)."""
        self.submit(result, tmp_path)

    def submit(self, result: StreamThroughResult, tmp_path: str,
               callback: Callable[[Blob | None, BaseException | None], Any] | None = None) -> Future[Blob]:
        """Queue a commit; ``callback(blob, error)`` runs on the commit thread after it.

        A failed commit is logged and its temp file removed.
        :raises RuntimeError: after :meth:`shutdown`.
        """
        if not isinstance(result, (StreamThroughResult, Blob)):
            raise TypeError(f"result must be a StreamThroughResult, not {type(result).__name__}")

        def run() -> Blob:
            blob, error = None, None
            try:
                blob = self.store.commit(tmp_path, result.hash, trusted=True)
                return blob
            except BaseException as exc:
                error = exc
                log.error("commit of %s as %s failed: %r", tmp_path, result.hash.hex, exc)
                _unlink(tmp_path)
                raise
            finally:
                if callback is not None:
                    try:
                        callback(blob, error)
                    except Exception:
                        log.exception("commit callback failed")

        with self._lock:
            future = self._executor.submit(run)
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future[Blob]) -> None:
        with self._lock:
            self._pending.discard(future)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every commit queued so far has finished.

        :raises TimeoutError: if ``timeout`` seconds pass first.
        """
        with self._lock:
            pending = list(self._pending)
        _, not_done = wait(pending, timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} commits still pending")

    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting commits; with ``wait``, finish the queued ones first."""
        self._executor.shutdown(wait=wait)
