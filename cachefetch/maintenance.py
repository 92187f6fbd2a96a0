"""Keeping a store sound and within its size: verify, repair, collect garbage.

These run beside live servers: every step is one rename, unlink or index row,
and nothing that a live fetch owns (its locked journal, its temp files) is
touched. A pass of the size limit costs what changed since the last one: the
index keeps the store's totals as it goes (no walk of ``blobs/``), the
eviction policy reads its queues through indexes, and expired or
unreferenced rows are found through indexes too.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .eviction import make_policy
from .eviction.policy import DEFAULT_POLICY, Policy, always
from .eviction.state import Item
from .hashing import Hash
from .flights import Flights
from .index import MaintainedIndex, Usage
from .store import CAFS

__all__ = ["VerifyReport", "verify_store", "GCReport", "collect_garbage", "parse_size", "SizeLimiter",
           "store_usage", "open_blobs", "clear_orphans", "sweep_blobs", "STALE_WINDOW", "DEFAULT_POLICY"]

log = logging.getLogger("cachefetch.maintenance")

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)
_FLIGHT_TEMP = re.compile(r"cf-([0-9a-f]{16})-.*\.part")
#: Entries expired longer ago than this are purged: past the proxy's default
#: ``stale_if_error`` (a week), nothing serves them any more.
STALE_WINDOW = 7 * 86400.0
_BATCH = 256
#: Entries evicted per transaction: enough that a commit (a few fsyncs, and
#: each page the batch changed written once) is rare, few enough that a live
#: writer waits for the lock a few tenths of a second at most (on a 1M-entry
#: store) and the batch's pages fit the large transaction's page cache.
_EVICT_BATCH = 4096
#: Files unlinked per look at the index (whether a put named one again): a
#: batch's, looked at once just before its unlinks (looks in smaller chunks
#: kept meeting the next commit, and waited on its lock tens of ms each).
_UNLINK_BATCH = _EVICT_BATCH
#: Threads unlinking a pass's files. An unlink of a file with data waits on
#: the file system (ext4 here: ~80 us of wall time, ~35 us of CPU, in a store's
#: shard); waits on several threads overlap (20,000 files of a 1M-entry
#: store: 2.2 s on one thread, 0.7 s on 8).
_UNLINKERS = 8


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


def verify_store(store: CAFS, index: MaintainedIndex, repair: bool = False,
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
    if repair and report.corrupt_blobs:
        index.delete_hashes(report.corrupt_blobs)
    # One look per distinct blob, not per entry; one scan of the entries for
    # all the missing ones (the index has no lookup by hash).
    missing = [h for h in index.blob_hashes() if not store.exists(h)]
    if missing:
        report.missing_blob_entries = index.naming(missing)
        if repair:
            index.delete_hashes(missing)
            for h in missing:
                index.forget_blob(h)
    report.orphan_files = clear_orphans(store)
    return report


def store_usage(store: CAFS) -> tuple[int, int]:
    """``(blobs, bytes)`` on disk now, by walking the store (O(blobs): for
    checks and tests; the size limit reads :meth:`SQLiteIndex.usage`)."""
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
    """What :func:`collect_garbage` did. ``before`` and ``after`` are the
    store's bytes as :meth:`SQLiteIndex.usage` counts them (distinct blobs,
    blobs not yet removed, the index's own pages and ``-wal``)."""

    before: int = 0
    after: int = 0
    evicted_entries: int = 0
    removed_blobs: int = 0
    expired_entries: int = 0
    admitted_entries: int = 0
    policy: str = DEFAULT_POLICY


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


def _unlink_blob(store: CAFS, index: MaintainedIndex, h: Hash) -> bool:
    """Remove the file of a blob no entry points at, and stop counting it."""
    if index.referenced(h):
        return False
    removed = store.delete(h)
    index.forget_blob(h)
    return removed


def sweep_blobs(store: CAFS, index: MaintainedIndex, *, grace: float = 600.0) -> int:
    """Remove blob files the index does not know, once older than ``grace``
    seconds (a younger one may be a commit whose entry is about to be
    written), unless a process has one open. A walk of the whole store:
    leftovers of a crash between commit and entry, or of an index rebuilt
    empty, are found no other way. Returns how many went."""
    if grace < 0:
        raise ValueError("grace must be >= 0")
    cutoff = time.time() - grace
    busy: set[str] | None = None
    removed = 0
    for h in store:
        if index.known(h):
            continue
        path = store.path(h)
        try:
            if os.stat(path).st_mtime > cutoff:
                continue
        except FileNotFoundError:
            continue
        if busy is None:
            busy = open_blobs(store)
        if path not in busy and not index.known(h) and store.delete(h):
            removed += 1
    return removed


def collect_garbage(store: CAFS, index: MaintainedIndex, max_size: int | None, *, grace: float = 600.0,
                    protect: float = 60.0, policy: str = DEFAULT_POLICY, stale_window: float = STALE_WINDOW,
                    sweep: bool = False) -> GCReport:
    """One pass of upkeep; evicts until the store takes at most ``max_size``
    bytes as :meth:`SQLiteIndex.usage` counts them (the index's own file
    included, so rows count against the size too).

    In order: purge entries expired more than ``stale_window`` seconds ago;
    let ``policy`` (``"s3fifo"`` or ``"lru"``) admit the entries stored since
    the last pass (only with a ``max_size``: admission is relative to it); remove blobs no entry has pointed at for ``grace`` seconds
    (and, with ``sweep``, blob files the index does not know: a walk of the
    store); then, if still over ``max_size`` (``None``: no limit), evict
    entries in the policy's order, removing each blob no entry points at any
    more. Never evicted: entries used in the last ``protect`` seconds, and
    blobs a process has open (being served) with the entries pointing at them.
    Without anything to do, a pass costs a few index lookups, whatever the
    store's size.

    :raises ValueError: on a negative ``max_size``, ``grace``, ``protect`` or
        ``stale_window``, or an unknown policy.
    """
    if max_size is not None and max_size < 0:
        raise ValueError("max_size must be >= 0")
    if grace < 0 or protect < 0 or stale_window < 0:
        raise ValueError("grace, protect and stale_window must be >= 0")
    evictor = make_policy(policy, max_size or 0)
    report = GCReport(policy=policy)
    now = time.time()
    report.before = index.usage().total

    while (n := index.purge_expired(now - stale_window, 1000)) > 0:
        report.expired_entries += n
    # Admission places entries relative to the size (S3-FIFO's small queue is
    # a share of it): without one there is nothing to place them for.
    queues = index.queues()
    while max_size is not None:
        with index.transaction():
            pending = queues.pending(_BATCH)
            for item in pending:
                evictor.admit(queues, item)
        report.admitted_entries += len(pending)
        if len(pending) < _BATCH:
            break

    busy: set[str] | None = None
    # Measured now, not at the start: the purge above has just unreferenced blobs.
    for h, _size in _all_unreferenced(index, time.time() - grace):
        if busy is None:
            busy = open_blobs(store)
        if store.path(h) not in busy and _unlink_blob(store, index, h):
            report.removed_blobs += 1
    if sweep:
        report.removed_blobs += sweep_blobs(store, index, grace=grace)

    usage = index.usage()
    if max_size is not None and usage.total > max_size:
        report.evicted_entries, removed = _evict(store, index, evictor, max_size, now - protect, usage)
        report.removed_blobs += removed
    if report.evicted_entries or report.expired_entries or report.removed_blobs:
        index.compact()
    report.after = index.usage().total
    return report


def _all_unreferenced(index: MaintainedIndex, before: float) -> Iterator[tuple[Hash, int]]:
    while batch := index.unreferenced_blobs(before, 1000):
        yield from batch
        if len(batch) < 1000:
            return


def _evict(store: CAFS, index: MaintainedIndex, evictor: Policy, max_size: int, protect_from: float,
           usage: Usage) -> tuple[int, int]:
    """Evict in ``evictor``'s order until under ``max_size``, in transactions
    of up to :data:`_EVICT_BATCH` entries. Each transaction also stops
    counting the blobs it left unreferenced (in the same write that
    unreferences them); their files are removed once it has committed (an
    entry never names a missing file; a pass killed in between leaves files
    no row names, for the sweep), on other threads while the next
    transaction runs. Returns ``(entries evicted, blobs
    removed)``."""
    busy = _open_blob_names(store)
    # Within the pass: the -wal counts as it was at the start; blobs this pass
    # left unreferenced are no longer counted (forgotten), the others are.
    kept_orphans, wal = usage.orphan_bytes, usage.wal_bytes
    unforgotten: list[Item] = []
    forgotten: list[Hash] = []

    def can_evict(item: Item) -> bool:
        return item.blob.hex not in busy

    def forget() -> None:
        forgotten.extend(index.forget_unreferenced({v.blob for v in unforgotten}))
        unforgotten.clear()

    def excess() -> int:
        forget()
        u = index.usage()
        return u.blob_bytes + kept_orphans + u.index_bytes + wal - max_size

    victims = evictor.victims(index.queues(), can_evict=can_evict if busy else always, protect_from=protect_from)
    evicted = 0
    # One thread looks at the index (one reader: readers hold up the commits),
    # the pool unlinks what it found forgotten still.
    with ThreadPoolExecutor(_UNLINKERS, thread_name_prefix="cachefetch-unlink") as unlinkers, \
            ThreadPoolExecutor(1, thread_name_prefix="cachefetch-evict") as checker, \
            index.large_transactions():
        # Its connection opened now, not while the first batch commits (then
        # opening it can wait on the lock for most of a second).
        checker.submit(index.known_among, []).result()
        removals = []
        while True:
            with index.transaction(forget_blobs=True):
                batch = _take_victims(victims, excess, unforgotten)
                forget()
            evicted += len(batch)
            removals.append(checker.submit(_delete_blobs, store, index, forgotten[:], unlinkers))
            forgotten.clear()
            if len(batch) < _EVICT_BATCH or excess() <= 0:
                break
        removed = sum(f.result() for f in removals)
    return evicted, removed


def _take_victims(victims: Iterator[Item], excess: Callable[[], int], taken: list[Item]) -> list[Item]:
    """Up to :data:`_EVICT_BATCH` victims, fewer once they cover ``excess()``;
    each is appended to ``taken`` as well."""
    # Measuring costs a few statements (and writes what the queues owe): it is
    # done again only once the victims' weights cover what was over at the
    # last look (a row frees its page only when the page empties, so a weight
    # can promise more than it frees, never much less).
    batch: list[Item] = []
    left = 0
    for victim in victims:
        batch.append(victim)
        taken.append(victim)
        left -= victim.weight
        if len(batch) >= _EVICT_BATCH:
            break
        if left <= 0:
            left = excess()
            if left <= 0:
                break
    return batch


def _delete_blobs(store: CAFS, index: MaintainedIndex, hashes: list[Hash],
                  unlinkers: ThreadPoolExecutor | None = None) -> int:
    """Remove the files of ``hashes`` the index has not come to know again
    since they were forgotten (a put of the same content meanwhile found the
    file and named it), on the ``unlinkers`` threads if given; returns how
    many were removed."""
    removed = 0
    # A look per batch of files, each just before their unlinks.
    for start in range(0, len(hashes), _UNLINK_BATCH):
        chunk = hashes[start:start + _UNLINK_BATCH]
        known = index.known_among(chunk)
        gone = [h for h in chunk if h not in known]
        if unlinkers is None:
            removed += _unlink(store, gone)
        else:  # a share of the chunk per thread (a task per file costs more than its unlink)
            removed += sum(f.result() for f in [unlinkers.submit(_unlink, store, gone[k::_UNLINKERS])
                                                for k in range(_UNLINKERS)])
    return removed


def _unlink(store: CAFS, hashes: list[Hash]) -> int:
    """Remove the files of ``hashes``; returns how many were there."""
    return sum(store.delete(h) for h in hashes)


def _open_blob_names(store: CAFS) -> set[str]:
    """The names (hashes, in hex) of the blobs some process has open now."""
    return {os.path.basename(path) for path in open_blobs(store)}


class SizeLimiter:
    """Keeps a live store under ``max_size`` from a background thread: a
    :func:`collect_garbage` pass every ``interval`` seconds, with a sweep of
    the whole store every ``sweep_interval`` seconds (the first pass
    included).

    Every worker may run one; a lock file next to the store lets one of them
    collect at a time. The thread runs only this; it logs what it evicted.

    :raises ValueError: on a negative ``max_size``, a non-positive interval or
        an unknown policy.
    """

    def __init__(self, store: CAFS, index: MaintainedIndex, max_size: int, interval: float = 30.0, *,
                 policy: str = DEFAULT_POLICY, stale_window: float = STALE_WINDOW,
                 sweep_interval: float = 86400.0) -> None:
        if max_size < 0 or interval <= 0 or sweep_interval <= 0:
            raise ValueError("max_size must be >= 0 and interval, sweep_interval > 0")
        make_policy(policy, max_size)  # reject an unknown name here, not in the thread
        if stale_window < 0:
            raise ValueError("stale_window must be >= 0")
        self.store, self.index, self.max_size, self.interval = store, index, max_size, interval
        self.policy, self.stale_window, self.sweep_interval = policy, stale_window, sweep_interval
        self._last_sweep = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cachefetch-gc", daemon=True)

    def start(self) -> None:
        """Start the background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (at most the pass it is in)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def check(self) -> GCReport | None:
        """One pass now, unless another collector holds the store's lock
        (then ``None``). Runs in the caller's thread."""
        lock_path = self.store.layout.gc_lock_path
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            sweep = time.monotonic() - self._last_sweep >= self.sweep_interval
            report = collect_garbage(self.store, self.index, self.max_size, policy=self.policy,
                                     stale_window=self.stale_window, sweep=sweep)
            if sweep:
                self._last_sweep = time.monotonic()
            return report

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                report = self.check()
                if report is not None and (report.evicted_entries or report.removed_blobs or report.expired_entries):
                    log.info("gc (%s): %d -> %d bytes, %d entries evicted, %d expired purged, %d blobs removed",
                             report.policy, report.before, report.after, report.evicted_entries,
                             report.expired_entries, report.removed_blobs)
            except Exception:
                log.exception("background gc failed")
