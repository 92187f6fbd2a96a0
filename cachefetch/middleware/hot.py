"""The hot path: fresh hits answered from what this process keeps in memory.

A request that needs none of the planner's judgement (a ``GET`` with no
conditionals, no ``Range``, no ``Authorization``, no ``Cache-Control`` or
``Pragma``, no body, and no ``Cookie`` unless cookies are ignored) is, for a
stored response that is fresh and not ``no-cache``, always a plain hit: the
stored status and fields, a recomputed ``Age``, ``Cache-Status: hit`` with
its ``ttl``, the whole body. :class:`HotTable` keeps such answers built,
within a byte budget: with their body bytes for small entries (no file is
opened), with only their fields for large ones (the blob is sent with
``sendfile`` through ``wsgi.file_wrapper``, as the full path does).

It is exact: every use reads the index (``Index.get``, which reflects every
change any process has made) and serves a remembered answer only if the
stored entry it was built from is still the one the index holds, equal in
every field. An entry replaced, refreshed or invalidated by any worker is
so never answered from an older copy; what is not a plain hit falls through
to the full path (:mod:`.core`), unchanged.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..index import Entry, Index, IndexUnavailable
from ..policy import (ENVIRON_KEY, FOREVER, SHORT_VALUES_CHARS, CacheRules, CacheStatus, environ_names,
                      response_directives, short_values, variant_of)
from ..replay import etag_for, fd_body, whole_fields
from ..store import CAFS, BlobNotFound
from ..wsgi import StartResponse, WSGIEnviron
from . import hit

__all__ = ["HotTable", "HotAnswer", "plain_hit_request"]

# Request fields that may change the answer to a GET for a fresh entry: any
# one of them sends the request down the full path.
_PLANNED = frozenset({"HTTP_CACHE_CONTROL", "HTTP_PRAGMA", "HTTP_AUTHORIZATION", "HTTP_TRANSFER_ENCODING",
                      "HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE",
                      "HTTP_IF_UNMODIFIED_SINCE", "HTTP_RANGE", "HTTP_IF_RANGE"})
_PLANNED_WITH_COOKIE = _PLANNED | {"HTTP_COOKIE"}
_NO_BODY = (None, "", "0")  # CONTENT_LENGTH values of a request without a body
# What an answer costs besides its body and fields (the record, its tuples, the dict slots).
_OVERHEAD = 512
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC
# A Vary'd answer's shortcut remembers this many sets of request values per
# answer (the values of one variant differ only by whitespace, so one is
# usual), short ones only (policy.short_values): a long Cookie or User-Agent
# takes the full check. Its weight includes them, so the budget still holds.
_VARIED_SLOTS = 2
_VARIED_SLOT_BYTES = SHORT_VALUES_CHARS + 128  # the values and their tuple and dict slot


def plain_hit_request(environ: WSGIEnviron, planned: frozenset[str] = _PLANNED_WITH_COOKIE) -> bool:
    """Whether a request is one any fresh, shareable, not ``no-cache`` entry
    answers as a plain hit: a ``GET`` without any field in ``planned`` and
    without a body (as :func:`cachefetch.policy.read_request` judges one)."""
    if environ.get("REQUEST_METHOD") != "GET" or not environ.keys().isdisjoint(planned):
        return False
    return environ.get("CONTENT_LENGTH") in _NO_BODY


@dataclass(frozen=True, slots=True)
class _Stamp:
    """An answer's fields for one ``Age`` and ``ttl`` (both change once a
    second), built once each, and good from ``since`` until ``until`` (epoch
    seconds): outside it either would read differently (``until`` is never
    past the entry's expiry; ``since`` matters if the clock steps back)."""

    headers: tuple[tuple[str, str], ...]
    status: CacheStatus
    since: float
    until: float


@dataclass(slots=True, eq=False)
class HotAnswer:
    """A plain hit on ``entry``, built: its status line, its fields up to
    ``Age`` (as :func:`cachefetch.replay.serve_blob_file` sends them for a
    whole body), and its body (``None`` for a large one, sent from its blob
    at ``blob_path``)."""

    entry: Entry
    status: str
    head: tuple[tuple[str, str], ...]
    body: bytes | None
    weight: int
    ident: tuple[str, str]  # (key, variant), as uses are recorded
    blob_path: str | None = None  # a large answer's blob, worked out once (not once per hit)
    stamp: _Stamp | None = field(default=None)


def _stamp(answer: HotAnswer, now: float, status_field: bool = True) -> _Stamp | None:
    """``answer``'s fields as of ``now``: ``Age`` and (if ``status_field``)
    ``Cache-Status: hit; ttl=``; ``None`` if its entry is stale by then."""
    entry = answer.entry
    expires = entry.expires_at
    if expires is not None and not expires - now > 0:
        return None
    age = entry.age(now)
    # Age is int(now - stored_at + initial_age) (from stored_at on): it reads
    # age while that sum is in [age, age + 1). ttl is int(expires - now): it
    # reads ttl while expires - now is in [ttl, ttl + 1), so never past the
    # expiry itself.
    since = entry.stored_at - entry.initial_age + age
    until = since + 1
    ttl = None
    if expires is not None and expires != FOREVER:
        ttl = int(expires - now)
        since, until = max(since, expires - ttl - 1), min(until, expires - ttl)
    status = CacheStatus(hit=True, ttl=ttl)
    fields = (*answer.head, ("Age", str(age)), CacheStatus.header(status)) if status_field \
        else (*answer.head, ("Age", str(age)))
    return _Stamp(fields, status, since, until)


@dataclass(slots=True, eq=False)
class _Known:
    """What the table holds for one key: its answers by variant (replaced
    whole, under the table's lock, never changed in place), and two
    shortcuts, each valid while ``Index.get`` returns the same list object
    it holds (the index's memo: nothing changed since), so that the answer
    needs no other check:

    - ``fast``: that list, when the key's one, non-varying answer was last
      found to be its entry, with that answer;
    - ``varied``: that list, when its entries all vary on the same fields,
      the environ keys of those fields, and the answers found for the
      request values seen (at most :data:`_VARIED_SLOTS` per answer). The
      values decide the variant, so they decide the answer while the
      entries stay the same.
    """

    answers: dict[str, HotAnswer]
    # Each is one tuple, read and replaced atomically (its dict is never changed once published).
    fast: tuple[list[Entry], HotAnswer] | None = None
    varied: tuple[list[Entry], tuple[str, ...], dict[tuple[Any, ...], HotAnswer]] | None = None


def _remember_values(known: _Known, entries: list[Entry], vary: tuple[str, ...], environ: WSGIEnviron,
                     answer: HotAnswer) -> None:
    """Add to ``known.varied`` that this request's values of ``vary`` were
    answered by ``answer`` while the index held ``entries`` (if the values
    are short, and there is room)."""
    varied = known.varied
    if varied is None or varied[0] is not entries:
        varied = (entries, environ_names(tuple(vary)), {})
    values = tuple([environ.get(name, "") for name in varied[1]])
    if len(varied[2]) < _VARIED_SLOTS * len(known.answers) and short_values(values):
        # A new dict, published whole: a racing reader never sees one half built.
        known.varied = (entries, varied[1], {**varied[2], values: answer})


class HotTable:
    """Built answers for fresh entries, per process, at most ``max_bytes`` of
    them (bodies, fields and an estimate of each record's own cost).

    :meth:`serve` answers a plain-hit request from memory or returns
    ``None`` (then the caller takes the full path); :meth:`learn` remembers
    an entry the full path has just served. Oldest learnt goes first when
    the budget is full. Thread-safe.

    :param max_bytes: the budget; ``0`` disables the table.
    :param max_object_size: bodies up to this many bytes are kept; a larger
        entry keeps only its fields, and its body is sent from its blob.
    :param status_field: whether answers carry ``Cache-Status``.
    :raises ValueError: on a negative bound.
    """

    def __init__(self, index: Index, store: CAFS, rules: CacheRules, clock: Callable[[], float],
                 uses: hit.UseRecorder, max_bytes: int, max_object_size: int, status_field: bool = True) -> None:
        if max_bytes < 0 or max_object_size < 0:
            raise ValueError("HotTable bounds must be bytes >= 0")
        self._index = index
        self._store = store
        self._rules = rules
        self._clock = clock
        self._uses = uses
        self.max_bytes = max_bytes
        self.max_object_size = max_object_size
        self._status_field = status_field
        self._planned = _PLANNED if rules.cookies == "ignore" else _PLANNED_WITH_COOKIE
        self._lock = threading.Lock()
        # key -> its answers. Read without the lock (single dict lookups);
        # changed only under it.
        self._table: dict[str, _Known] = {}
        self._bytes = 0  # guarded by _lock

    @property
    def size(self) -> int:
        """Bytes the table holds now, as it counts them."""
        return self._bytes

    def __len__(self) -> int:
        return sum(len(known.answers) for known in list(self._table.values()))

    def serve(self, environ: WSGIEnviron, start_response: StartResponse, key: str) -> Iterable[bytes] | None:
        """Answer from memory if this is a plain-hit request for a remembered
        entry that is still the index's, fresh; else ``None``, having sent nothing."""
        # Every hit runs this: it is written flat, with no call it can do without.
        known = self._table.get(key)
        if (known is None or environ.get("REQUEST_METHOD") != "GET" or not environ.keys().isdisjoint(self._planned)
                or environ.get("CONTENT_LENGTH") not in _NO_BODY):
            return None
        try:
            entries = self._index.get(key)
        except IndexUnavailable:
            return None  # the full path answers uncached
        fast = known.fast
        if fast is not None and fast[0] is entries:
            answer = fast[1]
        else:
            varied = known.varied
            answer = None
            if varied is not None and varied[0] is entries:
                answer = varied[2].get(tuple([environ.get(name, "") for name in varied[1]]))
            if answer is None:
                answer = self._check(key, known, entries, environ)
                if answer is None:
                    return None
        now = self._clock()
        stamp = answer.stamp
        if stamp is None or not stamp.since <= now < stamp.until:
            stamp = _stamp(answer, now, self._status_field)
            if stamp is None:
                return None  # stale: the full path decides (revalidate, swr, stale-if-error...)
            answer.stamp = stamp  # a racing thread sees the old stamp or this one
            # A use is recorded once per stamp, so once a second at most: the
            # recorder keeps one time per entry for a batch of several seconds anyway.
            self._uses.note(answer.ident, now)
        environ[ENVIRON_KEY] = stamp.status
        if answer.body is not None:
            start_response(answer.status, list(stamp.headers))
            return [answer.body]
        return self._send_blob(environ, start_response, answer, stamp)

    def _check(self, key: str, known: _Known, entries: list[Entry], environ: WSGIEnviron) -> HotAnswer | None:
        """The answer for the request's variant if it was built from the entry
        the index holds now (``entries``); else ``None``, having dropped the
        answers the index no longer holds."""
        for entry in entries:  # hit.matching, without the call for a response that does not vary
            if entry.variant == (variant_of(environ, entry.vary) if entry.vary else ""):
                break
        else:
            self._prune(key, entries)
            return None
        answer = known.answers.get(entry.variant)
        if answer is None:
            return None
        if answer.entry is not entry and answer.entry != entry:  # replaced or refreshed since
            self._prune(key, entries)
            return None
        if len(entries) == 1 and not entry.vary:
            known.fast = (entries, answer)
        elif entry.vary and all(other.vary == entry.vary for other in entries):
            _remember_values(known, entries, entry.vary, environ, answer)
        return answer

    def _send_blob(self, environ: WSGIEnviron, start_response: StartResponse, answer: HotAnswer,
                   stamp: _Stamp) -> Iterable[bytes] | None:
        """A large answer's body from its blob (through ``wsgi.file_wrapper``,
        so gunicorn ``sendfile``s it); ``None`` if the blob is missing or not
        the entry's size (the full path deals with that)."""
        fd = self._open(answer)
        if fd is None:
            return None
        try:
            start_response(answer.status, list(stamp.headers))
        except BaseException:
            os.close(fd)
            raise
        return fd_body(environ, fd, answer.entry.size)

    def _open(self, answer: HotAnswer) -> int | None:
        """A descriptor of a large answer's blob, if the blob is there with
        the entry's size; else ``None``. A bare descriptor: a file object
        would cost one more ``fstat`` (and its own set-up) on every hit."""
        try:
            fd = os.open(answer.blob_path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size == answer.entry.size:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def learn(self, environ: WSGIEnviron, entry: Entry) -> None:
        """Remember ``entry`` (just served by the full path) if it is fresh
        now and not ``no-cache``, the request was a plain hit, and it fits the
        budget. Reads a small entry's blob; a missing one is left to the full path."""
        if self.max_bytes == 0 or not plain_hit_request(environ, self._planned) or not entry.is_fresh(self._clock()):
            return
        cc, _ = response_directives(entry.headers, self._rules.targeted_fields)
        if cc.no_cache:
            return
        held = self._table.get(entry.key)
        known = held.answers.get(entry.variant) if held else None
        if known is not None and known.entry == entry:
            return
        body = blob_path = None
        if entry.size <= self.max_object_size:
            body = self._read(entry)
            if body is None:
                return
        else:
            blob_path = self._store.path(entry.hash)
        opts = hit.options_for(entry)
        head = whole_fields(opts, opts.etag or etag_for(entry), entry.size)
        weight = (len(body or b"") + _OVERHEAD + sum(len(k) + len(v) for k, v in head) + len(entry.key)
                  + len(blob_path or "") + (_VARIED_SLOTS * _VARIED_SLOT_BYTES if entry.vary else 0))
        if weight > self.max_bytes:
            return
        self._put(HotAnswer(entry, opts.status, tuple(head), body, weight, (entry.key, entry.variant), blob_path))

    def _read(self, entry: Entry) -> bytes | None:
        """The blob's bytes, if it is there and has the entry's size."""
        try:
            file = self._store.open(entry.hash, buffered=False)
        except BlobNotFound:
            return None
        with file:
            body = os.pread(file.fileno(), entry.size + 1, 0)
        return body if len(body) == entry.size else None

    def _put(self, answer: HotAnswer) -> None:
        entry = answer.entry
        with self._lock:
            held = self._table.pop(entry.key, None)  # re-inserted last: the newest learnt
            answers = held.answers if held else {}
            old = answers.get(entry.variant)
            if old is not None:
                self._bytes -= old.weight
            self._table[entry.key] = _Known({**answers, entry.variant: answer})
            self._bytes += answer.weight
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._table))
                for gone in self._table.pop(oldest).answers.values():
                    self._bytes -= gone.weight

    def _prune(self, key: str, entries: list[Entry]) -> None:
        """Drop ``key``'s answers whose entries the index no longer holds as they were."""
        with self._lock:
            held = self._table.get(key)
            if held is None:
                return
            kept = {v: a for v, a in held.answers.items() if a.entry in entries}
            if kept:
                self._table[key] = _Known(kept)
            else:
                del self._table[key]
            self._bytes -= sum(a.weight for v, a in held.answers.items() if v not in kept)

    def clear(self) -> None:
        """Forget every answer."""
        with self._lock:
            self._table = {}
            self._bytes = 0
