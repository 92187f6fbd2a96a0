"""The hit path: answer from a stored entry (request thread)."""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Iterable

from .. import policy
from ..index import Entry, Index, IndexUnavailable
from ..logutil import warn_limited
from ..policy import CacheStatus
from ..replay import ServeOptions, serve_blob_file
from ..store import Blob, BlobNotFound
from ..wsgi import StartResponse, WSGIEnviron, status_line
from .context import Context

__all__ = ["serve_entry", "serve_open", "replay_options", "options_for", "UseRecorder", "matching"]

log = logging.getLogger("cachefetch.middleware")

# Hits up to this size are sent from memory: sendfile's set-up costs more.
_MEMORY_LIMIT = 64 << 10
_USE_FLUSH_SECONDS = 5.0


def matching(entries: list[Entry], environ: WSGIEnviron) -> Entry | None:
    """The stored variant whose Vary'd request fields match this request's."""
    for entry in entries:
        if entry.variant == policy.variant_of(environ, entry.vary):
            return entry
    return None


def replay_options(headers: Iterable[tuple[str, str]], status: str,
                   extra: Iterable[tuple[str, str]] = ()) -> ServeOptions:
    """How to answer with a stored response: its fields (the replay layer sets
    Content-Type, Content-Length and ETag itself, from these), plus ``extra``."""
    headers = list(headers)
    return ServeOptions(
        content_type=policy.header(headers, "Content-Type") or "application/octet-stream",
        extra_headers=[(k, v) for k, v in headers if k.lower() not in ("content-type", "content-length", "etag")]
        + list(extra),
        etag=policy.header(headers, "ETag"), status=status, memory_limit=_MEMORY_LIMIT,
        last_modified=policy.header(headers, "Last-Modified"))


def serve_entry(ctx: Context, environ: WSGIEnviron, start_response: StartResponse, entry: Entry,
                status: CacheStatus) -> Iterable[bytes] | None:
    """Serve ``entry`` from the store; ``None`` if its blob has gone (the entry is then dropped)."""
    try:
        file = ctx.store.open(entry.hash, buffered=False)
    except BlobNotFound:
        log.warning("entry %r points at missing blob %s; dropping it", entry.key, entry.hash.hex)
        try:
            ctx.index.delete(entry.key, entry.variant)
        except IndexUnavailable:
            pass  # the next look finds it again, and drops it then
        return None
    return serve_open(ctx, environ, start_response, entry, file, status)


@functools.lru_cache(maxsize=1024)
def _stored_options(headers: tuple[tuple[str, str], ...], code: int) -> ServeOptions:
    """:func:`replay_options` of a stored response, worked out once per
    response rather than once per hit (its fields were checked when stored,
    and are checked again here, once). Thread-safe."""
    return replay_options(headers, status_line(code))


def options_for(entry: Entry) -> ServeOptions:
    """How to replay ``entry``: :func:`replay_options` of its stored fields and status.

    :raises TypeError, ValueError: for stored fields that are not sendable.
    """
    try:
        return _stored_options(tuple(entry.headers), entry.status)
    except TypeError:  # fields as lists (unhashable): nothing to remember them by
        return replay_options(entry.headers, status_line(entry.status))


def serve_open(ctx: Context, environ: WSGIEnviron, start_response: StartResponse, entry: Entry, file: Any,
               status: CacheStatus) -> Iterable[bytes]:
    """Answer with ``entry``, whose blob is open as ``file`` (now ours to
    close): its stored fields (the origin's ``Date`` among them), a
    recomputed ``Age``, and the client's conditionals and Range applied."""
    try:
        opts = options_for(entry)
    except BaseException:
        file.close()
        raise
    ctx.record_use(entry)
    return serve_blob_file(environ, ctx.respond(environ, start_response, status), file,
                           Blob(entry.hash, entry.size), opts, (("Age", str(entry.age(ctx.clock()))),))


class UseRecorder:
    """Batches hits' uses of entries into one index write every few seconds
    (one SQLite write per hit would cost more than the hit). Any thread."""

    def __init__(self, index: Index, clock: Any) -> None:
        self._index = index
        self._clock = clock
        self._lock = threading.Lock()
        self._uses: dict[tuple[str, str], float] = {}  # guarded by _lock
        self._flushed = time.monotonic()                 # guarded by _lock

    def __call__(self, entry: Entry) -> None:
        self.note((entry.key, entry.variant), self._clock())

    def note(self, ident: tuple[str, str], when: float) -> None:
        """Record a use of the entry ``(key, variant)`` at ``when`` (epoch seconds, this recorder's clock)."""
        now = time.monotonic()
        with self._lock:
            self._uses[ident] = when
            due = now - self._flushed > _USE_FLUSH_SECONDS
            if due:
                self._flushed = now
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the uses recorded so far (errors are logged, at most once a minute)."""
        with self._lock:
            uses, self._uses = self._uses, {}
        if not uses:
            return
        try:
            self._index.touch_many(uses)
        except Exception as exc:
            warn_limited(log, "uses", "recording %d entry uses failed: %s", len(uses), exc)


def serve_stale(ctx: Context, environ: WSGIEnviron, start_response: StartResponse, stale: Entry | None,
                request: policy.RequestFacts, fwd_status: int | None = None) -> Iterable[bytes] | None:
    """Serve ``stale`` because the origin failed, if ``stale-if-error``
    allows it now (RFC 5861); else ``None``."""
    now = ctx.clock()
    if stale is None or not policy.stale_if_error_allows(stale, request, now, ctx.rules):
        return None
    ttl = stale.ttl(now)
    status = CacheStatus(hit=True, fwd_status=fwd_status, ttl=int(ttl) if ttl is not None else 0,
                         detail="stale-if-error")
    log.warning("serving stale %r: the origin failed (%s)", stale.key, fwd_status or "error")
    return serve_entry(ctx, environ, start_response, stale, status)
