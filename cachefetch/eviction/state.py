"""The state an eviction policy works on, and the one record it passes around.

A policy (:mod:`.s3fifo`, :mod:`.lru`) only ever talks to a
:class:`QueueState`; two backends implement it: the SQLite index of a live
store (:class:`cachefetch.index.SQLiteQueues`, persisted and shared by every
worker on the store) and :class:`cachefetch.eviction.memory.MemoryQueues`
(for trace replay and tests). So a simulated trace runs the very code that
evicts from a store.

This module imports nothing of cachefetch: the index builds on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Protocol

__all__ = ["PENDING", "SMALL", "MAIN", "FREQ_CAP", "Item", "QueueState"]

#: Queue of an object stored but not yet admitted by a policy.
PENDING = 0
#: S3-FIFO's small (probationary) FIFO queue.
SMALL = 1
#: S3-FIFO's main FIFO queue (also where LRU keeps every admitted object).
MAIN = 2
#: Uses counted per object: S3-FIFO needs "0, 1, 2, 3 or more" (two bits).
FREQ_CAP = 3


@dataclass(frozen=True, slots=True)
class Item:
    """One evictable object as a backend reports it.

    :param id: the backend's name for it (``(key, variant)`` in SQLite).
    :param weight: bytes it is charged in its queue.
    :param queue: :data:`PENDING`, :data:`SMALL` or :data:`MAIN`.
    :param freq: uses since it was queued or last passed over, at most
        :data:`FREQ_CAP`.
    :param last_used: when it was last used (the backend's clock).
    :param blob: what the bytes are stored as, where the backend has blobs.
    :param row: the backend's own handle on it, if it has one (the rowid in
        SQLite), which finds it faster than ``id``; ``None`` otherwise.
    """

    id: Hashable
    weight: int
    queue: int = PENDING
    freq: int = 0
    last_used: float = 0.0
    blob: Any = None
    row: Any = None


class QueueState(Protocol):
    """FIFO queues, a ghost FIFO and a last-use order over stored objects.

    Every method is O(1) or O(log n) in the number of objects (the in-memory
    backend's :meth:`least_recently_used` after a given item excepted).
    """

    def pending(self, limit: int) -> list[Item]:
        """Up to ``limit`` objects not yet admitted, oldest first."""

    def head(self, queue: int) -> Item | None:
        """The oldest object of ``queue``, or ``None`` if it is empty."""

    def push(self, item: Item, queue: int, freq: int) -> None:
        """Move ``item`` to the tail of ``queue`` with use count ``freq``."""

    def remove(self, item: Item) -> None:
        """Drop ``item`` (from a store: delete its entry)."""

    def queue_bytes(self, queue: int) -> int:
        """Sum of the weights of the objects in ``queue``."""

    def queue_len(self, queue: int) -> int:
        """Number of objects in ``queue``."""

    def least_recently_used(self, after: Item | None, limit: int) -> list[Item]:
        """Up to ``limit`` objects by last use, oldest first, after ``after``."""

    def ghost_add(self, item: Item) -> None:
        """Remember ``item`` (its id and weight) at the tail of the ghost FIFO."""

    def ghost_take(self, item: Item) -> bool:
        """Forget ``item`` from the ghost FIFO; whether it was there."""

    def ghost_bytes(self) -> int:
        """Sum of the weights the ghost FIFO remembers."""

    def ghost_drop_oldest(self) -> bool:
        """Forget the ghost FIFO's oldest id; ``False`` if it was empty."""

    def been_full(self) -> bool:
        """Whether anything was ever evicted."""

    def mark_full(self) -> None:
        """Record that something is being evicted."""
