"""Fetches in flight, shared by the threads and processes of one store.

One fetch per flight key runs at a time, across every thread and gunicorn
worker using the same store. Its leader holds an exclusive ``flock`` on
``<root>/inflight/<id>.lock`` and appends a journal to that same file, one
JSON record per line:

``L``  a leader holds the flight; its temp files are named ``cf-<fid>-*``
``H``  the response has started: status, headers, the growing body file
``D``  the body is complete: its hash and size
``F``  the fetch failed (``why``: ``upstream`` or ``abandoned``)
``X``  the response is not cacheable: followers go to the app themselves

A follower opens the lock file, reads the journal and the body file as they
grow, and tests the lock to learn whether the leader is still alive: the
kernel releases a killed leader's lock, and a journal with no final record
under a free lock means the leader died. The leader unlinks the lock file
before releasing it, so a finished journal is never found by a new request,
while followers still read it through their open descriptor.
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
from dataclasses import dataclass
from typing import Any, Iterator

from .hashing import hash_bytes

__all__ = ["Flights", "Lead", "Follow", "Journal", "LeaderGone"]

log = logging.getLogger("cachefetch.inflight")

_READ_SIZE = 1 << 18
# Poll intervals while a follower waits for the leader's next bytes.
_POLL_MIN, _POLL_MAX = 0.001, 0.02


class LeaderGone(Exception):
    """The leader ended without completing the fetch (it was killed, or failed)."""


@dataclass(frozen=True)
class Journal:
    """What a follower has learned of a fetch so far."""

    fid: str | None = None                # the L record's flight id
    head: dict[str, Any] | None = None   # the H record
    final: str | None = None              # "D", "F" or "X"
    detail: dict[str, Any] | None = None  # the final record's body


def _parse(raw: bytes) -> Journal:
    fid = head = final = detail = None
    # Only lines with their newline are complete; the last may be mid-write.
    for line in raw.split(b"\n")[:-1]:
        kind, _, body = line.partition(b" ")
        try:
            record = json.loads(body) if body else {}
        except ValueError:
            continue  # a line torn by a failed write: as if never written
        if kind == b"L":
            fid = record.get("fid")
        elif kind == b"H":
            head = record
        elif kind in (b"D", b"F", b"X"):
            final, detail = kind.decode(), record
    return Journal(fid, head, final, detail)


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

    Its first record names the flight id; temp files of this fetch must be
    named with :attr:`temp_prefix` so a successor can remove them if this
    process dies before saying which file it writes.
    """

    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self.path = path
        self.fid = secrets.token_hex(8)
        self._append("L", {"fid": self.fid, "pid": os.getpid()})

    @property
    def temp_prefix(self) -> str:
        """The name prefix for this fetch's temp files."""
        return f"cf-{self.fid}-"

    @property
    def active(self) -> bool:
        """Whether this lead still holds the lock."""
        return self._fd is not None

    def _append(self, kind: str, record: dict[str, Any] | None) -> None:
        if self._fd is None:
            raise RuntimeError("this lead has been released")
        line = kind + (" " + json.dumps(record, separators=(",", ":")) if record is not None else "") + "\n"
        data = memoryview(line.encode())
        while data:  # readers use only lines with their newline, so a short write shows nothing early
            data = data[os.write(self._fd, data):]

    def publish(self, head: dict[str, Any]) -> None:
        """Append the ``H`` record: followers may now start answering."""
        self._append("H", head)

    def done(self, hash_hex: str, size: int) -> None:
        """Append ``D``: the body file is complete. The lock is kept until :meth:`release`.

        :raises OSError: if the journal cannot be written (a full disk).
        """
        self._append("D", {"hash": hash_hex, "size": size})

    def fail(self, why: str, message: str = "") -> None:
        """Append ``F`` and release: ``why`` is ``upstream`` or ``abandoned``.

        Never raises for a journal write: followers that cannot read the
        record see a released lock with no final record, which also fails.
        """
        self._finish("F", {"why": why, "message": message[:500]})

    def uncacheable(self, status: int) -> None:
        """Append ``X`` and release: followers must ask the app themselves."""
        self._finish("X", {"status": status})

    def _finish(self, kind: str, record: dict[str, Any]) -> None:
        try:
            if self._fd is not None:
                self._append(kind, record)
        except OSError as exc:
            log.warning("could not journal %s to %s: %s", kind, self.path, exc)
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
    """A follower's view of a flight: the journal and the leader's liveness."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def journal(self) -> Journal:
        """Read the journal as it is now."""
        return _parse(os.pread(self._fd, 1 << 20, 0))

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

    def body(self, path: str, deadline: float | None = None) -> Iterator[bytes]:
        """Yield the body file's bytes as the leader writes them, to the end.

        The first ``next()`` waits at most until ``deadline`` (monotonic) for
        a byte. :raises FileNotFoundError: if the body file is already gone
        when first opened; :raises LeaderGone: if the fetch fails or its
        leader dies before the end; :raises TimeoutError: at the deadline.
        """
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sent = 0
            delay = _POLL_MIN
            while True:
                data = os.read(fd, _READ_SIZE)
                if data:
                    sent += len(data)
                    delay = _POLL_MIN
                    yield data
                    continue
                journal = self.settled()
                if journal.final == "D":
                    size = journal.detail["size"]
                    # D comes after the last write: whatever is left is there now.
                    while sent < size and (data := os.read(fd, min(_READ_SIZE, size - sent))):
                        sent += len(data)
                        yield data
                    if sent != size:
                        raise LeaderGone(f"body file ended at {sent} of {size} bytes")
                    return
                if journal.final is not None:
                    raise LeaderGone(f"the fetch ended with {journal.final}: {journal.detail}")
                if sent == 0 and deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("no body byte from the leader in time")
                time.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the journal descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Flights:
    """Coordinates fetches by key under ``<root>/inflight``.

    :param root: the store root; ``inflight/`` is created under it.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.dir = os.path.join(os.fspath(root), "inflight")
        self.temp_dir = os.path.join(os.fspath(root), "tmp")
        os.makedirs(self.dir, exist_ok=True)

    def path(self, key: str) -> str:
        """The lock/journal path of flight ``key`` (a hash of it: keys are not file names)."""
        return os.path.join(self.dir, hash_bytes(key.encode("utf-8", "surrogatepass")).hex[:40] + ".lock")

    def lead(self, key: str) -> Lead | None:
        """Become the leader of ``key``'s flight, or ``None`` if another leads it now.

        A journal left by a leader that died is cleared (with its body file)
        on the way.

        :raises OSError: if the journal cannot be created or written.
        """
        path = self.path(key)
        while True:
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
        try:
            journal = _parse(os.pread(fd, 1 << 20, 0))
        except ValueError:
            journal = Journal()
        if journal.fid and journal.fid.isalnum():  # after D the commit may not have run either
            for temp in glob.glob(os.path.join(glob.escape(self.temp_dir), f"cf-{journal.fid}-*")):
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
                    try:
                        fid = _parse(os.pread(fd, 1 << 20, 0)).fid
                    except ValueError:
                        fid = None
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
