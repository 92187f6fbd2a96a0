"""The entry index: which stored blob answers which request key.

An :class:`Entry` holds what a hit needs besides the bytes: the blob's hash
and size, the status and headers to replay, when it was stored and until when
it is fresh, and the request headers it varies on. :class:`SQLiteIndex` is the
embedded default (one SQLite file with a rollback journal, safe across processes); other
backends implement :class:`Index`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import mmap
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator, Protocol, TypeVar

import blake3

from .eviction.state import FREQ_CAP, MAIN, PENDING, SMALL, Item
from .hashing import Hash
from .logutil import warn_limited

log = logging.getLogger("cachefetch.index")
_T = TypeVar("_T")

__all__ = ["Entry", "Index", "MaintainedIndex", "SQLiteIndex", "SQLiteQueues", "Usage", "ROW_WEIGHT", "IndexUnavailable"]


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
        """Every stored variant for ``key`` (usually zero or one). A list once
        returned is never changed: a change returns a new one (the hot path
        takes the same list object again to mean nothing changed)."""

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


#: Schema version (``PRAGMA user_version``): 2 added running totals, blob
#: reference counts and the eviction queues; 3 dropped the index of entries
#: by hash (see :data:`_V3`).
_VERSION = 3
#: What a row costs in its eviction queue besides its body: an estimate of an
#: entry's own footprint in the index (key, headers and its index entries).
#: It lets an entry whose blob is shared (every 404 shares one) weigh
#: something; the size limit itself counts the index file as it really is.
ROW_WEIGHT = 512

_TABLES = f"""
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
"""
# Added by version 2 (to a version 1 table by ALTER TABLE, hence defaults).
_QUEUE_COLUMNS = ("queue INTEGER NOT NULL DEFAULT 0", "seq INTEGER NOT NULL DEFAULT 0",
                  "freq INTEGER NOT NULL DEFAULT 0")
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_V2 = f"""
CREATE INDEX IF NOT EXISTS entries_last_used ON entries(last_used, key, variant);
CREATE INDEX IF NOT EXISTS entries_queue ON entries(queue, seq);
CREATE INDEX IF NOT EXISTS entries_expiry ON entries(expires_at) WHERE expires_at IS NOT NULL;
-- One row per distinct blob the entries point at, refs = 0 once none does
-- (the file is still there until gc removes it).
CREATE TABLE IF NOT EXISTS blobs (
    hash TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    refs INTEGER NOT NULL,
    unreferenced_since REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_unreferenced ON blobs(unreferenced_since) WHERE refs = 0;
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    entries INTEGER NOT NULL,
    blobs INTEGER NOT NULL,
    blob_bytes INTEGER NOT NULL,
    orphan_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS queues (
    queue INTEGER PRIMARY KEY,
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ghost (
    id INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL,
    weight INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ghost_seq ON ghost(seq);
CREATE TABLE IF NOT EXISTS eviction (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    next_seq INTEGER NOT NULL,
    ghost_bytes INTEGER NOT NULL,
    been_full INTEGER NOT NULL
);
INSERT OR IGNORE INTO eviction VALUES (0, 1, 0, 0);
INSERT OR IGNORE INTO queues VALUES ({PENDING}, 0, 0), ({SMALL}, 0, 0), ({MAIN}, 0, 0);
"""
# The running totals, kept in the same transaction as the change they count:
# whoever writes an entry (any process, any code path) keeps them exact. (An
# upsert, not INSERT OR IGNORE: in a trigger, the outer statement's conflict
# policy overrides an OR clause.)
_TRIGGERS = f"""
CREATE TRIGGER IF NOT EXISTS entry_added AFTER INSERT ON entries BEGIN
    INSERT INTO blobs VALUES (new.hash, new.size, 1, NULL)
        ON CONFLICT (hash) DO UPDATE SET refs = refs + 1, unreferenced_since = NULL;
    UPDATE totals SET entries = entries + 1;
    UPDATE queues SET entries = entries + 1, bytes = bytes + new.size + {ROW_WEIGHT} WHERE queue = new.queue;
END;
CREATE TRIGGER IF NOT EXISTS entry_removed AFTER DELETE ON entries BEGIN
    UPDATE blobs SET refs = refs - 1, unreferenced_since = {_NOW} WHERE hash = old.hash;
    UPDATE totals SET entries = entries - 1;
    UPDATE queues SET entries = entries - 1, bytes = bytes - old.size - {ROW_WEIGHT} WHERE queue = old.queue;
END;
CREATE TRIGGER IF NOT EXISTS entry_rehashed AFTER UPDATE OF hash ON entries
WHEN old.hash IS NOT new.hash BEGIN
    INSERT INTO blobs VALUES (new.hash, new.size, 1, NULL)
        ON CONFLICT (hash) DO UPDATE SET refs = refs + 1, unreferenced_since = NULL;
    UPDATE blobs SET refs = refs - 1, unreferenced_since = {_NOW} WHERE hash = old.hash;
END;
CREATE TRIGGER IF NOT EXISTS entry_requeued AFTER UPDATE OF queue, size ON entries
WHEN old.queue IS NOT new.queue OR old.size IS NOT new.size BEGIN
    UPDATE queues SET entries = entries - 1, bytes = bytes - old.size - {ROW_WEIGHT} WHERE queue = old.queue;
    UPDATE queues SET entries = entries + 1, bytes = bytes + new.size + {ROW_WEIGHT} WHERE queue = new.queue;
END;
CREATE TRIGGER IF NOT EXISTS blob_added AFTER INSERT ON blobs BEGIN
    UPDATE totals SET blobs = blobs + 1,
        blob_bytes = blob_bytes + CASE WHEN new.refs > 0 THEN new.size ELSE 0 END,
        orphan_bytes = orphan_bytes + CASE WHEN new.refs > 0 THEN 0 ELSE new.size END;
END;
CREATE TRIGGER IF NOT EXISTS blob_referenced AFTER UPDATE OF refs ON blobs
WHEN old.refs <= 0 AND new.refs > 0 BEGIN
    UPDATE totals SET blob_bytes = blob_bytes + new.size, orphan_bytes = orphan_bytes - new.size;
END;
CREATE TRIGGER IF NOT EXISTS blob_unreferenced AFTER UPDATE OF refs ON blobs
WHEN old.refs > 0 AND new.refs <= 0 BEGIN
    UPDATE totals SET blob_bytes = blob_bytes - new.size, orphan_bytes = orphan_bytes + new.size;
END;
CREATE TRIGGER IF NOT EXISTS blob_removed AFTER DELETE ON blobs BEGIN
    UPDATE totals SET blobs = blobs - 1,
        blob_bytes = blob_bytes - CASE WHEN old.refs > 0 THEN old.size ELSE 0 END,
        orphan_bytes = orphan_bytes - CASE WHEN old.refs > 0 THEN 0 ELSE old.size END;
END;
CREATE TRIGGER IF NOT EXISTS ghost_added AFTER INSERT ON ghost BEGIN
    UPDATE eviction SET ghost_bytes = ghost_bytes + new.weight;
END;
CREATE TRIGGER IF NOT EXISTS ghost_removed AFTER DELETE ON ghost BEGIN
    UPDATE eviction SET ghost_bytes = ghost_bytes - old.weight;
END;
"""
# A version 1 index gets its counts from one pass over its rows, once.
_BACKFILL = f"""
INSERT OR IGNORE INTO blobs (hash, size, refs)
    SELECT hash, MAX(size), COUNT(*) FROM entries GROUP BY hash;
INSERT OR REPLACE INTO totals
    SELECT 0, (SELECT COUNT(*) FROM entries), COUNT(*), COALESCE(SUM(size), 0), 0 FROM blobs;
INSERT OR REPLACE INTO queues
    SELECT {PENDING}, COUNT(*), COALESCE(SUM(size + {ROW_WEIGHT}), 0) FROM entries;
"""
# Version 3: no index of entries by hash. Only verify looked entries up by
# hash (one scan for all the blobs it found missing or corrupt); every
# eviction paid for it, a random page of a fifth of the file per victim.
#
# And the triggers an eviction fires once per victim stand aside while
# ``eviction.bulk`` is 1: the eviction's own statements then keep the same
# counts once per batch (:class:`_Bulk`). Only the writer holding the lock
# can see a 1 (it is set and cleared inside one transaction, so a rollback
# or a crash leaves 0), so for every other writer the triggers run as before.
_SOLO = "(SELECT bulk FROM eviction) = 0"
_V3 = f"""
DROP INDEX IF EXISTS entries_hash;
ALTER TABLE eviction ADD COLUMN bulk INTEGER NOT NULL DEFAULT 0;
DROP TRIGGER IF EXISTS entry_removed;
CREATE TRIGGER entry_removed AFTER DELETE ON entries WHEN {_SOLO} BEGIN
    UPDATE blobs SET refs = refs - 1, unreferenced_since = {_NOW} WHERE hash = old.hash;
    UPDATE totals SET entries = entries - 1;
    UPDATE queues SET entries = entries - 1, bytes = bytes - old.size - {ROW_WEIGHT} WHERE queue = old.queue;
END;
DROP TRIGGER IF EXISTS blob_unreferenced;
CREATE TRIGGER blob_unreferenced AFTER UPDATE OF refs ON blobs
WHEN old.refs > 0 AND new.refs <= 0 AND {_SOLO} BEGIN
    UPDATE totals SET blob_bytes = blob_bytes - new.size, orphan_bytes = orphan_bytes + new.size;
END;
DROP TRIGGER IF EXISTS blob_removed;
CREATE TRIGGER blob_removed AFTER DELETE ON blobs WHEN {_SOLO} BEGIN
    UPDATE totals SET blobs = blobs - 1,
        blob_bytes = blob_bytes - CASE WHEN old.refs > 0 THEN old.size ELSE 0 END,
        orphan_bytes = orphan_bytes - CASE WHEN old.refs > 0 THEN 0 ELSE old.size END;
END;
DROP TRIGGER IF EXISTS ghost_added;
CREATE TRIGGER ghost_added AFTER INSERT ON ghost WHEN {_SOLO} BEGIN
    UPDATE eviction SET ghost_bytes = ghost_bytes + new.weight;
END;
DROP TRIGGER IF EXISTS ghost_removed;
CREATE TRIGGER ghost_removed AFTER DELETE ON ghost WHEN {_SOLO} BEGIN
    UPDATE eviction SET ghost_bytes = ghost_bytes - old.weight;
END;
"""


class MaintainedIndex(Index, Protocol):
    """What upkeep (``cachefetch.maintenance``: verify, gc, the size limit, S3-FIFO)
    needs beyond :class:`Index`: running totals, blob accounting and the eviction
    queues. :class:`SQLiteIndex` implements it; a fleet index delegates it to the
    host's own SQLiteIndex (each host evicts its own blobs)."""

    def usage(self) -> "Usage":
        """The running totals and the index's own size, in O(1)."""

    def delete_hash(self, h: Hash) -> int:
        """Remove every entry that points at blob ``h``."""

    def delete_hashes(self, hashes: Iterable[Hash]) -> int:
        """Remove every entry that points at any of ``hashes`` (one scan)."""

    def known(self, h: Hash) -> bool:
        """Whether the index accounts for blob ``h``."""

    def known_among(self, hashes: Iterable[Hash]) -> set[Hash]:
        """Those of ``hashes`` the index accounts for."""

    def unreferenced_blobs(self, before: float, limit: int = 1000) -> list[tuple[Hash, int]]:
        """Blobs no entry has pointed at since before ``before``."""

    def blob_hashes(self) -> Iterator[Hash]:
        """Every blob some entry points at."""

    def keys_for(self, h: Hash) -> list[tuple[str, str]]:
        """``(key, variant)`` of every entry pointing at ``h``."""

    def naming(self, hashes: Iterable[Hash]) -> list[tuple[str, str, Hash]]:
        """``(key, variant, hash)`` of every entry pointing at any of ``hashes`` (one scan)."""

    def forget_blob(self, h: Hash) -> bool:
        """Stop counting blob ``h`` (its file is gone)."""

    def forget_unreferenced(self, hashes: Iterable[Hash]) -> list[Hash]:
        """Stop counting those of ``hashes`` no entry points at; returns them."""

    def purge_expired(self, before: float, limit: int = 1000) -> int:
        """Delete entries that expired before ``before``."""

    def transaction(self, *, large: bool = False, forget_blobs: bool = False) -> Any:
        """A context manager: one write transaction (``large``: one that
        changes many pages, kept in memory until the commit; ``forget_blobs``:
        the blobs its evictions leave unreferenced are forgotten at once, and
        :meth:`forget_unreferenced` reports them)."""

    def large_transactions(self) -> Any:
        """A context manager: the transactions within may each change many
        pages (kept in memory until each commit)."""

    def queues(self) -> Any:
        """The eviction queues' state (``cachefetch.eviction``)."""

    def compact(self) -> None:
        """Give free space back to the file system."""


_GENERATION_SIZE = 16
_MEMO_SLOTS = 4096
_COLUMNS = "key, variant, hash, size, status, headers, stored_at, expires_at, vary, initial_age"
_ITEM_COLUMNS = "key, variant, size, queue, freq, last_used, hash, rowid"
_UPSERT = (f"INSERT INTO entries ({_COLUMNS}, last_used) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
           "ON CONFLICT (key, variant) DO UPDATE SET hash = excluded.hash, size = excluded.size, "
           "status = excluded.status, headers = excluded.headers, stored_at = excluded.stored_at, "
           "expires_at = excluded.expires_at, vary = excluded.vary, initial_age = excluded.initial_age, "
           "last_used = excluded.last_used")
# A use: the last-use time for LRU, one more use (at most FREQ_CAP) for S3-FIFO.
_TOUCH = f"UPDATE entries SET last_used = ?, freq = MIN(freq + 1, {FREQ_CAP}) WHERE key = ? AND variant = ?"


class _Moved(sqlite3.OperationalError):
    """The database file was moved or replaced while a connection used it."""


def _checked(*, converting: bool) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Run an index operation, then confirm that the file it used is still
    the path's (:meth:`SQLiteIndex._confirm`): one made on a moved file
    raises IndexUnavailable. With ``converting``, any SQLite or OS failure
    becomes IndexUnavailable too (and the failed connection is dropped, so
    the next call reconnects); without it (maintenance), the error reaches
    the caller as it is."""
    failures = (sqlite3.Error, OSError) if converting else _Moved

    def decorate(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def checked(self: "SQLiteIndex", *args: Any, **kwargs: Any) -> _T:
            local = self._local
            local.used = False
            try:
                result = method(self, *args, **kwargs)
                if local.used:
                    self._confirm(local)
                return result
            except failures as exc:
                raise self._failed(exc) from exc

        return checked

    return decorate


_healing = _checked(converting=True)
_confirmed = _checked(converting=False)


def _identity(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of the file at ``path``; ``None`` if there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _is_damage(exc: BaseException) -> bool:
    """Whether a SQLite error says the file is not a (sound) database."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text
                                                       or "file is encrypted" in text)


class _PreadView:
    """The generation file read with ``pread`` where it cannot be mapped.

    :param fd: a descriptor of its own (closed with the view, as a
        mapping's duplicate is), so no thread reads one closed under it.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __getitem__(self, part: slice) -> bytes:
        return os.pread(self._fd, part.stop, 0)

    def __del__(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


@dataclass(slots=True)
class _Generation:
    """This process's read-only view of the generation file, shared by its
    threads: ``identity`` is the database file the path named beside it,
    last confirmed at ``checked`` (``time.monotonic()``). ``checked`` is the
    one field that changes, on this record only: a renewal that put a new
    record in its place could, after losing a race, bring back the view of a
    replaced store. Never closed while shared: a view goes (and its
    descriptor is closed) when no thread holds it any more."""

    view: "mmap.mmap | _PreadView"
    pid: int
    identity: tuple[int, int] | None
    checked: float


def _entry(row: tuple) -> Entry:
    key, variant, hexhash, size, status, headers, stored_at, expires_at, vary, initial_age = row
    return Entry(key, variant, Hash.from_hex(hexhash), size, status,
                 tuple(tuple(h) for h in json.loads(headers)), stored_at, expires_at,
                 tuple(json.loads(vary)), initial_age)


def _item(row: tuple) -> Item:
    key, variant, size, queue, freq, last_used, hexhash, rowid = row
    # The index wrote the hex itself (Hash.from_hex's checks cost more than the rest of a row).
    return Item((key, variant), size + ROW_WEIGHT, queue, freq, last_used, Hash(bytes.fromhex(hexhash)), rowid)


def _retry_locked(db: sqlite3.Connection, timeout: float, step) -> None:
    """Run ``step(db)``. While another process creates the database or
    switches its journal mode, SQLite can answer "database is locked" at once,
    without waiting for the busy timeout: retry until ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            step(db)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _set_journal(db: sqlite3.Connection, timeout: float) -> None:
    """Use a rollback journal (``TRUNCATE``), not WAL: WAL maps its ``-shm``
    file into memory, and a store that turns read-only or vanishes under a
    mapping kills the process with SIGBUS, which no handler survives. If
    another process holds the file open in WAL mode (an index from before this
    change), go on in WAL until every process has reopened it."""
    try:
        _retry_locked(db, timeout, lambda d: d.execute("PRAGMA journal_mode=TRUNCATE"))
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        log.warning("could not switch %s to a rollback journal (in use): %s", db, exc)


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


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Run each statement of ``script`` inside the caller's transaction
    (``executescript`` would commit it)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete SQL: {statement!r:.80}")


def _migrate(db: sqlite3.Connection) -> None:
    """Bring the schema to :data:`_VERSION`, once, whoever gets there first."""
    if db.execute("PRAGMA user_version").fetchone()[0] == _VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _VERSION:
            raise sqlite3.DatabaseError(f"index schema version {version} is newer than this cachefetch's "
                                        f"({_VERSION})")
        if version < 2:
            _to_version_2(db)
        if version < 3:
            _run_script(db, _V3)
        if version < _VERSION:
            db.execute(f"PRAGMA user_version = {_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _to_version_2(db: sqlite3.Connection) -> None:
    """Create the tables (a new index) or add the totals, blob counts and
    eviction queues to a version 1 index, counting what it holds once."""
    fresh = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries'").fetchone() is None
    _run_script(db, _TABLES)
    have = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
    for column in _QUEUE_COLUMNS:
        if column.split()[0] not in have:
            db.execute(f"ALTER TABLE entries ADD COLUMN {column}")
    _run_script(db, _V2)
    db.execute("INSERT OR IGNORE INTO totals VALUES (0, 0, 0, 0, 0)")
    if not fresh:
        _run_script(db, _BACKFILL)
    _run_script(db, _TRIGGERS)


@dataclass(frozen=True, slots=True)
class Usage:
    """What a store's index accounts for, read in O(1).

    :param entries: rows.
    :param blobs: distinct blobs the index knows (referenced or not yet removed).
    :param blob_bytes: bytes of the distinct blobs some entry points at, each
        counted once however many entries share it.
    :param orphan_bytes: bytes of blobs no entry points at any more whose
        files gc has not removed yet.
    :param index_bytes: the database's pages in use (free pages are space
        SQLite reuses, or gives back: see :meth:`SQLiteIndex.compact`).
    :param wal_bytes: the size of its ``-wal`` file.
    """

    entries: int
    blobs: int
    blob_bytes: int
    orphan_bytes: int
    index_bytes: int
    wal_bytes: int

    @property
    def total(self) -> int:
        """Bytes the store takes on disk as far as the index knows."""
        return self.blob_bytes + self.orphan_bytes + self.index_bytes + self.wal_bytes


class SQLiteIndex:
    """An :class:`Index` in one SQLite database (rollback journal, see
    :func:`_set_journal`).

    Each thread of each process gets its own connection (SQLite connections
    must not cross threads or a ``fork``). Triggers keep running totals
    (:meth:`usage`), blob reference counts and the eviction queues' sizes in
    the same transaction as every change, so they stay exact across processes
    (an eviction's removals keep them with a statement per batch instead,
    in the same transaction too: see :class:`_Bulk`).

    The index heals: a connection that fails is dropped and reopened on the
    next call; before and after each use a connection checks that the
    database file is still the one it opened (a store directory deleted and
    recreated gets a new, empty index; see :meth:`_replaced` for why every
    use), and a ``get`` answered from the memo checks once a second; a database that is not one (damaged) is moved aside to
    ``<path>.damaged-<time>`` and rebuilt empty, at start and whenever an
    operation finds it so. Failures reach callers as :class:`IndexUnavailable`.

    ``get`` answers hot keys from a per-process memo, which is dropped
    whenever any process changes the index: every ``put`` and ``delete``
    writes a new token to the *generation file* beside the database
    (``<path>.gen``), and ``get`` compares it (read through a mapping: no
    system call) before using the memo. An invalidation is so seen by every
    worker's next request.

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
        self._gen: _Generation | None = None  # replaced by any thread (one assignment); only its checked changes
        #: Where a damaged database was moved before this index rebuilt it (None: it was sound).
        self.rebuilt_from: str | None = None
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
        local.used = True
        if getattr(local, "pid", None) == os.getpid():
            # Inside a transaction the file cannot be read anew (the lock is held):
            # the transaction's end is checked instead.
            if getattr(local, "txn", None) is not None or not self._replaced(local):
                return local.db
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        before = _identity(self.path)
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                             check_same_thread=True)
        try:
            # Only takes effect on a new database (before its first table):
            # then deleted rows give their pages back to the file system.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            _set_journal(db, self._busy_timeout)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            _retry_locked(db, self._busy_timeout, _migrate)
            opened = _identity(self.path)
            if opened is None or before not in (None, opened):
                raise _Moved(f"{self.path} was moved or replaced while it was being opened")
        except BaseException:
            db.close()
            raise
        local.db, local.pid = db, os.getpid()
        local.identity = opened
        return db

    def _replaced(self, local: threading.local) -> bool:
        """Whether the file was removed or replaced since this thread opened
        it (then its connection and generation file are dropped).

        Checked before every use of a connection, not now and then: SQLite
        names a rollback journal after the path, so a connection on a file
        moved away would take the journal of the database now at the path for
        its own, and while that one commits, replay its pages into its own
        file and read rows of other keys (``tests/test_index_replaced.py``)."""
        if _identity(self.path) == local.identity:
            return False
        log.warning("the index %s was removed or replaced; reopening it", self.path)
        self._drop(local)
        return True

    def _confirm(self, local: threading.local) -> None:
        """After an operation: raise :class:`_Moved` if the file the
        connection used is no longer the path's. What it read may then come
        from another database's journal, and what it wrote is not in the
        path's database; either way it must not be answered.

        :raises _Moved: if so (the connection is dropped first).
        """
        if getattr(local, "pid", None) == os.getpid() and getattr(local, "txn", None) is None \
                and _identity(self.path) != local.identity:
            self._drop(local)
            raise _Moved(f"{self.path} was moved or replaced during the operation")

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
        self._gen = None  # checked anew by the next get
        self._memo = {}

    def _rebuild(self, exc: BaseException) -> None:
        aside = self.rebuilt_from = _quarantine(self.path)
        log.error("the index %s is damaged (%s): moved aside to %s and rebuilt empty; "
                  "its blobs stay for gc", self.path, exc, aside)

    def _failed(self, exc: BaseException) -> IndexUnavailable:
        """Turn a failure into IndexUnavailable, dropping what failed so the next call heals."""
        local = self._local
        # Damage is judged only on the file the path still names: a read on a
        # moved one can look damaged (see _replaced) while the path's is sound.
        # (Without a connection, the failure was in opening the path's file.)
        ours = getattr(local, "pid", None) != os.getpid() or _identity(self.path) == local.identity
        self._drop(local)
        if self._heal and ours and isinstance(exc, sqlite3.DatabaseError) and _is_damage(exc):
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

    def _generation_view(self) -> "mmap.mmap | _PreadView":
        """This process's read-only mapping of the generation file, beside the
        database the path names (checked if the last check is a second old:
        a store deleted or replaced gets a view of its new file). Reading it
        is no system call, so a hit keeps the GIL (a ``pread`` gave it up, and
        under gunicorn's threads that cost context switches on every request).
        The file is only ever overwritten in place, never shortened, so a read
        of the mapping cannot fault past its end (SIGBUS)."""
        gen, now = self._gen, time.monotonic()
        if gen is not None and gen.pid == os.getpid():
            if now - gen.checked < 1.0:
                return gen.view
            identity = _identity(self.path)
            if identity is not None and identity == gen.identity:
                gen.checked = now
                # A thread that found the store replaced meanwhile may have put a newer view in its place.
                current = self._gen
                return (current if current is not None else gen).view
        self._connect()  # the database first: a changed file reopens this thread's connection and generation file
        fd = self._generation_fd()
        if os.fstat(fd).st_size < _GENERATION_SIZE:  # a new file: its first token
            os.pwrite(fd, secrets.token_bytes(_GENERATION_SIZE), 0)
        try:
            view: mmap.mmap | _PreadView = mmap.mmap(fd, _GENERATION_SIZE, prot=mmap.PROT_READ)  # dups fd
        except (OSError, ValueError):  # a file system that cannot map files: read it
            view = _PreadView(os.dup(fd))
        self._gen = _Generation(view, os.getpid(), self._local.identity, now)
        return view

    @_healing
    def generation(self) -> bytes:
        """A token that changes whenever any process changes the index."""
        return self._generation_view()[:_GENERATION_SIZE]

    def _changed(self) -> None:
        """Tell every process that the index changed (after the change committed)."""
        self._memo = {}
        os.pwrite(self._generation_fd(), secrets.token_bytes(_GENERATION_SIZE), 0)

    def get(self, key: str) -> list[Entry]:
        """Every stored variant for ``key``, as of every change already made.

        While the index is unchanged the same list (the memo's) is returned
        again: callers must not change it.
        """
        # Every hit comes through here, so a memo hit is answered before any
        # other call: no decorator, no thread-local, no getpid (a system call,
        # which costs a hit far more under gunicorn's threads than in a loop).
        # The mapping needs no per-process check: a MAP_SHARED view inherited
        # over a fork reads the same file. Connections do; _lookup checks them.
        gen = self._gen
        if gen is not None and time.monotonic() - gen.checked < 1.0 \
                and gen.view[:_GENERATION_SIZE] == self._memo_generation:
            entries = self._memo.get(key)
            if entries is not None:
                return entries
        return self._lookup(key)

    @_healing
    def _lookup(self, key: str) -> list[Entry]:
        """:meth:`get` past the memo: check the file if the last check is a
        second old (a memo hit uses no connection: a replaced file is still
        noticed within a second), renew the memo if the generation moved, read
        the rows."""
        # generation() without its own _healing wrapper
        generation = self._generation_view()[:_GENERATION_SIZE]
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
        """Store ``entry``, replacing the one with the same key and variant
        (which keeps its place in the eviction queues)."""
        if not isinstance(entry, Entry):
            raise TypeError(f"put takes an Entry, not {type(entry).__name__}")
        self._settle()
        self._connect().execute(
            _UPSERT,
            (entry.key, entry.variant, entry.hash.hex, entry.size, entry.status,
             json.dumps(entry.headers), entry.stored_at, entry.expires_at,
             json.dumps(entry.vary), entry.initial_age, time.time()))
        self._changed()

    @_healing
    def delete(self, key: str, variant: str | None = None) -> int:
        """Remove one variant, or all of ``key``'s; returns how many rows went."""
        self._settle()
        db = self._connect()
        if variant is None:
            gone = db.execute("DELETE FROM entries WHERE key = ?", (key,)).rowcount
        else:
            gone = db.execute("DELETE FROM entries WHERE key = ? AND variant = ?", (key, variant)).rowcount
        self._changed()
        return gone

    def delete_hash(self, h: Hash) -> int:
        """Remove every entry that points at blob ``h``; returns how many
        (a scan of the entries: :meth:`delete_hashes` for many blobs)."""
        return self.delete_hashes([h])

    @_healing
    def delete_hashes(self, hashes: Iterable[Hash]) -> int:
        """Remove every entry that points at any of ``hashes``, in one scan of
        the entries (there is no index by hash); returns how many went."""
        self._settle()
        gone = self._connect().execute(f"DELETE FROM entries WHERE hash IN {_HEX_LIST}",
                                       (_hex_list(hashes),)).rowcount
        if gone:
            self._changed()
        return gone

    @_healing
    def touch(self, key: str, variant: str, when: float | None = None) -> None:
        """Record a use of an entry: its last use, and one more use counted
        (up to three) for S3-FIFO."""
        self._settle()
        self._connect().execute(_TOUCH, (time.time() if when is None else when, key, variant))

    @_healing
    def __iter__(self) -> Iterator[Entry]:
        """Every entry, as a snapshot."""
        rows = self._connect().execute(f"SELECT {_COLUMNS} FROM entries").fetchall()
        return iter([_entry(r) for r in rows])

    @_healing
    def totals(self) -> tuple[int, int]:
        """``(entries, bytes of the distinct blobs they point at)``, in O(1)."""
        self._settle()
        entries, size = self._connect().execute("SELECT entries, blob_bytes FROM totals").fetchone()
        return entries, size

    @_healing
    def usage(self) -> Usage:
        """The running totals and the index's own size, in O(1) (no walk of
        the table or of the store)."""
        self._settle()
        db = self._connect()
        entries, blobs, blob_bytes, orphan_bytes = db.execute(
            "SELECT entries, blobs, blob_bytes, orphan_bytes FROM totals").fetchone()
        # Not counting free pages keeps an index whose file cannot shrink
        # (made before auto_vacuum) from looking over its size for ever.
        pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        try:
            wal = os.stat(self.path + "-wal").st_size
        except FileNotFoundError:
            wal = 0
        return Usage(entries, blobs, blob_bytes, orphan_bytes, pages * self._page_size(db), wal)

    def _page_size(self, db: sqlite3.Connection) -> int:
        size = getattr(self._local, "page_size", None)
        if size is None:
            size = self._local.page_size = db.execute("PRAGMA page_size").fetchone()[0]
        return size

    @_confirmed
    def least_recently_used(self, limit: int = 1000, used_before: float | None = None,
                            after: tuple[float, str, str] | None = None) -> list[Entry]:
        """Up to ``limit`` entries, least recently used first: only those last
        used before ``used_before`` if given, and only those after the
        ``(last_used, key, variant)`` position ``after`` (keyset paging: each
        page costs the same however deep)."""
        rows = self._connect().execute(
            f"SELECT {_COLUMNS} FROM entries WHERE last_used < ? AND (last_used, key, variant) > (?, ?, ?) "
            "ORDER BY last_used, key, variant LIMIT ?",
            (float("inf") if used_before is None else used_before, *(after or (float("-inf"), "", "")),
             limit)).fetchall()
        return [_entry(r) for r in rows]

    @_healing
    def touch_many(self, uses: dict[tuple[str, str], float]) -> None:
        """Record many uses at once: ``{(key, variant): when}``, each as :meth:`touch`."""
        db = self._connect()
        # IMMEDIATE: a deferred transaction that turns into a writer after
        # another process committed fails at once instead of waiting its turn.
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_TOUCH, [(when, key, variant) for (key, variant), when in uses.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @_healing
    def referenced(self, h: Hash) -> bool:
        """Whether any entry points at blob ``h``."""
        row = self._connect().execute("SELECT refs FROM blobs WHERE hash = ?", (h.hex,)).fetchone()
        return row is not None and row[0] > 0

    @_confirmed
    def known(self, h: Hash) -> bool:
        """Whether the index accounts for blob ``h`` (referenced, or
        unreferenced and counted until :meth:`forget_blob`)."""
        return self._connect().execute("SELECT 1 FROM blobs WHERE hash = ?", (h.hex,)).fetchone() is not None

    @_confirmed
    def known_among(self, hashes: Iterable[Hash]) -> set[Hash]:
        """Those of ``hashes`` the index accounts for (as :meth:`known`), one
        statement per few hundred."""
        db = self._connect()
        by_hex = {h.hex: h for h in hashes}
        known: set[Hash] = set()
        for chunk in _chunks(list(by_hex)):
            rows = db.execute(f"SELECT hash FROM blobs WHERE hash IN ({','.join('?' * len(chunk))})", chunk)
            known.update(by_hex[hexhash] for (hexhash,) in rows)
        return known

    @_confirmed
    def unreferenced_blobs(self, before: float, limit: int = 1000) -> list[tuple[Hash, int]]:
        """``(hash, size)`` of up to ``limit`` blobs no entry has pointed at
        since before ``before``, longest unreferenced first."""
        rows = self._connect().execute(
            "SELECT hash, size FROM blobs WHERE refs = 0 AND unreferenced_since < ? "
            "ORDER BY unreferenced_since LIMIT ?", (before, limit)).fetchall()
        return [(Hash.from_hex(h), size) for h, size in rows]

    @_confirmed
    def blob_hashes(self) -> Iterator[Hash]:
        """Every blob some entry points at, each once (a snapshot)."""
        rows = self._connect().execute("SELECT hash FROM blobs WHERE refs > 0").fetchall()
        return (Hash.from_hex(h) for (h,) in rows)

    def keys_for(self, h: Hash) -> list[tuple[str, str]]:
        """``(key, variant)`` of every entry pointing at blob ``h`` (a scan
        of the entries: :meth:`naming` for many blobs)."""
        return [(key, variant) for key, variant, _ in self.naming([h])]

    @_confirmed
    def naming(self, hashes: Iterable[Hash]) -> list[tuple[str, str, Hash]]:
        """``(key, variant, hash)`` of every entry pointing at any of
        ``hashes``, in one scan of the entries (there is no index by hash)."""
        by_hex = {h.hex: h for h in hashes}
        if not by_hex:
            return []
        rows = self._connect().execute(f"SELECT key, variant, hash FROM entries WHERE hash IN {_HEX_LIST}",
                                       (_hex_list(by_hex.values()),)).fetchall()
        return [(key, variant, by_hex[hexhash]) for key, variant, hexhash in rows]

    @_confirmed
    def forget_blob(self, h: Hash) -> bool:
        """Stop counting blob ``h`` (its file is gone), unless an entry points
        at it again; returns whether it was forgotten."""
        self._settle()
        return self._connect().execute("DELETE FROM blobs WHERE hash = ? AND refs <= 0", (h.hex,)).rowcount > 0

    @_confirmed
    def forget_unreferenced(self, hashes: Iterable[Hash]) -> list[Hash]:
        """Stop counting those of ``hashes`` no entry points at (one statement
        per few hundred); returns them. Inside a transaction, remove their
        files only once it has committed."""
        self._settle()
        db = self._connect()
        by_hex = {h.hex: h for h in hashes}
        txn = getattr(self._local, "txn", None)
        gone: list[Hash] = []
        if txn is not None and txn.forgotten:  # forgotten already, by the queues' removals
            gone = [by_hex.pop(hexhash) for hexhash in list(by_hex) if hexhash in txn.forgotten]
            txn.forgotten.difference_update(h.hex for h in gone)
        if by_hex:
            with contextlib.ExitStack() as outside:
                if txn is None:  # the rows and the counts commit together
                    outside.enter_context(self.transaction())
                    db = self._connect()
                with _Bulk(db) as bulk:
                    gone += [by_hex[hexhash] for hexhash in bulk.forget_orphans(list(by_hex))]
        if txn is not None:
            txn.left_queues_alone()
        return gone

    @_confirmed
    def purge_expired(self, before: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` entries that expired before ``before``
        (pick it past any stale window the server still serves from);
        returns how many went. Their blobs become unreferenced, for gc."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._settle()
        gone = self._connect().execute(
            "DELETE FROM entries WHERE rowid IN (SELECT rowid FROM entries WHERE expires_at < ? "
            "ORDER BY expires_at LIMIT ?)", (before, limit)).rowcount
        if gone:
            self._changed()
        return gone

    @contextlib.contextmanager
    def transaction(self, *, large: bool = False, forget_blobs: bool = False) -> Iterator[None]:
        """Run the block as one write transaction on this thread's connection
        (taken at once, so reads inside see what the writes will change).
        What the eviction queues owe is written before the commit; other
        processes learn of entries they removed once it is done.

        :param large: the block changes many pages (an eviction batch): as
            under :meth:`large_transactions`, for this one transaction.
        :param forget_blobs: a blob no entry points at any more once the
            eviction queues removed an entry is forgotten at once (one write
            of its row, not an update now and a delete later), as
            :meth:`forget_unreferenced` would; that reports it. The caller
            removes the files after the commit. Without it, such blobs stay
            counted as unreferenced, for gc to remove after its grace.
        """
        if large:
            with self.large_transactions():
                with self.transaction(forget_blobs=forget_blobs):
                    yield
            return
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        txn = self._local.txn = _Transaction(db, forget_blobs)
        try:
            yield
            txn.settle()
        except BaseException:
            self._local.txn = None
            db.execute("ROLLBACK")
            raise
        self._local.txn = None
        db.execute("COMMIT")
        self._confirm(self._local)  # (what it removed from a moved file must not be acted on)
        if txn.removed:
            self._changed()

    @contextlib.contextmanager
    def large_transactions(self) -> Iterator[None]:
        """Within the block, this thread's transactions may change many pages
        (the batches of an eviction pass): they keep them all in memory until
        the commit instead of spilling them to the file, which syncs the
        journal at each spill and locks readers out from the first one on;
        they keep each statement's own journal in memory rather than in a
        temporary file; and the pages read by one batch stay cached for the
        next (the b-trees' upper levels, and leaves it touches again). The
        memory is released afterwards.
        """
        db = self._connect()
        if getattr(self._local, "large", False):
            yield
            return
        default_cache = db.execute("PRAGMA cache_size").fetchone()[0]
        db.execute(f"PRAGMA cache_size = {-_LARGE_CACHE_KIB}")
        db.execute("PRAGMA cache_spill = OFF")
        db.execute("PRAGMA temp_store = MEMORY")
        self._local.large = True
        try:
            yield
        finally:
            self._local.large = False
            if getattr(self._local, "db", None) is not db:
                return  # it was dropped (and closed) meanwhile: nothing to put back
            db.execute(f"PRAGMA cache_size = {default_cache}")
            db.execute("PRAGMA cache_spill = ON")
            db.execute("PRAGMA temp_store = DEFAULT")
            db.execute("PRAGMA shrink_memory")

    def _settle(self) -> None:
        """Inside a transaction: write what the eviction queues owe, so that
        what follows reads and writes entries as the queues left them."""
        txn = getattr(self._local, "txn", None)
        if txn is not None:
            txn.settle()

    def queues(self) -> "SQLiteQueues":
        """The eviction queues of this index, on this thread's connection."""
        return SQLiteQueues(self)

    @_confirmed
    def compact(self) -> None:
        """Give the database's free pages back to the file system (an index
        created before auto_vacuum keeps them for reuse instead), and
        checkpoint the ``-wal`` without waiting for readers (the next writer
        then cuts it back to 4 MiB)."""
        db = self._connect()
        # Each step of incremental_vacuum frees one page, and execute() steps a
        # statement without result columns once: executescript steps to the end.
        db.executescript("PRAGMA incremental_vacuum;")
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    @_healing
    def __len__(self) -> int:
        return self.totals()[0]

    def close(self) -> None:
        """Close this thread's connection and generation file."""
        local = self._local
        db = getattr(local, "db", None)
        if db is not None and local.pid == os.getpid():
            db.close()
        if getattr(local, "gen_pid", None) == os.getpid():
            os.close(local.gen_fd)
        self._local = threading.local()
        self._gen = None  # the view goes once no other thread holds it


_WAL_LIMIT = 4 << 20
#: The page cache of a large transaction (KiB): its changed pages, and the
#: pages it reads again and again (the b-trees' upper levels) besides.
_LARGE_CACHE_KIB = 64 << 10


def _ghost_id(key: str, variant: str) -> int:
    """A stable 63-bit name for an evicted entry (the ghost keeps no keys:
    junk keys can be long)."""
    digest = blake3.blake3(f"{key}\0{variant}".encode("utf-8", "surrogatepass")).digest(8)
    return int.from_bytes(digest, "big") >> 1


#: Rows read per look at a queue's head or at the ghost's oldest ids.
_PAGE = 512
#: Ids per ``IN (...)`` list (well under SQLite's limit on bound parameters).
_IN_CHUNK = 500
#: Ids per ``IN (...)`` list of a bulk removal (SQLite binds up to 32,766).
_BULK_CHUNK = 4096
#: Where :class:`_Pass` records an entry it removed.
_REMOVED = -1


#: A set of hashes bound as one JSON array (``_hex_list``): SQLite makes it
#: a lookup table once, so a scan of the entries tests each row in O(1).
_HEX_LIST = "(SELECT value FROM json_each(?))"


def _hex_list(hashes: Iterable[Hash]) -> str:
    return json.dumps(sorted({h.hex for h in hashes}))


def _chunks(values: list, size: int = _IN_CHUNK) -> Iterator[list]:
    for i in range(0, len(values), size):
        yield values[i:i + size]


class _Transaction:
    """One write transaction of one thread (:meth:`SQLiteIndex.transaction`):
    the writes the eviction queues owe it land before it commits, and other
    processes are told of removed entries once it has."""

    __slots__ = ("db", "queues", "removed", "forgotten")

    def __init__(self, db: sqlite3.Connection, forget_blobs: bool = False) -> None:
        self.db = db
        self.queues: _Pass | None = None
        self.removed = False
        #: With ``forget_blobs``: the hashes (hex) of blobs the queues' removals
        #: left unreferenced and forgot, until forget_unreferenced reports them.
        self.forgotten: set[str] | None = set() if forget_blobs else None

    def settle(self) -> None:
        """Write what is owed (before any other read or write of entries)."""
        if self.queues is not None:
            self.queues.flush()

    def left_queues_alone(self) -> None:
        """Say that the writes since the last settle changed no entry, ghost
        or eviction row (only blobs): what the queues read still holds."""
        if self.queues is not None:
            self.queues.changes = self.db.total_changes


class _Bulk:
    """Inside a write transaction, with the per-row triggers standing aside
    (``eviction.bulk``, see :data:`_V3`): removals of entries, blob rows
    and ghost ids that keep the totals, blob reference counts, queue sizes
    and the ghost's size themselves, a few statements per batch (the totals
    and the ghost's size are written once, on leaving).

    :raises RuntimeError: if entered outside a transaction (the flag must
        never be committed).
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        # What the leaving writes: entries, blobs, blob_bytes, orphan_bytes, ghost_bytes.
        self.change = [0, 0, 0, 0, 0]

    def __enter__(self) -> "_Bulk":
        if not self.db.in_transaction:
            raise RuntimeError("bulk removals need a write transaction")
        self.db.execute("UPDATE eviction SET bulk = 1")
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        entries, blobs, blob_bytes, orphan_bytes, ghost_bytes = self.change
        if kind is None and (entries or blobs or blob_bytes or orphan_bytes):
            self.db.execute("UPDATE totals SET entries = entries + ?, blobs = blobs + ?, "
                            "blob_bytes = blob_bytes + ?, orphan_bytes = orphan_bytes + ?",
                            (entries, blobs, blob_bytes, orphan_bytes))
        if kind is None:
            self.db.execute("UPDATE eviction SET bulk = 0, ghost_bytes = ghost_bytes + ?", (ghost_bytes,))
            return
        # On an error the transaction is rolled back, the flag with it; it is
        # cleared anyway, so that a caller that goes on never commits a 1 (and
        # if SQLite cannot, the transaction is already lost).
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("UPDATE eviction SET bulk = 0")

    def remove_entries(self, removes: dict[Hashable, tuple[float, int | None]],
                       forgotten: set[str] | None = None) -> int:
        """Delete the entries ``{(key, variant): (last_used, rowid)}`` still
        unused since (an item read in an earlier transaction, a page of LRU,
        may have been used since); returns how many went. With ``forgotten``,
        the blobs they leave unreferenced are forgotten, their hashes added."""
        rows = self._still_unused(removes)
        if not rows:
            return 0
        db = self.db
        for chunk in _chunks([rowid for rowid, _, _, _ in rows], _BULK_CHUNK):
            db.execute(f"DELETE FROM entries WHERE rowid IN ({','.join('?' * len(chunk))})", chunk)
        queues: dict[int, list[int]] = {}
        refs: dict[str, int] = {}
        for _, queue, size, hexhash in rows:
            tally = queues.setdefault(queue, [0, 0])
            tally[0] += 1
            tally[1] += size + ROW_WEIGHT
            refs[hexhash] = refs.get(hexhash, 0) + 1
        db.executemany("UPDATE queues SET entries = entries - ?, bytes = bytes - ? WHERE queue = ?",
                       [(n, weight, queue) for queue, (n, weight) in queues.items()])
        self.change[0] -= len(rows)
        if forgotten is None:
            self._unreference(refs)
        else:
            forgotten.update(self._forget_unreferenced(refs))
        return len(rows)

    def _still_unused(self, removes: dict[Hashable, tuple[float, int | None]]) -> list[tuple[int, int, int, str]]:
        """``(rowid, queue, size, hash)`` of the entries of ``removes`` as
        they were chosen (same key and variant at that rowid, same last use)."""
        db = self.db
        by_row = {row: (id, used) for id, (used, row) in removes.items() if row is not None}
        found = []
        for chunk in _chunks(list(by_row), _BULK_CHUNK):
            found += db.execute("SELECT rowid, key, variant, last_used, queue, size, hash FROM entries "
                                f"WHERE rowid IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        rows = [(rowid, queue, size, hexhash) for rowid, key, variant, used, queue, size, hexhash in found
                if by_row[rowid] == ((key, variant), used)]
        for (key, variant), (used, row) in removes.items():
            if row is None:  # an item made elsewhere: found by its key
                rows += db.execute("SELECT rowid, queue, size, hash FROM entries WHERE key = ? AND variant = ? "
                                   "AND last_used = ?", (key, variant, used)).fetchall()
        return rows

    def _unreference(self, refs: dict[str, int]) -> None:
        """Count ``refs[hash]`` fewer entries pointing at each blob; one left
        with none is unreferenced from now (for gc, or forget_orphans)."""
        db = self.db
        by_count: dict[int, list[str]] = {}
        for hexhash, n in refs.items():
            by_count.setdefault(n, []).append(hexhash)
        now, freed = time.time(), 0
        for n, hexes in by_count.items():
            for chunk in _chunks(hexes, _BULK_CHUNK):
                freed += sum(size for left, size in db.execute(
                    "UPDATE blobs SET refs = refs - ?, unreferenced_since = CASE WHEN refs <= ? THEN ? "
                    f"ELSE unreferenced_since END WHERE hash IN ({','.join('?' * len(chunk))}) "
                    "RETURNING refs, size", (n, n, now, *chunk)) if left <= 0)
        self.change[2] -= freed
        self.change[3] += freed

    def _forget_unreferenced(self, refs: dict[str, int]) -> list[str]:
        """Count ``refs[hash]`` fewer entries pointing at each blob; forget
        those left with none (returned), in one write of their rows."""
        db = self.db
        by_count: dict[int, list[str]] = {}
        for hexhash, n in refs.items():
            by_count.setdefault(n, []).append(hexhash)
        gone: list[str] = []
        for n, hexes in by_count.items():
            for chunk in _chunks(hexes, _BULK_CHUNK):
                left = set(chunk)
                for hexhash, size in db.execute(
                        f"DELETE FROM blobs WHERE refs <= ? AND hash IN ({','.join('?' * len(chunk))}) "
                        "RETURNING hash, size", (n, *chunk)).fetchall():
                    gone.append(hexhash)
                    left.discard(hexhash)
                    self.change[2] -= size
                if left:  # shared with entries that stay
                    db.execute(f"UPDATE blobs SET refs = refs - ? WHERE hash IN ({','.join('?' * len(left))})",
                               (n, *left))
        self.change[1] -= len(gone)
        return gone

    def forget_orphans(self, hexes: list[str]) -> list[str]:
        """Delete the rows of those blobs of ``hexes`` no entry points at;
        returns their hashes."""
        gone: list[str] = []
        for chunk in _chunks(hexes, _BULK_CHUNK):
            for hexhash, size in self.db.execute(
                    f"DELETE FROM blobs WHERE refs <= 0 AND hash IN ({','.join('?' * len(chunk))}) "
                    "RETURNING hash, size", chunk).fetchall():
                gone.append(hexhash)
                self.change[3] -= size
        self.change[1] -= len(gone)
        return gone

    def change_ghost(self, forgotten: set[int], added: dict[int, tuple[int, int]]) -> None:
        """Forget the ghost ids ``forgotten`` and add ``added`` ({id: (seq,
        weight)}), keeping the ghost's size."""
        db = self.db
        for chunk in _chunks(list(forgotten), _BULK_CHUNK):
            self.change[4] -= sum(weight for (weight,) in db.execute(
                f"DELETE FROM ghost WHERE id IN ({','.join('?' * len(chunk))}) RETURNING weight", chunk).fetchall())
        if added:
            db.executemany("INSERT INTO ghost VALUES (?, ?, ?)", [(g, seq, w) for g, (seq, w) in added.items()])
            self.change[4] += sum(w for _, w in added.values())


class _Page:
    """The first items of a queue, in order, as read (less those moved since)."""

    __slots__ = ("items", "whole")

    def __init__(self, items: list[Item], whole: bool) -> None:
        self.items = deque(items)
        #: Whether it held the whole queue when read, and nothing joined the queue since.
        self.whole = whole


class _Pass:
    """What :class:`SQLiteQueues` knows and owes within one transaction.

    No other connection can write while the transaction holds the write lock,
    so what was read stays true until this connection writes: counts, the
    eviction row, ghost membership and the first page of each queue are kept
    in memory and updated as the policy moves items; pushes, removals and
    ghost changes are written in one ``executemany`` each when the
    transaction settles (before the index is next read or written through
    :class:`SQLiteIndex`, before the next page is read, and before the commit).
    """

    def __init__(self, db: sqlite3.Connection, txn: _Transaction | None) -> None:
        self.db, self.txn = db, txn
        # Read lazily, valid until a settle.
        self.counts: dict[int, list[int]] | None = None  # queue -> [entries, bytes]
        self.row: list | None = None  # [next_seq, ghost_bytes, been_full]
        self.ghost_old: deque[tuple[int, int]] | None = None  # (id, weight), oldest first
        self.ghost_moved: set[int] = set()  # ghost ids added or forgotten since it was read
        # Valid until someone else writes: a page holds only items not moved since.
        self.heads: dict[int, _Page] = {}
        # Valid for the whole transaction.
        self.where: dict[Hashable, int] = {}  # the queue of each id moved (or _REMOVED)
        self.ghost_known: dict[int, int | None] = {}  # ghost id -> weight, None: absent
        self.gids: dict[Hashable, int] = {}  # item id -> ghost id, as learn_ghost worked them out
        # Owed.
        self.pushes: dict[Hashable, tuple[int, int, int]] = {}  # id -> (queue, seq, freq)
        self.removes: dict[Hashable, tuple[float, int | None]] = {}  # id -> (last_used when chosen, rowid)
        self.ghost_forgotten: set[int] = set()
        self.ghost_added: dict[int, tuple[int, int]] = {}  # ghost id -> (seq, weight)
        self.row_dirty = False
        self.changes = db.total_changes

    # -- consistency -----------------------------------------------------------

    def owes(self) -> bool:
        return bool(self.pushes or self.removes or self.ghost_forgotten or self.ghost_added or self.row_dirty)

    def check(self) -> None:
        """Drop what was read if someone else wrote on this connection since."""
        if self.db.total_changes == self.changes:
            return
        if self.owes():  # SQLiteIndex settles before its own writes: this was a raw statement
            raise RuntimeError("entries were changed inside a transaction while the eviction queues owed writes")
        self._forget_reads()
        self.heads.clear()
        self.changes = self.db.total_changes

    def _forget_reads(self) -> None:
        self.counts = self.row = self.ghost_old = None
        self.ghost_moved.clear()

    def flush(self) -> None:
        """Write what is owed; what was read ahead is read again when needed."""
        self.check()
        if not self.owes():
            return
        db = self.db
        if self.pushes:
            db.executemany("UPDATE entries SET queue = ?, seq = ?, freq = ? WHERE key = ? AND variant = ?",
                           [(q, seq, freq, key, variant) for (key, variant), (q, seq, freq) in self.pushes.items()])
        if self.removes or self.ghost_forgotten or self.ghost_added:
            with _Bulk(db) as bulk:
                forgotten = None if self.txn is None else self.txn.forgotten
                if self.removes and bulk.remove_entries(self.removes, forgotten) and self.txn is not None:
                    self.txn.removed = True
                bulk.change_ghost(self.ghost_forgotten, self.ghost_added)
        if self.row_dirty:
            next_seq, _, been_full = self.row
            db.execute("UPDATE eviction SET next_seq = ?, been_full = ?", (next_seq, been_full))
        for id in self.removes:  # gone (or, used since, kept: then read afresh)
            del self.where[id]
        self.pushes, self.removes, self.ghost_forgotten, self.ghost_added = {}, {}, set(), {}
        self.row_dirty = False
        # The triggers and _Bulk kept the counts exact; they are read again rather
        # than trusted (an item read in an earlier transaction may have been stale).
        self._forget_reads()
        self.changes = db.total_changes

    # -- counts and the eviction row -----------------------------------------

    def count(self, queue: int) -> list[int]:
        if self.counts is None:
            self.counts = {q: [n, b] for q, n, b in self.db.execute("SELECT queue, entries, bytes FROM queues")}
        return self.counts[queue]

    def eviction_row(self) -> list:
        if self.row is None:
            self.row = list(self.db.execute("SELECT next_seq, ghost_bytes, been_full FROM eviction").fetchone())
        return self.row

    def take_seq(self) -> int:
        row = self.eviction_row()
        row[0] += 1
        self.row_dirty = True
        return row[0] - 1

    def queue_of(self, item: Item) -> int:
        return self.where.get(item.id, item.queue)

    def moved_item(self, item: Item, to: int) -> int:
        """Record that ``item`` leaves its queue for ``to`` (or _REMOVED); returns the queue it left."""
        old = self.queue_of(item)
        if old == _REMOVED:
            raise KeyError(f"{item.id!r} was removed")
        counts = self.count(old)
        counts[0] -= 1
        counts[1] -= item.weight
        if to != _REMOVED:
            counts = self.count(to)
            counts[0] += 1
            counts[1] += item.weight
        self.where[item.id] = to
        page = self.heads.get(old)
        if page is not None:
            if page.items and page.items[0].id == item.id:
                page.items.popleft()  # the usual move: the head's
            elif any(i.id == item.id for i in page.items):
                del self.heads[old]  # read again after the next settle
        page = self.heads.get(to)
        if page is not None:
            page.whole = False  # it joins the queue's tail, beyond the page
        return old

    # -- reads of entries ------------------------------------------------------

    def select(self, sql: str, params: tuple) -> list[Item]:
        """Items from a query of entries, after what is owed is written."""
        self.flush()
        return [_item(r) for r in self.db.execute(sql, params)]

    def head(self, queue: int) -> Item | None:
        page = self.heads.get(queue)
        if page is not None and page.items:
            return page.items[0]
        if page is not None and page.whole:
            return None
        # Settled first, the queue's head in the table is the first item not yet moved.
        rows = self.select(f"SELECT {_ITEM_COLUMNS} FROM entries WHERE queue = ? ORDER BY seq LIMIT ?",
                           (queue, _PAGE))
        if queue == SMALL:  # its victims are remembered in the ghost
            self.learn_ghost(rows)
        self.heads[queue] = _Page(rows, len(rows) < _PAGE)
        return rows[0] if rows else None

    # -- the ghost -------------------------------------------------------------

    def learn_ghost(self, items: list[Item]) -> None:
        """Find out at once which of ``items`` the ghost remembers (for ghost_take)."""
        gids = self.gids
        for item in items:
            if item.id not in gids:
                gids[item.id] = _ghost_id(*item.id)
        ids = [g for g in {gids[item.id] for item in items} if g not in self.ghost_known]
        for chunk in _chunks(ids):
            self.ghost_known.update(dict.fromkeys(chunk))
            self.ghost_known.update(self.db.execute(
                f"SELECT id, weight FROM ghost WHERE id IN ({','.join('?' * len(chunk))})", chunk))

    def ghost_id(self, item: Item) -> int:
        gid = self.gids.get(item.id)
        return _ghost_id(*item.id) if gid is None else gid

    def ghost_weight(self, gid: int) -> int | None:
        if gid not in self.ghost_known:
            row = self.db.execute("SELECT weight FROM ghost WHERE id = ?", (gid,)).fetchone()
            self.ghost_known[gid] = None if row is None else row[0]
        return self.ghost_known[gid]

    def ghost_forget(self, gid: int) -> bool:
        weight = self.ghost_weight(gid)
        if weight is None:
            return False
        if self.ghost_added.pop(gid, None) is None:
            self.ghost_forgotten.add(gid)
        self.ghost_known[gid] = None
        self.ghost_moved.add(gid)
        self.eviction_row()[1] -= weight
        return True

    def ghost_add(self, gid: int, weight: int) -> None:
        self.ghost_forget(gid)
        self.ghost_added[gid] = (self.take_seq(), weight)
        self.ghost_known[gid] = weight
        self.ghost_moved.add(gid)
        self.eviction_row()[1] += weight

    def ghost_drop_oldest(self) -> bool:
        while True:
            while self.ghost_old:
                gid, _ = self.ghost_old.popleft()
                if gid not in self.ghost_moved:
                    return self.ghost_forget(gid)
            self.flush()
            rows = self.db.execute("SELECT id, weight FROM ghost ORDER BY seq LIMIT ?", (_PAGE,)).fetchall()
            if not rows:
                return False
            self.ghost_known.update(rows)
            self.ghost_old = deque(rows)


class SQLiteQueues:
    """:class:`~cachefetch.eviction.state.QueueState` over a
    :class:`SQLiteIndex`: queue, place and use count are columns of the
    entries, the ghost a table of hashed ids; one state for every worker on
    the store, kept across restarts.

    Use it from one thread, inside :meth:`SQLiteIndex.transaction` (reads
    alone also work outside one). Within a transaction it costs what the
    policy moves, not a statement per call: it reads a queue's head a page at
    a time and keeps the counts in memory, and writes its pushes, removals and
    ghost changes in one batch before the index is next read or written
    through :class:`SQLiteIndex`, and before the commit. (A raw
    ``SELECT`` of entries in between does not see them yet.) Removing an item
    deletes its entry unless it was used since it was read.
    """

    def __init__(self, index: SQLiteIndex) -> None:
        self._index = index

    def _pass(self, write: bool = False) -> _Pass:
        """This transaction's pass (one per transaction, shared by every
        SQLiteQueues of the index on this thread); outside a transaction a
        throwaway one that may only read."""
        txn = getattr(self._index._local, "txn", None)
        if txn is None:
            if write:
                raise RuntimeError("SQLiteQueues must be used inside SQLiteIndex.transaction()")
            return _Pass(self._index._connect(), None)
        if txn.queues is None:
            txn.queues = _Pass(txn.db, txn)
        txn.queues.check()
        return txn.queues

    def pending(self, limit: int) -> list[Item]:
        p = self._pass()
        # seq is 0 until admitted: rowid (put order) decides among them.
        items = p.select(f"SELECT {_ITEM_COLUMNS} FROM entries WHERE queue = {PENDING} "
                         "ORDER BY seq, rowid LIMIT ?", (limit,))
        p.learn_ghost(items)  # admission asks the ghost about each
        return items

    def head(self, queue: int) -> Item | None:
        p = self._pass()
        if queue == PENDING:
            items = p.select(f"SELECT {_ITEM_COLUMNS} FROM entries WHERE queue = {PENDING} "
                             "ORDER BY seq, rowid LIMIT 1", ())
            return items[0] if items else None
        return p.head(queue)

    def push(self, item: Item, queue: int, freq: int) -> None:
        p = self._pass(write=True)
        p.moved_item(item, queue)
        p.pushes[item.id] = (queue, p.take_seq(), freq)

    def remove(self, item: Item) -> None:
        p = self._pass(write=True)
        if p.queue_of(item) == _REMOVED:
            return
        p.moved_item(item, _REMOVED)
        p.pushes.pop(item.id, None)
        p.removes[item.id] = (item.last_used, item.row)

    def queue_bytes(self, queue: int) -> int:
        return self._pass().count(queue)[1]

    def queue_len(self, queue: int) -> int:
        return self._pass().count(queue)[0]

    def least_recently_used(self, after: Item | None, limit: int) -> list[Item]:
        cursor = (float("-inf"), "", "") if after is None else (after.last_used, *after.id)
        return self._pass().select(
            f"SELECT {_ITEM_COLUMNS} FROM entries WHERE (last_used, key, variant) > (?, ?, ?) "
            "ORDER BY last_used, key, variant LIMIT ?", (*cursor, limit))

    def ghost_add(self, item: Item) -> None:
        p = self._pass(write=True)
        p.ghost_add(p.ghost_id(item), item.weight)

    def ghost_take(self, item: Item) -> bool:
        p = self._pass(write=True)
        return p.ghost_forget(p.ghost_id(item))

    def ghost_bytes(self) -> int:
        return self._pass().eviction_row()[1]

    def ghost_drop_oldest(self) -> bool:
        return self._pass(write=True).ghost_drop_oldest()

    def been_full(self) -> bool:
        return bool(self._pass().eviction_row()[2])

    def mark_full(self) -> None:
        p = self._pass(write=True)
        row = p.eviction_row()
        if not row[2]:
            row[2] = 1
            p.row_dirty = True
