"""The decoupled fetch: one body pulled into a temp file at the upstream's pace.

A :class:`Fill` reads its upstream on a thread of its own ("cachefetch-fill"),
writing each chunk to a temp file under the store and feeding the hashers,
however fast or slow its clients read: each local client is a
:class:`FillReader` of the growing file, at its own pace (a leader's client
that stops reading holds nobody up; nginx and Varnish fetch the same way).
Readers in other processes follow the same file through the flight journal.

When writing the temp file fails (a full disk) the fill stops caching but not
serving: later chunks are kept in memory for the local readers, up to a bound
past which the fill waits for the slowest of them.

Bounds: a fill ends (failed, nothing stored) after ``total_timeout`` seconds,
after ``idle_timeout`` seconds without a byte, and as soon as it is not
caching and has no reader left. :data:`FILLS` counts the fills of this
process that no local client reads any more; past ``max_detached`` of them a
fill whose last reader leaves is abandoned.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from .hashing import Hasher
from .logutil import warn_limited
from .stream import CacheAbandoned, LengthMismatch, StreamThroughResult, UpstreamError
from .wsgi import close_quietly

__all__ = ["Fill", "FillOptions", "FillReader", "FillFailed", "FILLS"]

log = logging.getLogger("cachefetch.fill")

_READ_SIZE = 1 << 18
# Degraded (uncached) mode keeps at most this many bytes in memory for readers.
_MEMORY_LIMIT = 8 << 20


class FillFailed(UpstreamError):
    """The fill ended before the whole body arrived (the upstream failed, a bound was hit)."""


@dataclass(frozen=True)
class FillOptions:
    """How a :class:`Fill` stores and bounds its body.

    :param temp_dir: where the temp file goes (the store's ``tmp/``).
    :param temp_prefix: the temp file's name prefix (the flight's).
    :param content_length: the announced length, enforced; -1 if unknown.
    :param max_size: stop caching past this many bytes; ``None``: no limit.
    :param extra_hashers: more ``update(bytes)`` objects fed every chunk.
    :param total_timeout: seconds the whole fetch may take; ``None``: no limit.
    :param idle_timeout: seconds without a byte before the fetch is given up.
    :param max_detached: fills with no local reader this process keeps going.
    :raises ValueError: on a negative bound.
    """

    temp_dir: str
    temp_prefix: str = "cf-"
    content_length: int = -1
    max_size: int | None = None
    extra_hashers: Sequence[Any] = ()
    total_timeout: float | None = None
    idle_timeout: float | None = None
    max_detached: int = 64

    def __post_init__(self) -> None:
        for name in ("total_timeout", "idle_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
        if self.max_detached < 0:
            raise ValueError("max_detached must be >= 0")


class _Registry:
    """The fills of this process, for the watchdog and the detached count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fills: set[Fill] = set()  # guarded by _lock
        self._watchdog: threading.Thread | None = None  # guarded by _lock

    def add(self, fill: "Fill") -> None:
        with self._lock:
            self._fills.add(fill)
            if self._watchdog is None or not self._watchdog.is_alive():
                self._watchdog = threading.Thread(target=self._watch, name="cachefetch-fill-watchdog", daemon=True)
                self._watchdog.start()

    def discard(self, fill: "Fill") -> None:
        with self._lock:
            self._fills.discard(fill)

    def detached(self) -> int:
        """How many running fills no local client reads."""
        with self._lock:
            return sum(1 for f in self._fills if f.detached)

    def _watch(self) -> None:
        # It ends once no fill is left (the next add starts another), so a
        # process that filled once does not keep a thread waking twice a
        # second for the rest of its life, taking the GIL from its hits.
        while True:
            time.sleep(0.5)
            with self._lock:
                fills = list(self._fills)
                if not fills:
                    self._watchdog = None
                    return
            for fill in fills:
                fill.check_bounds()


#: This process's fills.
FILLS = _Registry()


class Fill:
    """One body pulled into a temp file on its own thread (see the module doc).

    ``on_start(temp_path)`` runs on the calling thread in :meth:`start`;
    ``on_complete(result, temp_path)`` and ``on_abort(exc)`` run on the fill
    thread (or the watchdog's, for a bound); the temp file is the callee's
    once ``on_complete`` returns, and removed in every other case.
    """

    def __init__(self, upstream: Iterable[bytes], opts: FillOptions,
                 on_start: Callable[[str], None] | None,
                 on_complete: Callable[[StreamThroughResult, str], Any],
                 on_abort: Callable[[BaseException], None] | None) -> None:
        self._upstream = upstream
        self._opts = opts
        self._on_start, self._on_complete, self._on_abort = on_start, on_complete, on_abort
        self._hasher = Hasher()
        self._hashers = (self._hasher, *opts.extra_hashers)
        self._cond = threading.Condition()
        # All guarded by _cond:
        self._written = 0            # bytes in the temp file
        self._received = 0           # bytes from the upstream
        self._memory: list[tuple[int, bytes]] = []  # (offset, chunk) past a failed write
        self._memory_bytes = 0
        self._state = "running"      # "running", "failing" (journalling it), "done", "failed"
        self._error: BaseException | None = None
        self._positions: dict[int, int] = {}  # reader id -> next offset it needs
        self._had_reader = False
        self._last_byte = time.monotonic()
        self._file: BinaryIO | None = None
        self.temp_path = ""
        self._started = time.monotonic()
        self._aborted = False

    # -- the request thread -------------------------------------------------

    def start(self, start: int = 0, stop: int | None = None,
              first_byte_deadline: float | None = None) -> "FillReader":
        """Create the temp file, tell ``on_start``, start reading the upstream,
        and return the first reader (the leader's client), of ``[start, stop)``.

        A temp file that cannot be created, or an ``on_start`` that raises
        :class:`CacheAbandoned`, leaves the fill serving uncached.
        Any other exception from ``on_start`` propagates (nothing is started).
        """
        try:
            try:
                fd, self.temp_path = tempfile.mkstemp(prefix=self._opts.temp_prefix, suffix=".part",
                                                      dir=self._opts.temp_dir)
            except FileNotFoundError:  # the store's tmp/ was removed: recreate it, once
                os.makedirs(self._opts.temp_dir, exist_ok=True)
                fd, self.temp_path = tempfile.mkstemp(prefix=self._opts.temp_prefix, suffix=".part",
                                                      dir=self._opts.temp_dir)
            self._file = os.fdopen(fd, "wb", buffering=0)
            if self._on_start is not None:
                self._on_start(self.temp_path)
        except (OSError, CacheAbandoned) as exc:
            warn_limited(log, "fill-start", "not caching: %s", exc)
            self._stop_caching(exc if isinstance(exc, CacheAbandoned) else CacheAbandoned(str(exc)))
        except BaseException:
            self._stop_caching(RuntimeError("on_start failed"))
            close_quietly(self._upstream)
            raise
        first = self.reader(start, stop, first_byte_deadline)
        FILLS.add(self)
        threading.Thread(target=self._run, name="cachefetch-fill", daemon=True).start()
        return first

    def wait_first(self, timeout: float | None = None) -> bool:
        """Wait for the first byte or the end; ``False`` if the fill failed before a byte."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._received == 0 and self._state in ("running", "failing"):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return True  # still running: the readers' own deadline applies
                self._cond.wait(left)
            return not (self._state == "failed" and self._received == 0)

    @property
    def error(self) -> BaseException | None:
        with self._cond:
            return self._error

    @property
    def caching(self) -> bool:
        """Whether the body is still being written to the temp file."""
        return self._file is not None

    @property
    def detached(self) -> bool:
        """Running, caching, and read by no local client any more."""
        with self._cond:
            return self._state == "running" and self._had_reader and not self._positions and self._file is not None

    def reader(self, start: int = 0, stop: int | None = None, first_byte_deadline: float | None = None) -> "FillReader":
        """A reader of bytes ``[start, stop)`` (to the end when ``stop`` is None).

        :raises FileNotFoundError: if the temp file is already gone (committed
            or discarded) and the bytes are not otherwise available.
        """
        fd = -1
        if self.temp_path:
            try:
                fd = os.open(self.temp_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                with self._cond:
                    if self._written > start:
                        raise
        reader = FillReader(self, fd, start, stop, first_byte_deadline)
        with self._cond:
            self._positions[id(reader)] = start
            self._had_reader = True
        return reader

    # -- the fill thread ----------------------------------------------------

    def _run(self) -> None:
        try:
            for chunk in _chunks(self._upstream):
                if not chunk:
                    continue
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise TypeError(f"upstream yielded {type(chunk).__name__}, not bytes")
                if not self._take(bytes(chunk)):
                    return
            self._finish()
        except BaseException as exc:
            self._fail(exc)
        finally:
            close_quietly(self._upstream)
            FILLS.discard(self)

    def _take(self, chunk: bytes) -> bool:
        """Store and publish one chunk; ``False`` when the fill must stop."""
        limit = self._opts.content_length
        with self._cond:
            if self._state != "running":
                return False  # a bound or the watchdog ended it
            offset = self._received
        if limit >= 0 and offset + len(chunk) > limit:
            raise LengthMismatch(f"upstream sent more than the {limit} bytes it announced")
        if self._opts.total_timeout is not None and time.monotonic() - self._started > self._opts.total_timeout:
            raise FillFailed(f"the fetch took more than {self._opts.total_timeout:g}s")
        file = self._file  # a bound may drop it from another thread: then a write fails, and so do we
        if file is not None:
            if self._opts.max_size is not None and offset + len(chunk) > self._opts.max_size:
                self._stop_caching(CacheAbandoned(f"body exceeds max_size {self._opts.max_size}"))
            else:
                try:
                    view = memoryview(chunk)
                    while view:  # a short write must be completed, or the file would not be what the hash names
                        view = view[file.write(view):]
                except OSError as exc:  # a full disk must not cost the readers their body
                    warn_limited(log, "temp-write", "not caching: writing %s failed: %s", self.temp_path, exc)
                    self._stop_caching(CacheAbandoned(f"writing the temp file failed: {exc}"))
                else:
                    for h in self._hashers:
                        h.update(chunk)
        with self._cond:
            if self._file is not None:
                self._written += len(chunk)
            else:
                if not self._positions:
                    self._state = "failed"  # not caching and nobody reads: nothing left to do
                    self._error = FillFailed("not caching and no reader left")
                    self._cond.notify_all()
                    return False
                self._memory.append((offset, chunk))
                self._memory_bytes += len(chunk)
                self._prune()
                while self._memory_bytes > _MEMORY_LIMIT and self._positions and self._state == "running":
                    self._cond.wait(1.0)
                    self._prune()
            self._received += len(chunk)
            self._last_byte = time.monotonic()
            self._cond.notify_all()
        return True

    def _prune(self) -> None:
        """Drop memory chunks every live reader is past. Holds _cond."""
        low = min(self._positions.values(), default=self._received)
        while self._memory and self._memory[0][0] + len(self._memory[0][1]) <= low:
            _, chunk = self._memory.pop(0)
            self._memory_bytes -= len(chunk)

    def _finish(self) -> None:
        limit = self._opts.content_length
        if limit >= 0 and self._received != limit:
            raise LengthMismatch(f"upstream sent {self._received} bytes, announced {limit}")
        with self._cond:
            if self._state != "running":
                return  # a bound ended it meanwhile
        file, self._file = self._file, None
        if file is not None:
            file.close()
            result = StreamThroughResult(self._hasher.finalize(), self._hasher.size)
            try:
                self._on_complete(result, self.temp_path)
            except Exception as exc:
                log.exception("on_complete failed for %s; discarding it", self.temp_path)
                _unlink(self.temp_path)
                self._abort_once(exc)
        with self._cond:
            self._state = "done"
            self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._state != "running":
                return
            self._state = "failing"
            self._error = exc
        log.warning("fetch failed after %d bytes: %r", self._received, exc)
        # The failure is journalled (and the flight released) before any reader
        # is told: a reader that then looks at the flight finds it ended, never
        # still held by a fetch that has already given up.
        try:
            self._stop_caching(exc)
        finally:
            with self._cond:
                self._state = "failed"
                self._cond.notify_all()

    def _stop_caching(self, reason: BaseException) -> None:
        """Drop the temp file (readers keep their descriptors) and tell ``on_abort``."""
        file, self._file = self._file, None
        if file is not None:
            file.close()
        if self.temp_path:
            _unlink(self.temp_path)
        self._abort_once(reason)

    def _abort_once(self, reason: BaseException) -> None:
        if self._aborted:
            return
        self._aborted = True
        if self._on_abort is not None:
            try:
                self._on_abort(reason)
            except Exception:
                log.exception("on_abort failed")

    # -- bounds (the watchdog thread, and readers leaving) ------------------

    def check_bounds(self) -> None:
        """End the fill if it has been idle or running too long (any thread)."""
        now = time.monotonic()
        with self._cond:
            if self._state != "running":
                return
            idle = self._opts.idle_timeout is not None and now - self._last_byte > self._opts.idle_timeout
            total = self._opts.total_timeout is not None and now - self._started > self._opts.total_timeout
        if idle:
            self._fail(FillFailed(f"no byte from the upstream for {self._opts.idle_timeout:g}s"))
        elif total:
            self._fail(FillFailed(f"the fetch took more than {self._opts.total_timeout:g}s"))

    def _left(self, reader: "FillReader", position: int) -> None:
        with self._cond:
            self._positions.pop(id(reader), None)
            self._prune()
            self._cond.notify_all()
            last = not self._positions
        if last and self._file is not None and FILLS.detached() > self._opts.max_detached:
            self._fail(CacheAbandoned(f"more than {self._opts.max_detached} fetches with no client"))

    # -- what readers see ---------------------------------------------------

    def _available(self, reader: "FillReader", pos: int, timeout: float | None) -> tuple[int, bytes | None]:
        """Wait until bytes at ``pos`` exist: ``(in the file up to, memory chunk)``;
        ``(-1, None)`` at the end. :raises FillFailed, TimeoutError."""
        with self._cond:
            self._positions[id(reader)] = pos
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if pos < self._written:
                    return self._written, None
                for offset, chunk in self._memory:
                    if offset <= pos < offset + len(chunk):
                        return -1, chunk[pos - offset:]
                if self._state == "done" and pos >= self._received:
                    return -1, None
                if self._state == "failed":
                    raise FillFailed(f"the fetch failed after {self._received} bytes: {self._error!r}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("no byte from the fetch in time")
                self._cond.wait(left if left is not None else 1.0)


class FillReader:
    """One local client's view of a :class:`Fill`: a WSGI iterable of bytes
    ``[start, stop)``, read at the client's pace. ``close()`` leaves the fill
    running for the others (and the cache)."""

    def __init__(self, fill: Fill, fd: int, start: int, stop: int | None, first_byte_deadline: float | None) -> None:
        self._fill, self._fd = fill, fd
        self._pos, self._stop = start, stop
        self._deadline = first_byte_deadline
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            while (span := self._next_span()) is not None:
                if isinstance(span, int):
                    chunk = os.pread(self._fd, min(_READ_SIZE, span), self._pos - span)
                    if not chunk:
                        raise FillFailed("the temp file is shorter than what was written")
                    if len(chunk) < span:
                        self._pos -= span - len(chunk)  # the rest comes with the next span
                    span = chunk
                yield span
        finally:
            self.close()

    def wait_ready(self) -> None:
        """Wait for the first bytes (or the end) without taking them, so that
        a failure before any byte can still be answered with a status of its
        own. Waits at most until the first-byte deadline.

        :raises FillFailed: if the fetch failed. :raises TimeoutError: at the deadline.
        """
        if self._stop is not None and self._pos >= self._stop:
            return
        timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        self._fill._available(self, self._pos, timeout)
        self._deadline = None

    def fileno(self) -> int:
        """The descriptor of the temp file this reader reads (-1 if there is none)."""
        return self._fd

    def sendfile_spans(self) -> Iterator[tuple[int, int, int] | bytes]:
        """The body for a server that can ``sendfile``: each item is either
        ``(fd, offset, count)``, bytes ready in the temp file (everything
        written up to now, in one span), or ``bytes`` kept in memory after the
        temp file failed. Waits, raises and closes as iterating does; the
        descriptor is valid until the next item is asked for or ``close()``.
        cachefetch's worker sends these without copying the bytes through Python.
        """
        try:
            while (span := self._next_span()) is not None:
                yield (self._fd, self._pos - span, span) if isinstance(span, int) else span
        finally:
            self.close()

    def _next_span(self) -> int | bytes | None:
        """Wait for the next bytes and move past them: how many are ready in
        the file (an ``int``), a memory chunk, or ``None`` at the end.
        :raises FillFailed, TimeoutError."""
        if self._stop is not None and self._pos >= self._stop:
            return None
        timeout = None
        if self._deadline is not None:
            timeout = max(0.0, self._deadline - time.monotonic())
        in_file, chunk = self._fill._available(self, self._pos, timeout)
        self._deadline = None  # only the first byte is waited for against it
        if chunk is None and in_file < 0:
            if self._stop is not None and self._pos < self._stop:
                raise FillFailed(f"the body ended at {self._pos} bytes, before {self._stop}")
            return None
        if chunk is None:
            ready = (in_file if self._stop is None else min(in_file, self._stop)) - self._pos
            self._pos += ready
            return ready
        if self._stop is not None:
            chunk = chunk[:self._stop - self._pos]
        self._pos += len(chunk)
        return chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fill._left(self, self._pos)


def _chunks(upstream: Iterable[bytes] | BinaryIO) -> Iterator[bytes]:
    read = getattr(upstream, "read", None)
    if callable(read):
        return iter(lambda: read(_READ_SIZE), b"")
    return iter(upstream)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
