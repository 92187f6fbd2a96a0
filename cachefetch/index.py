"""The entry index: which stored blob answers which request key.

An :class:`Entry` holds what a hit needs besides the bytes: the blob's hash
and size, the status and headers to replay, when it was stored and until when
it is fresh, and the request headers it varies on. :class:`SQLiteIndex` is the
embedded default (one SQLite file in WAL mode, safe across processes); other
backends implement :class:`Index`.
"""
from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from .hashing import Hash

__all__ = ["Entry", "Index", "SQLiteIndex"]


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


def _entry(row: tuple) -> Entry:
    key, variant, hexhash, size, status, headers, stored_at, expires_at, vary, initial_age = row
    return Entry(key, variant, Hash.from_hex(hexhash), size, status,
                 tuple(tuple(h) for h in json.loads(headers)), stored_at, expires_at,
                 tuple(json.loads(vary)), initial_age)


def _set_wal(db: sqlite3.Connection, timeout: float) -> None:
    """Switch ``db`` to WAL mode. While another process creates the database
    or switches it, SQLite can answer "database is locked" at once, without
    waiting for the busy timeout: retry until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


class SQLiteIndex:
    """An :class:`Index` in one SQLite database in WAL mode.

    Each thread of each process gets its own connection (SQLite connections
    must not cross threads or a ``fork``), and WAL lets readers run while one
    writer commits.

    ``get`` answers hot keys from a per-process memo, which is dropped
    whenever any process changes the index: every ``put`` and ``delete``
    writes a new token to the *generation file* beside the database
    (``<path>.gen``), and ``get`` compares it (one ``pread``) before using
    the memo. An invalidation is so seen by every worker's next request.

    :param path: the database file; its directory must exist.
    :param busy_timeout: seconds to wait for another writer's lock.
    :raises sqlite3.Error: if the database cannot be opened or created.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout: float = 10.0) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"index path must be a path, not {type(path).__name__}")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0")
        self.path = os.fspath(path)
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        with self._connect() as db:
            db.executescript(_SCHEMA)
        self.generation_path = self.path + ".gen"
        # key -> entries, valid while the generation file reads _memo_generation.
        self._memo: dict[str, list[Entry]] = {}
        self._memo_generation = b""

    def __repr__(self) -> str:
        return f"SQLiteIndex({self.path!r})"

    def _connect(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                                 check_same_thread=True)
            _set_wal(db, self._busy_timeout)
            db.execute("PRAGMA synchronous=NORMAL")
            local.db, local.pid = db, os.getpid()
        return local.db

    def _generation_fd(self) -> int:
        local = self._local
        if getattr(local, "gen_pid", None) != os.getpid():  # like connections: per thread, per process
            local.gen_fd = os.open(self.generation_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            local.gen_pid = os.getpid()
        return local.gen_fd

    def generation(self) -> bytes:
        """A token that changes whenever any process changes the index."""
        return os.pread(self._generation_fd(), _GENERATION_SIZE, 0)

    def _changed(self) -> None:
        """Tell every process that the index changed (after the change committed)."""
        self._memo = {}
        os.pwrite(self._generation_fd(), secrets.token_bytes(_GENERATION_SIZE), 0)

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

    def delete(self, key: str, variant: str | None = None) -> int:
        """Remove one variant, or all of ``key``'s; returns how many rows went."""
        db = self._connect()
        if variant is None:
            gone = db.execute("DELETE FROM entries WHERE key = ?", (key,)).rowcount
        else:
            gone = db.execute("DELETE FROM entries WHERE key = ? AND variant = ?", (key, variant)).rowcount
        self._changed()
        return gone

    def delete_hash(self, h: Hash) -> int:
        """Remove every entry that points at blob ``h``; returns how many."""
        gone = self._connect().execute("DELETE FROM entries WHERE hash = ?", (h.hex,)).rowcount
        self._changed()
        return gone

    def touch(self, key: str, variant: str, when: float | None = None) -> None:
        """Record a use of an entry."""
        self._connect().execute("UPDATE entries SET last_used = ? WHERE key = ? AND variant = ?",
                                (time.time() if when is None else when, key, variant))

    def __iter__(self) -> Iterator[Entry]:
        """Every entry, as a snapshot."""
        rows = self._connect().execute(f"SELECT {_COLUMNS} FROM entries").fetchall()
        return iter([_entry(r) for r in rows])

    def totals(self) -> tuple[int, int]:
        """``(entries, bytes of the distinct blobs they point at)``."""
        db = self._connect()
        entries = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        size = db.execute("SELECT COALESCE(SUM(size), 0) FROM (SELECT DISTINCT hash, size FROM entries)").fetchone()[0]
        return entries, size

    def least_recently_used(self, limit: int = 1000, used_before: float | None = None,
                            offset: int = 0) -> list[Entry]:
        """Up to ``limit`` entries, least recently used first (only those last
        used before ``used_before``, if given), after skipping ``offset``."""
        rows = self._connect().execute(
            f"SELECT {_COLUMNS} FROM entries WHERE last_used < ? ORDER BY last_used ASC, key, variant "
            "LIMIT ? OFFSET ?",
            (float("inf") if used_before is None else used_before, limit, offset)).fetchall()
        return [_entry(r) for r in rows]

    def touch_many(self, uses: dict[tuple[str, str], float]) -> None:
        """Record many uses at once: ``{(key, variant): when}``."""
        self._connect().executemany("UPDATE entries SET last_used = ? WHERE key = ? AND variant = ?",
                                    [(when, key, variant) for (key, variant), when in uses.items()])

    def referenced(self, h: Hash) -> bool:
        """Whether any entry points at blob ``h``."""
        return self._connect().execute("SELECT 1 FROM entries WHERE hash = ? LIMIT 1", (h.hex,)).fetchone() is not None

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
