"""Keeping a store sound and within its size: verify, repair, collect garbage.

These run beside live servers: every step is one rename, unlink or index row,
and nothing that a live fetch owns (its locked journal, its temp files) is
touched.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .hashing import Hash
from .index import SQLiteIndex
from .flights import Flights
from .store import CAFS

__all__ = ["VerifyReport", "verify_store", "GCReport", "collect_garbage", "parse_size", "SizeLimiter",
           "store_usage", "open_blobs", "clear_orphans"]

log = logging.getLogger("cachefetch.maintenance")

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)
_FLIGHT_TEMP = re.compile(r"cf-([0-9a-f]{16})-.*\.part")


def parse_size(text: str) -> int:
    """Bytes from ``"20G"``, ``"512M"``, ``"1.5TiB"``, ``"1000"`` (binary units).

    :raises ValueError: on anything else.
    """
    m = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"not a size: {text!r} (try 500M, 20G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class VerifyReport:
    """What :func:`verify_store` found (and removed, with ``repair``)."""

    blobs_checked: int = 0
    bytes_checked: int = 0
    corrupt_blobs: list[Hash] = field(default_factory=list)
    missing_blob_entries: list[tuple[str, str, Hash]] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def damaged(self) -> bool:
        """Whether any blob or entry was wrong (orphans are leftovers, not damage)."""
        return bool(self.corrupt_blobs or self.missing_blob_entries)


def clear_orphans(store: CAFS, stale_after: float = 3600.0) -> list[str]:
    """Remove journals whose leader died and temp files no live fetch owns.

    A flight's temp file is kept while its leader holds the journal lock;
    other temp files (from :meth:`CAFS.put`) once untouched for ``stale_after``.
    :returns: the removed paths.
    """
    flights = Flights(store.root)
    # A leader journals its flight id before it creates its temp file, so every
    # temp file listed now belongs to a flight already in the journals read next.
    temps = store.temp_files()
    live, removed = flights.survey(remove_dead=True)
    cutoff = time.time() - stale_after
    for path in temps:
        m = _FLIGHT_TEMP.fullmatch(os.path.basename(path))
        try:
            if m and m.group(1) in live:
                continue
            if not m and os.stat(path).st_mtime > cutoff:
                continue
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def verify_store(store: CAFS, index: SQLiteIndex, repair: bool = False,
                 progress: Callable[[int, int, int], None] | None = None) -> VerifyReport:
    """Re-hash every blob and check every entry's blob exists; clear orphans.

    :param repair: remove corrupt blobs (and the entries pointing at them) and
        entries whose blob is missing.
    :param progress: called as ``progress(done, total, bytes)`` after each blob.
    """
    report = VerifyReport(repaired=repair)

    def on_blob(done: int, total: int, size: int | None) -> None:
        if size is not None:
            report.blobs_checked += 1
            report.bytes_checked += size
        if progress is not None:
            progress(done, total, report.bytes_checked)

    report.corrupt_blobs = store.verify(remove=repair, on_blob=on_blob)
    if repair:
        for h in report.corrupt_blobs:
            index.delete_hash(h)
    for entry in index:
        if not store.exists(entry.hash):
            report.missing_blob_entries.append((entry.key, entry.variant, entry.hash))
            if repair:
                index.delete(entry.key, entry.variant)
    report.orphan_files = clear_orphans(store)
    return report


def store_usage(store: CAFS) -> tuple[int, int]:
    """``(blobs, bytes)`` on disk now."""
    count = size = 0
    for h in store:
        try:
            size += store.size(h)
            count += 1
        except FileNotFoundError:
            continue
    return count, size


@dataclass
class GCReport:
    """What :func:`collect_garbage` removed."""

    before: int = 0
    after: int = 0
    evicted_entries: int = 0
    removed_blobs: int = 0


def open_blobs(store: CAFS) -> set[str]:
    """Paths of the blobs some process has open now: being sent, or read.

    Read from Linux's ``/proc/<pid>/fd``; processes we may not inspect, and
    systems without ``/proc``, show nothing.
    """
    prefix = store.blobs_dir + os.sep
    held: set[str] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return held
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                held.add(target)
    return held


def collect_garbage(store: CAFS, index: SQLiteIndex, max_size: int, *, grace: float = 600.0,
                    protect: float = 60.0) -> GCReport:
    """Evict until the blobs take at most ``max_size`` bytes.

    First blobs no entry points at, once older than ``grace`` seconds (a
    younger one may be a commit whose entry is about to be written); then
    entries least recently used first, removing each blob no entry points at
    any more. Never evicted: entries used in the last ``protect`` seconds, and
    blobs a process has open (being served) with the entries pointing at them.

    :raises ValueError: if ``max_size`` is negative.
    """
    if max_size < 0:
        raise ValueError("max_size must be >= 0")
    report = GCReport()
    sizes = {}
    for h in store:
        try:
            st = os.stat(store.path(h))
        except FileNotFoundError:
            continue
        sizes[h] = (st.st_size, st.st_mtime)
    total = report.before = sum(s for s, _ in sizes.values())
    busy = open_blobs(store)
    now = time.time()
    for h, (size, mtime) in sizes.items():
        if total <= max_size:
            break
        if now - mtime > grace and store.path(h) not in busy and not index.referenced(h):
            if store.delete(h):
                total -= size
                report.removed_blobs += 1
    kept = 0  # busy entries stay at the front of the LRU order: skip past them
    while total > max_size:
        batch = index.least_recently_used(256, used_before=now - protect, offset=kept)
        if not batch:
            break
        for entry in batch:
            if total <= max_size:
                break
            if store.path(entry.hash) in busy:
                kept += 1
                continue
            index.delete(entry.key, entry.variant)
            report.evicted_entries += 1
            if not index.referenced(entry.hash) and store.delete(entry.hash):
                total -= sizes.get(entry.hash, (entry.size, 0))[0]
                report.removed_blobs += 1
    report.after = total
    return report


class SizeLimiter:
    """Keeps a live store under ``max_size`` from a background thread.

    Every worker may run one; a lock file next to the store lets one of them
    collect at a time.
    """

    def __init__(self, store: CAFS, index: SQLiteIndex, max_size: int, interval: float = 30.0) -> None:
        if max_size < 0 or interval <= 0:
            raise ValueError("max_size must be >= 0 and interval > 0")
        self.store, self.index, self.max_size, self.interval = store, index, max_size, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cachefetch-gc", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        lock_path = os.path.join(self.store.root, "gc.lock")
        while not self._stop.wait(self.interval):
            try:
                with open(lock_path, "a") as lock:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    report = collect_garbage(self.store, self.index, self.max_size)
                    if report.evicted_entries or report.removed_blobs:
                        log.info("gc: %d -> %d bytes, %d entries evicted, %d blobs removed", report.before,
                                 report.after, report.evicted_entries, report.removed_blobs)
            except Exception:
                log.exception("background gc failed")
