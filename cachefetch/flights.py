"""Fetches in flight, shared by the threads and processes of one store.

One fetch per flight key runs at a time, across every thread and gunicorn
worker using the same store. Its leader holds an exclusive ``flock`` on
``inflight/<id>.lock`` and appends a journal to that same file: typed,
versioned records (:data:`Record`), one line each, in this order::

    Leader → Head → Done | Failed          a fetch whose body is being stored
    Leader → Refreshed | Uncacheable | Failed   a revalidation, or a response not stored

A follower opens the lock file, reads the journal and the body file as they
grow, and tests the lock to learn whether the leader is still alive: the
kernel releases a killed leader's lock, and a journal with no final record
under a free lock means the leader died. The leader unlinks the lock file
before releasing it, so a finished journal is never found by a new request,
while followers still read it through their open descriptor.

This module is the embedded :class:`Flights`; a fleet implementation keeps
the same records in a shared log.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Protocol, Union

from .hashing import hash_bytes
from .layout import StoreLayout, flight_temp_prefix

__all__ = ["FlightsSeam", "Leading", "Following", "Flights", "Lead", "Follow", "JournalBody", "Journal", "LeaderGone", "JournalOrderError", "Record", "LeaderRecord",
           "HeadRecord", "DoneRecord", "FailedRecord", "UncacheableRecord", "RefreshedRecord", "encode_record",
           "decode_record", "JOURNAL_VERSION"]

log = logging.getLogger("cachefetch.flights")

#: The journal format's version, written in every record.
JOURNAL_VERSION = 1
_READ_SIZE = 1 << 18
# Poll intervals while a follower waits for the leader's next bytes.
_POLL_MIN, _POLL_MAX = 0.001, 0.02


class LeaderGone(Exception):
    """The leader ended without completing the fetch (it was killed, or failed)."""


class JournalOrderError(RuntimeError):
    """A :class:`Lead` was asked for a record out of order."""


@dataclass(frozen=True)
class LeaderRecord:
    """``L``: a leader holds the flight; its temp files start with ``cf-<fid>-``."""

    fid: str
    pid: int = 0
    kind = "L"


@dataclass(frozen=True)
class HeadRecord:
    """``H``: the response has started.

    :param status: the status line.
    :param headers: the stored response fields.
    :param content_length: the body's length, -1 if not known.
    :param vary: the request fields it varies on.
    :param variant: the leader's variant id for them.
    :param body: the path of the growing body file.
    """

    status: str
    headers: tuple[tuple[str, str], ...] = ()
    content_length: int = -1
    vary: tuple[str, ...] = ()
    variant: str = ""
    body: str = ""
    kind = "H"


@dataclass(frozen=True)
class DoneRecord:
    """``D``: the body file is complete; it hashes to ``hash`` (hex)."""

    hash: str
    size: int
    kind = "D"


@dataclass(frozen=True)
class FailedRecord:
    """``F``: the fetch failed; ``why`` is ``upstream`` or ``abandoned``
    (the client got its body, the cache did not keep it)."""

    why: str
    message: str = ""
    kind = "F"


@dataclass(frozen=True)
class UncacheableRecord:
    """``X``: the response is not stored: followers go to the app themselves."""

    status: int
    kind = "X"


@dataclass(frozen=True)
class RefreshedRecord:
    """``R``: a revalidation refreshed the stored response ``hash`` (hex) in
    the index: followers answer from it."""

    hash: str
    variant: str = ""
    kind = "R"


Record = Union[LeaderRecord, HeadRecord, DoneRecord, FailedRecord, UncacheableRecord, RefreshedRecord]
_KINDS: dict[str, type] = {c.kind: c for c in (LeaderRecord, HeadRecord, DoneRecord, FailedRecord,
                                                UncacheableRecord, RefreshedRecord)}
_FINAL = frozenset({"D", "F", "X", "R"})


def encode_record(record: Record) -> bytes:
    """One journal line (with its newline) for ``record``."""
    body = asdict(record)
    body["v"] = JOURNAL_VERSION
    return (record.kind + " " + json.dumps(body, separators=(",", ":")) + "\n").encode()


def decode_record(line: bytes) -> Record | None:
    """The record of one complete journal line (without its newline), or
    ``None`` for a line that is torn, unknown, or of another version."""
    kind, _, body = line.partition(b" ")
    cls = _KINDS.get(kind.decode("ascii", "replace"))
    if cls is None:
        return None
    try:
        data = json.loads(body)
        if not isinstance(data, dict) or data.pop("v", None) != JOURNAL_VERSION:
            return None
        if cls is HeadRecord:
            data["headers"] = tuple((str(k), str(v)) for k, v in data.get("headers", ()))
            data["vary"] = tuple(data.get("vary", ()))
        return cls(**data)
    except (ValueError, TypeError):
        return None  # a line torn by a failed write: as if never written


@dataclass(frozen=True)
class Journal:
    """What a follower has learned of a flight so far."""

    leader: LeaderRecord | None = None
    head: HeadRecord | None = None
    final: DoneRecord | FailedRecord | UncacheableRecord | RefreshedRecord | None = None

    @property
    def fid(self) -> str | None:
        return self.leader.fid if self.leader is not None else None

    def add(self, record: Record | None) -> "Journal":
        """This journal with ``record`` learned (``None``, an unreadable line, changes nothing)."""
        if isinstance(record, LeaderRecord):
            return Journal(record, self.head, self.final)
        if isinstance(record, HeadRecord):
            return Journal(self.leader, record, self.final)
        if record is not None:
            return Journal(self.leader, self.head, record)
        return self


class _JournalReader:
    """Reads a journal incrementally: each call costs the new bytes only."""

    def __init__(self) -> None:
        self._offset = 0
        self._partial = b""
        self.journal = Journal()

    def update(self, fd: int) -> Journal:
        while True:
            data = os.pread(fd, _READ_SIZE, self._offset)
            if not data:
                break
            self._offset += len(data)
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()  # the last may be mid-write
            for line in lines:
                self.journal = self.journal.add(decode_record(line))
        return self.journal


class Leading(Protocol):
    """The leader's side of a flight, whatever coordinates it (see :class:`Lead`)."""

    fid: str

    @property
    def temp_prefix(self) -> str: ...
    @property
    def active(self) -> bool: ...
    def publish(self, head: HeadRecord) -> None: ...
    def done(self, hash_hex: str, size: int) -> None: ...
    def refreshed(self, hash_hex: str, variant: str = "") -> None: ...
    def fail(self, why: str, message: str = "") -> None: ...
    def uncacheable(self, status: int) -> None: ...
    def release(self) -> None: ...


class Following(Protocol):
    """A follower's side of a flight (see :class:`Follow`)."""

    def journal(self) -> Journal: ...
    def wait(self, deadline: float) -> Journal: ...
    def wait_released(self, deadline: float) -> bool: ...
    def body(self, path: str, deadline: float | None = None, start: int = 0,
             stop: int | None = None) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class FlightsSeam(Protocol):
    """The flights seam: one fetch per key at a time among everyone sharing it.
    :class:`Flights` is the embedded one (threads and processes of one host)."""

    def lead(self, key: str) -> Leading | None:
        """Lead ``key``'s flight, or ``None`` if someone else leads it now."""

    def follow(self, key: str) -> Following | None:
        """Attach to ``key``'s running flight, or ``None`` if none runs."""


def read_journal(fd: int) -> Journal:
    """The whole journal of an open lock file."""
    return _JournalReader().update(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class Lead:
    """The leader's side of a flight: an exclusive lock and a journal to append to.

    Records must come in order (``Leader`` is written here; then ``Head``
    then ``Done``; or ``Refreshed``/``Uncacheable``; ``Failed`` at any time
    before a final record); anything else raises :class:`JournalOrderError`.
    Temp files of this fetch must be named with :attr:`temp_prefix`.
    Called from the request thread, and (``done``, ``release``) the commit thread.
    """

    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self.path = path
        self.fid = secrets.token_hex(8)
        self._state = "L"  # guarded by the order of calls: one thread at a time holds a Lead
        self._append(LeaderRecord(self.fid, os.getpid()))

    @property
    def temp_prefix(self) -> str:
        """The name prefix for this fetch's temp files."""
        return flight_temp_prefix(self.fid)

    @property
    def active(self) -> bool:
        """Whether this lead still holds the lock."""
        return self._fd is not None

    def _append(self, record: Record) -> None:
        if self._fd is None:
            raise RuntimeError("this lead has been released")
        data = memoryview(encode_record(record))
        while data:  # readers use only lines with their newline, so a short write shows nothing early
            data = data[os.write(self._fd, data):]

    def _advance(self, record: Record, allowed: str) -> None:
        if self._state not in allowed:
            raise JournalOrderError(f"cannot journal {record.kind} after {self._state}")
        self._append(record)
        self._state = record.kind

    def publish(self, head: HeadRecord) -> None:
        """Append ``Head``: followers may now start answering.

        :raises JournalOrderError: unless this is the first record after ``Leader``.
        :raises OSError: if the journal cannot be written.
        """
        if not isinstance(head, HeadRecord):
            raise TypeError(f"publish takes a HeadRecord, not {type(head).__name__}")
        self._advance(head, "L")

    def done(self, hash_hex: str, size: int) -> None:
        """Append ``Done``: the body file is complete. The lock is kept until :meth:`release`.

        :raises JournalOrderError: unless ``Head`` came before.
        :raises OSError: if the journal cannot be written (a full disk).
        """
        self._advance(DoneRecord(hash_hex, size), "H")

    def refreshed(self, hash_hex: str, variant: str = "") -> None:
        """Append ``Refreshed`` and release: a 304 refreshed the stored response.

        :raises JournalOrderError: unless right after ``Leader``.
        """
        self._advance(RefreshedRecord(hash_hex, variant), "L")
        self.release()

    def fail(self, why: str, message: str = "") -> None:
        """Append ``Failed`` and release: ``why`` is ``upstream`` or ``abandoned``.

        Never raises for a journal write (followers that cannot read the
        record see a released lock with no final record, which also fails),
        and does nothing once a final record was written or the lead released.
        """
        if self._state in _FINAL:
            self.release()
            return
        self._finish(FailedRecord(why, message[:500]), "LH")

    def uncacheable(self, status: int) -> None:
        """Append ``Uncacheable`` and release: followers must ask the app themselves.

        :raises JournalOrderError: after ``Head`` or a final record.
        """
        if self._fd is not None and self._state != "L":
            raise JournalOrderError(f"cannot journal X after {self._state}")
        self._finish(UncacheableRecord(status), "L")

    def _finish(self, record: Record, allowed: str) -> None:
        try:
            if self._fd is not None:
                self._advance(record, allowed)
        except OSError as exc:
            log.warning("could not journal %s to %s: %s", record.kind, self.path, exc)
        finally:
            self.release()

    def release(self) -> None:
        """Unlink the lock file and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(fd)


class Follow:
    """A follower's view of a flight: the journal and the leader's liveness.
    Used by one request thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._reader = _JournalReader()

    def journal(self) -> Journal:
        """The journal as it is now (reading only what was appended since the last call)."""
        return self._reader.update(self._fd)

    def leader_alive(self) -> bool:
        """Whether the leader still holds the lock."""
        if _try_lock(self._fd):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            return False
        return True

    def settled(self) -> Journal:
        """The journal, raising :class:`LeaderGone` if the leader died without a final record."""
        journal = self.journal()
        if journal.final is None and not self.leader_alive():
            journal = self.journal()  # it may have finished between the two reads
            if journal.final is None:
                raise LeaderGone("the leader ended without finishing the fetch")
        return journal

    def wait(self, deadline: float) -> Journal:
        """Wait until the journal has a head or a final record, or ``deadline`` (monotonic) passes.

        :raises LeaderGone: if the leader died first.
        :raises TimeoutError: at the deadline.
        """
        delay = _POLL_MIN
        while True:
            journal = self.settled()
            if journal.head is not None or journal.final is not None:
                return journal
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no response from the leader in time")
            time.sleep(min(delay, left))
            delay = min(delay * 2, _POLL_MAX)

    def wait_released(self, deadline: float) -> bool:
        """Wait until the leader releases the flight (its commit has landed or
        failed); ``False`` if ``deadline`` (monotonic) passed first."""
        delay = _POLL_MIN
        while self.leader_alive():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, _POLL_MAX)
        return True

    def body(self, path: str, deadline: float | None = None, start: int = 0,
             stop: int | None = None) -> "JournalBody":
        """Bytes ``[start, stop)`` of the body file as the leader writes
        them (to the end when ``stop`` is ``None``): an iterator of bytes
        that also offers them as file spans (:meth:`JournalBody.sendfile_spans`).

        The first byte is waited for at most until ``deadline`` (monotonic).
        :raises FileNotFoundError: if the body file is already gone; while
        iterating, :raises LeaderGone: if the fetch fails or its leader dies
        before the end; :raises TimeoutError: at the deadline.
        """
        return JournalBody(self, path, deadline, start, stop)

    def close(self) -> None:
        """Close the journal descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class JournalBody:
    """A follower's read of the body file a leader (in another process) is
    writing, at the follower's pace: iterate it for bytes, or ask for
    :meth:`sendfile_spans` to send them from the file without copying them
    through Python. Used by one request thread; ``close()`` (also at the end)
    closes the file.

    :raises FileNotFoundError: if the body file is already gone.
    """

    def __init__(self, follow: Follow, path: str, deadline: float | None, start: int, stop: int | None) -> None:
        self._follow = follow
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pos, self._stop = start, stop
        self._deadline = deadline  # for the first byte only
        self._end: int | None = stop  # where the body ends, once known

    def __iter__(self) -> "JournalBody":
        return self

    def __next__(self) -> bytes:
        try:
            ready = self._ready()
            if not ready:
                raise StopIteration
            data = os.pread(self._fd, min(_READ_SIZE, ready), self._pos)
            if not data:
                raise LeaderGone(f"the body file ended at {self._pos} bytes")
        except BaseException:
            self.close()
            raise
        self._pos += len(data)
        return data

    def sendfile_spans(self) -> Iterator[tuple[int, int, int]]:
        """The rest of the body as ``(fd, offset, count)`` spans of the file,
        each everything written past the last one; raises as iterating does.
        The descriptor is valid until the next span is asked for."""
        try:
            while ready := self._ready():
                yield self._fd, self._pos, ready
                self._pos += ready
        finally:
            self.close()

    def _ready(self) -> int:
        """Wait for bytes past the position; how many the file holds of the
        body there (0: the body has ended). :raises LeaderGone, TimeoutError."""
        delay = _POLL_MIN
        while True:
            if self._end is not None and self._pos >= self._end:
                return 0
            # The leader only appends, and the file's size counts only bytes already written.
            size = os.fstat(self._fd).st_size
            limit = size if self._end is None else min(size, self._end)
            if limit > self._pos:
                self._deadline = None
                return limit - self._pos
            journal = self._follow.settled()
            if isinstance(journal.final, DoneRecord):
                end = journal.final.size if self._stop is None else min(self._stop, journal.final.size)
                written = os.fstat(self._fd).st_size  # Done comes after the last write: all of it is there
                if written < end:
                    raise LeaderGone(f"the body file ended at {written} of {end} bytes")
                self._end = end
                continue
            if journal.final is not None:
                raise LeaderGone(f"the fetch ended with {journal.final}")
            if self._deadline is not None and time.monotonic() >= self._deadline:
                raise TimeoutError("no body byte from the leader in time")
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)

    def close(self) -> None:
        """Close the body file (again is a no-op)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Flights:
    """Coordinates fetches by key under the store's ``inflight/``.

    :param root: the store root (or its :class:`~cachefetch.layout.StoreLayout`).
    :raises OSError: if the directory cannot be created.
    """

    def __init__(self, root: str | os.PathLike[str] | StoreLayout) -> None:
        layout = root if isinstance(root, StoreLayout) else StoreLayout.at(root)
        self.dir = layout.flights_dir
        self.temp_dir = layout.temp_dir
        os.makedirs(self.dir, exist_ok=True)

    def path(self, key: str) -> str:
        """The lock/journal path of flight ``key`` (a hash of it: keys are not file names)."""
        return os.path.join(self.dir, hash_bytes(key.encode("utf-8", "surrogatepass")).hex[:40] + ".lock")

    def lead(self, key: str) -> Lead | None:
        """Become the leader of ``key``'s flight, or ``None`` if another leads it now.

        A journal left by a leader that died is cleared (with its body file)
        on the way; the directories are recreated if they were removed.

        :raises OSError: if the journal cannot be created or written.
        """
        path = self.path(key)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the store's directories were removed: heal, once
                os.makedirs(self.dir, exist_ok=True)
                os.makedirs(self.temp_dir, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                return None
            try:
                linked = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                linked = False
            if not linked:  # its leader finished and unlinked it under us
                os.close(fd)
                continue
            if os.fstat(fd).st_size:
                self._clear_dead(fd, path)
                continue
            try:
                return Lead(fd, path)
            except BaseException:  # the journal could not be written (a full disk)
                os.unlink(path)
                os.close(fd)
                raise

    def _clear_dead(self, fd: int, path: str) -> None:
        """Remove a dead leader's journal and body file; we hold its lock."""
        fid = read_journal(fd).fid
        if fid and fid.isalnum():  # after Done the commit may not have run either
            pattern = os.path.join(glob.escape(self.temp_dir), flight_temp_prefix(fid) + "*")
            for temp in glob.glob(pattern):
                try:
                    os.unlink(temp)
                except FileNotFoundError:
                    pass
        log.warning("cleared the journal of a fetch whose leader died: %s", path)
        os.unlink(path)
        os.close(fd)

    def follow(self, key: str) -> Follow | None:
        """Attach to ``key``'s running flight, or ``None`` if none runs."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return Follow(fd)

    def survey(self, remove_dead: bool = False) -> tuple[set[str], list[str]]:
        """Look at every journal without disturbing a live one.

        :param remove_dead: unlink the journals whose leader is gone (done
            while holding their lock, so no one can join them meanwhile).
        :returns: ``(flight ids of live leaders, paths of dead journals)``.
        """
        live: set[str] = set()
        dead: list[str] = []
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not _try_lock(fd):
                    fid = read_journal(fd).fid
                    if fid:
                        live.add(fid)
                    continue
                try:
                    if os.stat(path).st_ino != os.fstat(fd).st_ino:
                        continue  # finished and replaced under us
                except FileNotFoundError:
                    continue
                dead.append(path)
                if remove_dead:
                    os.unlink(path)
            finally:
                os.close(fd)
        return live, dead

    def orphans(self) -> list[str]:
        """Lock files whose leader is gone (left by killed workers)."""
        return self.survey()[1]
