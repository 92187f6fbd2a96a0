"""The entry index: which stored blob answers which request key.

An :class:`Entry` holds what a hit needs besides the bytes: the blob's hash
and size, the status and headers to replay, when it was stored and until when
it is fresh, and the request headers it varies on. :class:`SQLiteIndex` is the
embedded default (one SQLite file in WAL mode, safe across processes); other
backends implement :class:`Index`.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, TypeVar

from .hashing import Hash
from .logutil import warn_limited

log = logging.getLogger("cachefetch.index")
_T = TypeVar("_T")

__all__ = ["Entry", "Index", "SQLiteIndex", "IndexUnavailable"]


@dataclass(frozen=True)
class Entry:
    """One cached response.

    :param key: the request key (the resource).
    :param variant: the request's values of the ``vary`` headers, normalised;
        ``""`` when the response does not vary.
    :param expires_at: epoch seconds after which the entry is stale; ``None``
        for fresh until evicted.
    :param stored_at: when the response was received (its ``response_time``).
    :param initial_age: its corrected initial age when stored (RFC 9111 §4.2.3),
        so its current age is ``initial_age + (now - stored_at)``.
    """

    key: str
    variant: str
    hash: Hash
    size: int
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    stored_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    vary: tuple[str, ...] = ()
    initial_age: float = 0

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not isinstance(self.variant, str):
            raise TypeError("Entry key and variant must be str")
        if not isinstance(self.hash, Hash):
            raise TypeError("Entry hash must be a Hash")
        if not isinstance(self.size, int) or self.size < 0:
            raise ValueError("Entry size must be an int >= 0")

    def age(self, now: float | None = None) -> int:
        """Its current age in whole seconds (RFC 9111 §4.2.3), as ``Age`` sends it."""
        now = time.time() if now is None else now
        return int(max(0.0, now - self.stored_at) + self.initial_age)

    def ttl(self, now: float | None = None) -> float | None:
        """Seconds of freshness left (negative once stale); ``None`` if unlimited."""
        if self.expires_at is None:
            return None
        return self.expires_at - (time.time() if now is None else now)

    @property
    def lifetime(self) -> float | None:
        """The freshness lifetime it was stored with; ``None`` if unlimited."""
        if self.expires_at is None:
            return None
        return self.expires_at - self.stored_at + self.initial_age

    def is_fresh(self, now: float | None = None) -> bool:
        """Whether the entry may be served without going to the origin."""
        ttl = self.ttl(now)
        return ttl is None or ttl > 0


class Index(Protocol):
    """The entry index seam: what the middleware, the proxy and maintenance
    need from an index. Implementations are thread-safe and shared by every
    process on a store; :class:`SQLiteIndex` is the embedded one.

    ``get`` must reflect every ``put``/``delete`` already returned, in any
    process (an invalidation must be seen by the very next request).
    """

    def get(self, key: str) -> list[Entry]:
        """Every stored variant for ``key`` (usually zero or one)."""

    def put(self, entry: Entry) -> None:
        """Store ``entry``, replacing the one with the same key and variant."""

    def delete(self, key: str, variant: str | None = None) -> int:
        """Remove one variant, or every variant when ``variant`` is None; returns how many."""

    def touch_many(self, uses: dict[tuple[str, str], float]) -> None:
        """Record uses of entries, ``{(key, variant): when}`` (for eviction)."""

    def totals(self) -> tuple[int, int]:
        """``(entries, bytes of the distinct blobs they point at)``."""

    def referenced(self, h: Hash) -> bool:
        """Whether any entry points at blob ``h``."""

    def __iter__(self) -> Iterator[Entry]:
        """Every entry."""

    def close(self) -> None:
        """Release resources held by this process."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT NOT NULL,
    variant TEXT NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    status INTEGER NOT NULL,
    headers TEXT NOT NULL,
    stored_at REAL NOT NULL,
    expires_at REAL,
    vary TEXT NOT NULL,
    initial_age INTEGER NOT NULL,
    last_used REAL NOT NULL,
    PRIMARY KEY (key, variant)
);
CREATE INDEX IF NOT EXISTS entries_hash ON entries(hash);
"""
_GENERATION_SIZE = 16
_MEMO_SLOTS = 4096
_COLUMNS = "key, variant, hash, size, status, headers, stored_at, expires_at, vary, initial_age"


def _healing(method: Callable[..., _T]) -> Callable[..., _T]:
    """Run an index operation; a SQLite or OS failure becomes IndexUnavailable
    (and the failed connection is dropped, so the next call reconnects)."""

    @functools.wraps(method)
    def healing(self: "SQLiteIndex", *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            raise self._failed(exc) from exc

    return healing


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _is_damage(exc: BaseException) -> bool:
    """Whether a SQLite error says the file is not a (sound) database."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text
                                                       or "file is encrypted" in text)


def _entry(row: tuple) -> Entry:
    key, variant, hexhash, size, status, headers, stored_at, expires_at, vary, initial_age = row
    return Entry(key, variant, Hash.from_hex(hexhash), size, status,
                 tuple(tuple(h) for h in json.loads(headers)), stored_at, expires_at,
                 tuple(json.loads(vary)), initial_age)


def _set_journal(db: sqlite3.Connection, timeout: float) -> None:
    """Use a rollback journal (``TRUNCATE``), not WAL: WAL maps its ``-shm``
    file into memory, and a store that turns read-only or vanishes under a
    mapping kills the process with SIGBUS, which no handler survives. While
    another process creates or converts the database SQLite can answer "locked"
    at once: retry until ``timeout``, then go on in the mode the file has."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=TRUNCATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                log.warning("could not switch %s to a rollback journal (in use): %s", db, exc)
                return
            time.sleep(0.01)


class IndexUnavailable(Exception):
    """The index cannot be read or written now (its store vanished, turned
    read-only, or the database is damaged). The caller answers uncached; the
    next call reconnects, so caching resumes when the store comes back."""


def _quarantine(path: str) -> str | None:
    """Move a damaged database (and its journal) aside; returns the new name."""
    aside = f"{path}.damaged-{int(time.time())}"
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    for suffix in ("-journal", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
    return aside


class SQLiteIndex:
    """An :class:`Index` in one SQLite database (rollback journal, see
    :func:`_set_journal`).

    Each thread of each process gets its own connection (SQLite connections
    must not cross threads or a ``fork``). The index heals: a connection that
    fails is dropped and reopened on the next call; once a second each
    connection checks that the database file is still the one it opened (a
    store directory deleted and recreated gets a new, empty index); a database
    that is not one (damaged) is moved aside to ``<path>.damaged-<time>`` and
    rebuilt empty, at start and whenever an operation finds it so. Failures
    reach callers as :class:`IndexUnavailable`.

    ``get`` answers hot keys from a per-process memo, which is dropped
    whenever any process changes the index: every ``put`` and ``delete``
    writes a new token to the *generation file* beside the database
    (``<path>.gen``), and ``get`` compares it (one ``pread``) before using
    the memo. An invalidation is so seen by every worker's next request.

    :param path: the database file; its directory must exist (later, it is
        recreated if it vanishes).
    :param busy_timeout: seconds to wait for another writer's lock.
    :param heal: move a damaged database aside and rebuild it (``False``, for
        tools that only look, raises instead).
    :raises FileNotFoundError: if the directory does not exist.
    :raises sqlite3.Error: if the database cannot be opened or created.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout: float = 10.0, *, heal: bool = True) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"index path must be a path, not {type(path).__name__}")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0")
        self.path = os.fspath(path)
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self.generation_path = self.path + ".gen"
        if not os.path.isdir(os.path.dirname(os.path.abspath(self.path))):
            raise FileNotFoundError(f"the index's directory does not exist: {self.path}")
        self._heal = heal
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            if not (heal and _is_damage(exc)):
                raise
            self._rebuild(exc)
            self._connect()
        # key -> entries, valid while the generation file reads _memo_generation.
        self._memo: dict[str, list[Entry]] = {}
        self._memo_generation = b""

    def __repr__(self) -> str:
        return f"SQLiteIndex({self.path!r})"

    def _connect(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) == os.getpid() and not self._replaced(local):
            return local.db
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                             check_same_thread=True)
        try:
            _set_journal(db, self._busy_timeout)
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        local.db, local.pid = db, os.getpid()
        local.ino, local.checked = _inode(self.path), time.monotonic()
        return db

    def _replaced(self, local: threading.local) -> bool:
        """Once a second: whether the file was removed or replaced since this
        thread opened it (then its connection and generation file are dropped)."""
        now = time.monotonic()
        if now - local.checked < 1.0:
            return False
        local.checked = now
        if _inode(self.path) == local.ino:
            return False
        log.warning("the index %s was removed or replaced; reopening it", self.path)
        self._drop(local)
        return True

    def _drop(self, local: threading.local) -> None:
        """Forget this thread's connection and generation file (after a failure)."""
        db, local.db, local.pid = getattr(local, "db", None), None, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass
        if getattr(local, "gen_pid", None) == os.getpid():
            os.close(local.gen_fd)
        local.gen_pid = None
        self._memo = {}

    def _rebuild(self, exc: BaseException) -> None:
        aside = _quarantine(self.path)
        log.error("the index %s is damaged (%s): moved aside to %s and rebuilt empty; "
                  "its blobs stay for gc", self.path, exc, aside)

    def _failed(self, exc: BaseException) -> IndexUnavailable:
        """Turn a failure into IndexUnavailable, dropping what failed so the next call heals."""
        self._drop(self._local)
        if self._heal and isinstance(exc, sqlite3.DatabaseError) and _is_damage(exc):
            self._rebuild(exc)
        warn_limited(log, "index", "the index %s is unavailable: %s", self.path, exc)
        return IndexUnavailable(f"{self.path}: {exc}")

    def _generation_fd(self) -> int:
        local = self._local
        if getattr(local, "gen_pid", None) != os.getpid():  # like connections: per thread, per process
            self._connect()  # the database first: it recreates the directory if it went
            local.gen_fd = os.open(self.generation_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            local.gen_pid = os.getpid()
        return local.gen_fd

    @_healing
    def generation(self) -> bytes:
        """A token that changes whenever any process changes the index."""
        return os.pread(self._generation_fd(), _GENERATION_SIZE, 0)

    def _changed(self) -> None:
        """Tell every process that the index changed (after the change committed)."""
        self._memo = {}
        os.pwrite(self._generation_fd(), secrets.token_bytes(_GENERATION_SIZE), 0)

    @_healing
    def get(self, key: str) -> list[Entry]:
        """Every stored variant for ``key``, as of every change already made."""
        generation = self.generation()
        if generation != self._memo_generation:
            self._memo, self._memo_generation = {}, generation
        memo = self._memo
        entries = memo.get(key)
        if entries is not None:
            return entries
        rows = self._connect().execute(f"SELECT {_COLUMNS} FROM entries WHERE key = ?", (key,)).fetchall()
        entries = [_entry(r) for r in rows]
        if entries:  # an absence is never remembered: a commit elsewhere must show at once
            if len(memo) >= _MEMO_SLOTS:
                memo.clear()
            memo[key] = entries
        return entries

    @_healing
    def put(self, entry: Entry) -> None:
        """Store ``entry``, replacing the one with the same key and variant."""
        if not isinstance(entry, Entry):
            raise TypeError(f"put takes an Entry, not {type(entry).__name__}")
        self._connect().execute(
            f"INSERT OR REPLACE INTO entries ({_COLUMNS}, last_used) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (entry.key, entry.variant, entry.hash.hex, entry.size, entry.status,
             json.dumps(entry.headers), entry.stored_at, entry.expires_at,
             json.dumps(entry.vary), entry.initial_age, time.time()))
        self._changed()

    @_healing
    def delete(self, key: str, variant: str | None = None) -> int:
        """Remove one variant, or all of ``key``'s; returns how many rows went."""
        db = self._connect()
        if variant is None:
            gone = db.execute("DELETE FROM entries WHERE key = ?", (key,)).rowcount
        else:
            gone = db.execute("DELETE FROM entries WHERE key = ? AND variant = ?", (key, variant)).rowcount
        self._changed()
        return gone

    @_healing
    def delete_hash(self, h: Hash) -> int:
        """Remove every entry that points at blob ``h``; returns how many."""
        gone = self._connect().execute("DELETE FROM entries WHERE hash = ?", (h.hex,)).rowcount
        self._changed()
        return gone

    @_healing
    def touch(self, key: str, variant: str, when: float | None = None) -> None:
        """Record a use of an entry."""
        self._connect().execute("UPDATE entries SET last_used = ? WHERE key = ? AND variant = ?",
                                (time.time() if when is None else when, key, variant))

    @_healing
    def __iter__(self) -> Iterator[Entry]:
        """Every entry, as a snapshot."""
        rows = self._connect().execute(f"SELECT {_COLUMNS} FROM entries").fetchall()
        return iter([_entry(r) for r in rows])

    @_healing
    def totals(self) -> tuple[int, int]:
        """``(entries, bytes of the distinct blobs they point at)``."""
        db = self._connect()
        entries = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        size = db.execute("SELECT COALESCE(SUM(size), 0) FROM (SELECT DISTINCT hash, size FROM entries)").fetchone()[0]
        return entries, size

    @_healing
    def least_recently_used(self, limit: int = 1000, used_before: float | None = None,
                            offset: int = 0) -> list[Entry]:
        """Up to ``limit`` entries, least recently used first (only those last
        used before ``used_before``, if given), after skipping ``offset``."""
        rows = self._connect().execute(
            f"SELECT {_COLUMNS} FROM entries WHERE last_used < ? ORDER BY last_used ASC, key, variant "
            "LIMIT ? OFFSET ?",
            (float("inf") if used_before is None else used_before, limit, offset)).fetchall()
        return [_entry(r) for r in rows]

    @_healing
    def touch_many(self, uses: dict[tuple[str, str], float]) -> None:
        """Record many uses at once: ``{(key, variant): when}``."""
        self._connect().executemany("UPDATE entries SET last_used = ? WHERE key = ? AND variant = ?",
                                    [(when, key, variant) for (key, variant), when in uses.items()])

    @_healing
    def referenced(self, h: Hash) -> bool:
        """Whether any entry points at blob ``h``."""
        return self._connect().execute("SELECT 1 FROM entries WHERE hash = ? LIMIT 1", (h.hex,)).fetchone() is not None

    @_healing
    def __len__(self) -> int:
        return self._connect().execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        """Close this thread's connection and generation file."""
        local = self._local
        db = getattr(local, "db", None)
        if db is not None and local.pid == os.getpid():
            db.close()
        if getattr(local, "gen_pid", None) == os.getpid():
            os.close(local.gen_fd)
        self._local = threading.local()
