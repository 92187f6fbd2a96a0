"""CacheFetch: the WSGI middleware that caches and coalesces an app's responses.

For GET and HEAD requests with a cacheable key:

- a fresh stored entry is a *hit*, served from the store (sendfile, Range,
  ETag/304) with ``Age`` and ``Cache-Status``;
- otherwise the first request (the *leader*) calls the app and streams its
  body to its client through the stream-through tee, which writes it to a
  temp file under the store and commits it when complete;
- requests arriving meanwhile, in this process or another worker on the same
  store (*followers*), do not call the app: they replay the leader's status
  and headers and read the leader's temp file as it grows.

Everything else passes straight through to the app.
"""
from __future__ import annotations

import itertools
import logging
import threading
import weakref
import os
import time
from typing import Any, Callable, Iterable, Iterator

from urllib.parse import quote

from . import policy
from .hashing import Hash
from .index import Entry, Index, SQLiteIndex
from .inflight import Flights, Follow, Lead, LeaderGone
from .serve import ServeOptions, serve_blob_file
from .wsgi import StartResponse, WSGIEnviron, plain_response, status_line
from .store import CAFS, Blob, BlobNotFound
from .logutil import warn_limited
from .stream import CacheAbandoned, Committer, StreamThroughOptions, StreamThroughResult, stream_through

__all__ = ["CacheFetch", "default_key", "close_all"]

log = logging.getLogger("cachefetch.middleware")

WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]
_WAIT_POLICIES = ("passthrough", "504")
_CACHE_STATUS = "Cache-Status"
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_USE_FLUSH_SECONDS = 5.0
# Hits up to this size are sent from memory: sendfile's set-up costs more.
_MEMORY_LIMIT = 64 << 10
_LOOKUP_TTL = 1.0
_LOOKUP_SLOTS = 4096
_CONDITIONAL_HEADERS = frozenset({"HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_MATCH",
                                  "HTTP_IF_UNMODIFIED_SINCE", "HTTP_RANGE", "HTTP_IF_RANGE"})
_NAME = "cachefetch"


_instances: "weakref.WeakSet[CacheFetch]" = weakref.WeakSet()


def close_all() -> None:
    """Close every :class:`CacheFetch` of this process, finishing queued commits.

    For server hooks (gunicorn's ``worker_exit``) that cannot reach the
    middleware instance inside the framework's app object.
    """
    for instance in list(_instances):
        instance.close()


def default_key(environ: WSGIEnviron) -> str | None:
    """``scheme://host/path?query`` of the request: the same for GET and HEAD.

    The path is percent-encoded again from the decoded ``PATH_INFO``, so
    ``/a%20b`` and ``/a b`` are one key; the query is kept as sent.
    """
    host = environ.get("HTTP_HOST")
    if not host:
        host = f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
    path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1", "replace")
    query = environ.get("QUERY_STRING", "")
    return (f"{environ.get('wsgi.url_scheme', 'http')}://{host.lower()}{quote(path, safe=_PATH_SAFE)}"
            + (f"?{query}" if query else ""))


class _Retry(Exception):
    """The flight we followed ended without a usable answer: start over,
    on ``flight`` if given (the response varies, and ours is another variant)."""

    def __init__(self, flight: str | None = None) -> None:
        super().__init__(flight)
        self.flight = flight


class CacheFetch:
    """Wrap a WSGI ``app`` with a content-addressed, coalescing cache.

    :param app: the WSGI application to cache.
    :param store: a :class:`~cachefetch.store.CAFS` or a directory for one.
    :param index: where entries are recorded; default a
        :class:`~cachefetch.index.SQLiteIndex` at ``<store>/index.sqlite3``.
    :param key: ``environ -> str | None``: the cache key of a request, or
        ``None`` not to cache it. Default :func:`default_key`.
    :param default_ttl: freshness in seconds of a response that states none;
        ``None`` keeps it fresh until evicted (content that never changes at
        its URL).
    :param wait_timeout: seconds a follower waits for its first byte.
    :param on_wait_timeout: what a follower does then: ``"passthrough"``
        (call the app itself, without caching) or ``"504"``.
    :param max_object_size: bytes past which a response is not stored (it is
        still streamed to its client); ``None`` for no limit.
    :param cache_statuses: the response statuses that may be stored.
    :param stale_if_error: seconds past expiry during which a stale entry is
        served when the app raises or answers 5xx; ``None`` never.
    :param fsync: passed to the CAFS when ``store`` is a path.
    :param clock: the wall clock (epoch seconds) freshness is judged by.
    :raises ValueError, TypeError: on an invalid option, at construction.
    """

    def __init__(self, app: WSGIApp, store: CAFS | str | os.PathLike[str], *,
                 index: Index | None = None,
                 key: Callable[[WSGIEnviron], str | None] | None = None,
                 default_ttl: float | None = None,
                 wait_timeout: float = 30.0,
                 on_wait_timeout: str = "passthrough",
                 max_object_size: int | None = None,
                 cache_statuses: Iterable[int] = (200,),
                 stale_if_error: float | None = None,
                 fsync: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        if not callable(app):
            raise TypeError("app must be a WSGI callable")
        if not callable(clock):
            raise TypeError("clock must be a callable returning epoch seconds")
        if key is not None and not callable(key):
            raise TypeError("key must be a callable environ -> str | None")
        _check_amount("default_ttl", default_ttl, allow_none=True)
        _check_amount("wait_timeout", wait_timeout)
        if on_wait_timeout not in _WAIT_POLICIES:
            raise ValueError(f"on_wait_timeout must be one of {_WAIT_POLICIES}, got {on_wait_timeout!r}")
        _check_amount("max_object_size", max_object_size, allow_none=True, integer=True)
        statuses = tuple(cache_statuses)
        if not statuses or not all(isinstance(s, int) and not isinstance(s, bool) and 200 <= s <= 599 and s != 206
                                   for s in statuses):
            raise ValueError(f"cache_statuses must be HTTP statuses 200-599 other than 206, got {statuses!r}")
        _check_amount("stale_if_error", stale_if_error, allow_none=True)
        if index is not None and not all(callable(getattr(index, m, None))
                                         for m in ("get", "put", "delete", "close")):
            raise TypeError(f"index must implement cachefetch.index.Index, not {type(index).__name__}")
        if isinstance(store, CAFS):
            self.store = store
        elif isinstance(store, (str, os.PathLike)):
            self.store = CAFS(store, fsync=fsync)
        else:
            raise TypeError(f"store must be a CAFS or a path, not {type(store).__name__}")
        self.app = app
        self.index: Index = index if index is not None else SQLiteIndex(os.path.join(self.store.root, "index.sqlite3"))
        self.key = key or default_key
        self.default_ttl = default_ttl
        self.wait_timeout = float(wait_timeout)
        self.on_wait_timeout = on_wait_timeout
        self.max_object_size = max_object_size
        self.cache_statuses = frozenset(statuses)
        self.stale_if_error = stale_if_error
        self.clock = clock
        self.flights = Flights(self.store.root)
        self.committer = Committer(self.store)
        # Recent index answers, so a hot key costs no SQLite query on every hit.
        self._recent: dict[str, tuple[float, list[Entry]]] = {}
        # Hits record their use for LRU eviction in batches, not a write each.
        self._uses: dict[tuple[str, str], float] = {}
        self._uses_lock = threading.Lock()
        self._uses_flushed = time.monotonic()
        _instances.add(self)

    def close(self) -> None:
        """Finish pending commits and release the index (call when the worker stops)."""
        self.committer.shutdown(wait=True)
        self._flush_uses()
        self.index.close()

    def _record_use(self, entry: Entry) -> None:
        now = time.monotonic()
        with self._uses_lock:
            self._uses[(entry.key, entry.variant)] = self.clock()
            due = now - self._uses_flushed > _USE_FLUSH_SECONDS
            if due:
                self._uses_flushed = now
        if due:
            self._flush_uses()

    def _flush_uses(self) -> None:
        with self._uses_lock:
            uses, self._uses = self._uses, {}
        if not uses:
            return
        try:
            touch_many = getattr(self.index, "touch_many", None)
            if touch_many is not None:
                touch_many(uses)
            else:
                for (key, variant), when in uses.items():
                    self.index.touch(key, variant, when)
        except Exception as exc:
            warn_limited(log, "uses", "recording %d entry uses failed: %s", len(uses), exc)

    # -- entry point -----------------------------------------------------

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return self.app(environ, start_response)
        key = self.key(environ)
        if key is None:
            return self.app(environ, start_response)
        if not isinstance(key, str):
            raise TypeError(f"the key function returned {type(key).__name__}, not str or None")
        directives = policy.request_directives(environ)
        if directives.no_store:
            return self._passthrough(environ, start_response, "fwd=request")
        authorized = "HTTP_AUTHORIZATION" in environ
        now = self.clock()
        entries = self._lookup(key)
        entry = self._matching(entries, environ, authorized)
        if entry is not None and not directives.no_cache and entry.is_fresh(now):
            served = self._serve_entry(environ, start_response, entry, self._hit_status(entry, now))
            if served is not None:
                return served
            entry = None
        vary = entries[0].vary if entries else ()
        flight = key + "\n" + policy.variant_of(environ, vary)
        return self._miss(environ, start_response, key, flight, entry, authorized,
                          revalidate=bool(directives.no_cache))

    # -- hits ------------------------------------------------------------

    def _lookup(self, key: str) -> list[Entry]:
        """The index's entries for ``key``, remembered for a moment.

        A remembered entry is still only served while fresh by its own
        headers, so the cost of the moment is that a refetch by another
        worker shows here up to ``_LOOKUP_TTL`` seconds late.
        """
        now = time.monotonic()
        remembered = self._recent.get(key)
        if remembered is not None and now - remembered[0] < _LOOKUP_TTL:
            return remembered[1]
        entries = self.index.get(key)
        if entries:  # never an absence: another worker's commit must show at once
            if len(self._recent) >= _LOOKUP_SLOTS:
                self._recent.clear()
            self._recent[key] = (now, entries)
        return entries

    def _matching(self, entries: list[Entry], environ: WSGIEnviron, authorized: bool) -> Entry | None:
        for entry in entries:
            if entry.variant != policy.variant_of(environ, entry.vary):
                continue
            if authorized and policy.response_is_storable(entry.status, list(entry.headers),
                                                          self.cache_statuses, True):
                return None  # not marked shareable with authorized requests
            return entry
        return None

    @staticmethod
    def _hit_status(entry: Entry, now: float) -> str:
        ttl = entry.ttl(now)
        return f"{_NAME}; hit" + (f"; ttl={int(ttl)}" if ttl is not None else "")

    def _serve_entry(self, environ: WSGIEnviron, start_response: StartResponse, entry: Entry,
                     cache_status: str) -> Iterable[bytes] | None:
        """Serve ``entry`` from the store; ``None`` if its blob has gone (entry dropped)."""
        try:
            file = self.store.open(entry.hash, buffered=False)
        except BlobNotFound:
            log.warning("entry %r points at missing blob %s; dropping it", entry.key, entry.hash.hex)
            self.index.delete(entry.key, entry.variant)
            self._recent.pop(entry.key, None)
            return None
        return self._serve_open(environ, start_response, entry, file, cache_status)

    def _serve_open(self, environ: WSGIEnviron, start_response: StartResponse, entry: Entry, file: Any,
                    cache_status: str) -> Iterable[bytes]:
        """Answer with ``entry``, whose blob is open as ``file`` (now ours to close)."""
        opts = _replay_options(entry.headers, status_line(entry.status),
                               [("Age", str(entry.age(self.clock()))), (_CACHE_STATUS, cache_status)])
        self._record_use(entry)
        return serve_blob_file(environ, start_response, file, Blob(entry.hash, entry.size), opts)

    def _serve_stale(self, environ: WSGIEnviron, start_response: StartResponse, stale: Entry | None,
                     detail: str) -> Iterable[bytes] | None:
        """Serve ``stale`` if ``stale_if_error`` allows it now, else ``None``."""
        if stale is None or self.stale_if_error is None or not policy.allows_stale(list(stale.headers)):
            return None
        ttl = stale.ttl(self.clock())
        if ttl is not None and -ttl > self.stale_if_error:
            return None
        status = f"{_NAME}; hit; ttl={int(ttl) if ttl is not None else 0}; detail={detail}"
        log.warning("serving stale %r: %s", stale.key, detail)
        return self._serve_entry(environ, start_response, stale, status)

    # -- misses ----------------------------------------------------------

    def _passthrough(self, environ: WSGIEnviron, start_response: StartResponse, detail: str) -> Iterable[bytes]:
        """Call the app without caching, telling the client why in Cache-Status."""
        value = f"{_NAME}; {detail}"

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, list(headers) + [(_CACHE_STATUS, value)], exc_info)

        return self.app(environ, start)

    def _miss(self, environ: WSGIEnviron, start_response: StartResponse, key: str, flight: str,
              stale: Entry | None, authorized: bool, revalidate: bool) -> Iterable[bytes]:
        head_request = environ.get("REQUEST_METHOD") == "HEAD"
        deadline = time.monotonic() + self.wait_timeout
        while True:
            # A HEAD never stores a body, so it never leads a fetch.
            try:
                lead = None if head_request else self.flights.lead(flight)
                follow = None if lead is not None or authorized else self.flights.follow(flight)
            except OSError as exc:  # e.g. a full disk: serve, just do not cache
                warn_limited(log, "flights", "cannot coordinate fetches in %s: %s", self.flights.dir, exc)
                return self._passthrough(environ, start_response, "fwd=miss; detail=store-unavailable")
            if lead is not None:
                if not revalidate:  # a flight may have finished between lookup and lock
                    served = self._fresh_hit(environ, start_response, key, authorized, lead)
                    if served is not None:
                        return served
                try:
                    return self._lead(environ, start_response, lead, key, stale, authorized,
                                      "request" if revalidate else "stale" if stale else "miss")
                except BaseException as exc:  # whatever went wrong, followers must not wait on us
                    lead.fail("upstream", repr(exc))
                    raise
            if follow is None:
                if head_request or authorized:  # cannot lead: look once more, then go to the app
                    served = None if revalidate else self._fresh_hit(environ, start_response, key, authorized)
                    if served is not None:  # an empty list (a HEAD) is an answer too
                        return served
                    return self._passthrough(environ, start_response, "fwd=miss")
                continue  # the flight ended between our two calls: look again
            try:
                return self._follow(environ, start_response, follow, deadline, stale, key)
            except _Retry as retry:
                if retry.flight is not None and retry.flight != flight:
                    flight = retry.flight
                    continue
                if head_request or retry.flight is not None:
                    # A HEAD cannot lead, so cannot clear a dead leader's journal.
                    return self._passthrough(environ, start_response, "fwd=miss")
                continue

    # -- the leader ------------------------------------------------------

    def _fresh_hit(self, environ: WSGIEnviron, start_response: StartResponse, key: str, authorized: bool,
                   lead: Lead | None = None) -> Iterable[bytes] | None:
        """Serve a fresh entry committed since our first look (asking the index
        itself, not the per-process memory), releasing ``lead`` if we serve."""
        entry = self._matching(self.index.get(key), environ, authorized)
        now = self.clock()
        if entry is None or not entry.is_fresh(now):
            return None
        try:
            file = self.store.open(entry.hash, buffered=False)
        except BlobNotFound:
            return None  # keep leading: the fetch will put it back
        if lead is not None:
            lead.release()
        return self._serve_open(environ, start_response, entry, file, self._hit_status(entry, now))

    def _lead(self, environ: WSGIEnviron, start_response: StartResponse, lead: Lead, key: str,
              stale: Entry | None, authorized: bool, forward: str) -> Iterable[bytes]:
        started: list[Any] = []
        written: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, list(headers)]
            return written.append  # the legacy write(): buffered before the body

        # The cache answers conditionals and ranges itself; what it stores must be
        # the whole response, or the followers would be sent to the app.
        app_environ = {k: v for k, v in environ.items() if k not in _CONDITIONAL_HEADERS}
        try:
            app_iter: Iterable[bytes] = self.app(app_environ, capture)
            if not started:  # the app may call start_response on its first chunk
                chunks = iter(app_iter)
                first = next(chunks, b"")
                app_iter = _Prepended([first], chunks, app_iter)
        except BaseException as exc:
            lead.fail("upstream", repr(exc))
            served = self._serve_stale(environ, start_response, stale, "stale-if-error")
            if served is not None:
                return served
            raise
        if not started:
            _close(app_iter)
            raise RuntimeError("the WSGI app returned without calling start_response")
        if written:
            app_iter = _Prepended(written, iter(app_iter), app_iter)
        status, headers = started
        code = int(status[:3])
        reason = policy.response_is_storable(code, headers, self.cache_statuses, authorized)
        now = self.clock()
        ttl = policy.freshness_lifetime(headers, self.default_ttl, now) if reason is None else None
        if reason is None and ttl is not None and ttl <= 0:
            reason = "already stale"
        if reason is None and self.max_object_size is not None and _content_length(headers) > self.max_object_size:
            reason = "too large"
        if reason is not None:
            lead.uncacheable(code)
            if code >= 500:
                served = self._serve_stale(environ, start_response, stale, f"stale-if-error; fwd-status={code}")
                if served is not None:
                    _close(app_iter)
                    return served
            log.debug("not storing %r: %s", key, reason)
            start_response(status, headers + [(_CACHE_STATUS, f"{_NAME}; fwd=miss; detail={reason.replace(' ', '-')}")])
            return app_iter

        keep = policy.stored_headers(headers)
        vary = policy.vary_names(headers)
        content_type = policy.header(keep, "Content-Type") or "application/octet-stream"
        length = _content_length(headers)
        initial_age = _int_or_zero(policy.header(headers, "Age"))
        head = {"status": status, "headers": keep, "content_length": length,
                "vary": list(vary), "variant": policy.variant_of(environ, vary), "body": None}

        def on_start(tmp_path: str) -> None:
            head["body"] = tmp_path
            try:
                lead.publish(head)
            except OSError as exc:
                raise CacheAbandoned(f"cannot journal the fetch: {exc}") from exc

        def on_abort(exc: BaseException) -> None:
            lead.fail("abandoned" if isinstance(exc, CacheAbandoned) else "upstream", repr(exc))

        def on_complete(result: StreamThroughResult, tmp_path: str) -> None:
            lead.done(result.hash.hex, result.size)
            entry = Entry(key, head["variant"], result.hash, result.size, code, tuple(map(tuple, keep)),
                          stored_at=now,
                          expires_at=None if ttl is None else now + ttl - initial_age,
                          vary=vary, initial_age=initial_age)

            def committed(blob: Blob | None, error: BaseException | None) -> None:
                try:
                    if blob is not None:
                        self.index.put(entry)
                        self._recent.pop(key, None)
                        log.info("stored %r as %s (%d bytes)", key, blob.hash.hex, blob.size)
                finally:
                    lead.release()

            self.committer.submit(result, tmp_path, callback=committed)

        opts = StreamThroughOptions(
            content_type=content_type,
            extra_headers=[(k, v) for k, v in keep if k.lower() != "content-type"]
            + [(_CACHE_STATUS, f"{_NAME}; fwd={forward}; stored")],
            content_length=length, temp_dir=self.store.temp_dir, temp_prefix=lead.temp_prefix, status=status,
            max_size=self.max_object_size, finish_on_disconnect=True,
            on_start=on_start, on_abort=on_abort)
        return stream_through(environ, start_response, app_iter, opts, on_complete)

    # -- followers -------------------------------------------------------

    def _follow(self, environ: WSGIEnviron, start_response: StartResponse, follow: Follow,
                deadline: float, stale: Entry | None, key: str) -> Iterable[bytes]:
        """Answer from another request's fetch; raises :class:`_Retry` to start over.

        ``follow`` is closed here, unless the answer streams the leader's body
        (then the answer's ``close()`` closes it).
        """
        streaming = False
        try:
            try:
                journal = follow.wait(deadline)
            except LeaderGone:
                raise _Retry() from None
            except TimeoutError:
                return self._wait_timed_out(environ, start_response)
            if journal.final == "X":
                status = (journal.detail or {}).get("status", 0)
                if status >= 500:
                    served = self._serve_stale(environ, start_response, stale, f"stale-if-error; fwd-status={status}")
                    if served is not None:
                        return served
                return self._passthrough(environ, start_response, "fwd=miss; detail=uncacheable")
            head = journal.head
            if head is None:  # failed before its response started
                return self._failed_flight(environ, start_response, journal.detail or {}, stale)
            variant = policy.variant_of(environ, head["vary"])
            if variant != head["variant"]:  # fetch our own variant, coalesced with its peers
                raise _Retry(key + "\n" + variant)
            headers = [tuple(h) for h in head["headers"]] + [(_CACHE_STATUS, f"{_NAME}; fwd=miss; collapsed")]
            if head["content_length"] >= 0:
                headers.append(("Content-Length", str(head["content_length"])))
            if environ.get("REQUEST_METHOD") == "HEAD":
                start_response(head["status"], headers)
                return []
            try:
                body = follow.body(head["body"], deadline)
                first = next(body, b"")
            except FileNotFoundError:
                return self._serve_finished(environ, start_response, follow, head, headers, stale)
            except TimeoutError:
                return self._wait_timed_out(environ, start_response)
            except LeaderGone:
                journal = follow.journal()
                if journal.final == "F":
                    return self._failed_flight(environ, start_response, journal.detail or {}, stale)
                raise _Retry() from None
            start_response(head["status"], headers)
            streaming = True
            return _Prepended([first], body, follow)
        finally:
            if not streaming:
                follow.close()

    def _serve_finished(self, environ: WSGIEnviron, start_response: StartResponse, follow: Follow,
                        head: dict[str, Any], headers: list[tuple[str, str]],
                        stale: Entry | None) -> Iterable[bytes]:
        """The body file is gone: committed (serve the blob) or discarded (retry)."""
        journal = follow.journal()
        follow.close()
        if journal.final == "F":
            return self._failed_flight(environ, start_response, journal.detail or {}, stale)
        if journal.final != "D":
            raise _Retry()
        h = Hash.from_hex(journal.detail["hash"])
        try:
            file = self.store.open(h, buffered=False)
        except BlobNotFound:
            raise _Retry() from None  # committed blob vanished (gc) or commit failed
        return serve_blob_file(environ, start_response, file, Blob(h, journal.detail["size"]),
                               _replay_options(headers, head["status"]))

    def _failed_flight(self, environ: WSGIEnviron, start_response: StartResponse, detail: dict[str, Any],
                       stale: Entry | None) -> Iterable[bytes]:
        if detail.get("why") == "abandoned":  # the leader got its body; it just was not stored
            return self._passthrough(environ, start_response, "fwd=miss; detail=not-stored")
        served = self._serve_stale(environ, start_response, stale, "stale-if-error")
        if served is not None:
            return served
        return plain_response(start_response, "502 Bad Gateway", "the coalesced fetch failed",
                              [(_CACHE_STATUS, f"{_NAME}; fwd=miss; collapsed; detail=fetch-failed")])

    def _wait_timed_out(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        if self.on_wait_timeout == "504":
            return plain_response(start_response, "504 Gateway Timeout",
                                  f"no response from the coalesced fetch within {self.wait_timeout:g}s",
                                  [(_CACHE_STATUS, f"{_NAME}; fwd=miss; collapsed; detail=wait-timeout")])
        return self._passthrough(environ, start_response, "fwd=miss; detail=wait-timeout")


class _Prepended:
    """``head`` chunks, then ``rest``; ``close()`` closes ``owner`` (PEP 3333)."""

    def __init__(self, head: list[bytes], rest: Iterator[bytes], owner: object) -> None:
        self._chunks = itertools.chain(head, rest)
        self._rest = rest
        self._owner = owner

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        close_rest = getattr(self._rest, "close", None)
        if close_rest is not None and self._rest is not self._owner:
            close_rest()
        _close(self._owner)


def _replay_options(headers: Iterable[tuple[str, str]], status: str,
                    extra: Iterable[tuple[str, str]] = ()) -> ServeOptions:
    """How to answer with a stored response: its headers (the serve layer sets
    Content-Type, Content-Length and ETag itself, from these), plus ``extra``."""
    headers = list(headers)
    return ServeOptions(
        content_type=policy.header(headers, "Content-Type") or "application/octet-stream",
        extra_headers=[(k, v) for k, v in headers if k.lower() not in ("content-type", "content-length", "etag")]
        + list(extra),
        etag=policy.header(headers, "ETag"), status=status, memory_limit=_MEMORY_LIMIT)


def _close(obj: object) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


def _check_amount(name: str, value: object, *, allow_none: bool = False, integer: bool = False) -> None:
    """Seconds (or, with ``integer``, bytes) >= 0: no bool, no NaN, no infinity for bytes."""
    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value >= 0:  # NaN fails >= 0
        unit = "bytes" if integer else "seconds"
        raise ValueError(f"{name} must be {unit} >= 0{' or None' if allow_none else ''}, got {value!r}")


def _content_length(headers: list[tuple[str, str]]) -> int:
    value = policy.header(headers, "Content-Length")
    if value is None or not value.strip().isdigit():
        return -1
    return int(value)


def _int_or_zero(value: str | None) -> int:
    return int(value) if value is not None and value.strip().isdigit() else 0
