"""An in-memory :class:`~.state.QueueState`, and trace replay through it.

Replay runs the policies' own code (the code that evicts from a store) on a
sequence of requests, to measure miss ratios without a store.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterable

from .policy import Policy
from .state import FREQ_CAP, MAIN, PENDING, SMALL, Item

__all__ = ["MemoryQueues", "ReplayResult", "replay"]


class MemoryQueues:
    """Objects, their queues, a ghost FIFO and a last-use order, in dicts.

    Not thread-safe. Times (``when``) must not go backwards.
    """

    def __init__(self) -> None:
        self._items: dict[Hashable, Item] = {}
        self._queues: dict[int, OrderedDict[Hashable, None]] = {q: OrderedDict() for q in (PENDING, SMALL, MAIN)}
        self._bytes = {q: 0 for q in self._queues}
        self._by_use: OrderedDict[Hashable, None] = OrderedDict()
        self._ghost: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost_bytes = 0
        self._full = False

    # -- what a cache does to it -------------------------------------------

    def add(self, id: Hashable, weight: int, when: float = 0.0) -> Item:
        """Store a new object (pending until a policy admits it).

        :raises KeyError: if ``id`` is already stored.
        :raises ValueError: if ``weight`` is negative.
        """
        if id in self._items:
            raise KeyError(f"{id!r} is already stored")
        if weight < 0:
            raise ValueError("weight must be >= 0")
        item = self._items[id] = Item(id, weight, PENDING, 0, when)
        self._queues[PENDING][id] = None
        self._bytes[PENDING] += weight
        self._by_use[id] = None
        return item

    def hit(self, id: Hashable, when: float) -> None:
        """Record a use of a stored object (as ``SQLiteIndex.touch`` does)."""
        item = self._items[id]
        self._items[id] = Item(id, item.weight, item.queue, min(item.freq + 1, FREQ_CAP), when)
        self._by_use.move_to_end(id)

    def __contains__(self, id: Hashable) -> bool:
        return id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def used(self) -> int:
        """The weights of every stored object."""
        return sum(self._bytes.values())

    def get(self, id: Hashable) -> Item:
        """The stored object ``id``. :raises KeyError: if absent."""
        return self._items[id]

    # -- QueueState ----------------------------------------------------------

    def pending(self, limit: int) -> list[Item]:
        return [self._items[i] for i in itertools.islice(self._queues[PENDING], limit)]

    def head(self, queue: int) -> Item | None:
        q = self._queues[queue]
        return self._items[next(iter(q))] if q else None

    def push(self, item: Item, queue: int, freq: int) -> None:
        old = self._items[item.id]
        del self._queues[old.queue][item.id]
        self._bytes[old.queue] -= old.weight
        self._queues[queue][item.id] = None
        self._bytes[queue] += old.weight
        self._items[item.id] = Item(item.id, old.weight, queue, freq, old.last_used)

    def remove(self, item: Item) -> None:
        old = self._items.pop(item.id)
        del self._queues[old.queue][item.id]
        self._bytes[old.queue] -= old.weight
        del self._by_use[item.id]

    def queue_bytes(self, queue: int) -> int:
        return self._bytes[queue]

    def queue_len(self, queue: int) -> int:
        return len(self._queues[queue])

    def least_recently_used(self, after: Item | None, limit: int) -> list[Item]:
        ids = iter(self._by_use)
        if after is not None:  # passed over: skip to the first used later
            ids = itertools.dropwhile(lambda i: self._items[i].last_used <= after.last_used, ids)
        return [self._items[i] for i in itertools.islice(ids, limit)]

    def ghost_add(self, item: Item) -> None:
        self.ghost_take(item)
        self._ghost[item.id] = item.weight
        self._ghost_bytes += item.weight

    def ghost_take(self, item: Item) -> bool:
        weight = self._ghost.pop(item.id, None)
        if weight is None:
            return False
        self._ghost_bytes -= weight
        return True

    def ghost_bytes(self) -> int:
        return self._ghost_bytes

    def ghost_drop_oldest(self) -> bool:
        if not self._ghost:
            return False
        _, weight = self._ghost.popitem(last=False)
        self._ghost_bytes -= weight
        return True

    def been_full(self) -> bool:
        return self._full

    def mark_full(self) -> None:
        self._full = True


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """Counts from :func:`replay`."""

    requests: int
    misses: int
    bytes: int
    missed_bytes: int

    @property
    def miss_ratio(self) -> float:
        """Share of requests that missed."""
        return self.misses / self.requests if self.requests else 0.0

    @property
    def byte_miss_ratio(self) -> float:
        """Share of requested bytes that missed."""
        return self.missed_bytes / self.bytes if self.bytes else 0.0


def replay(trace: Iterable[tuple[Hashable, int]], policy: Policy, capacity: int,
           state: MemoryQueues | None = None) -> ReplayResult:
    """Run ``trace`` (``(id, size)`` per request) through ``policy`` on a
    cache of ``capacity`` bytes, the way a store runs: a miss stores the
    object, the policy admits it, then evicts while over ``capacity``. An
    object larger than ``capacity`` is never stored. Time is the request's
    position in the trace.
    """
    state = MemoryQueues() if state is None else state
    requests = misses = nbytes = missed = 0
    for t, (id, size) in enumerate(trace):
        requests += 1
        nbytes += size
        if id in state:
            state.hit(id, t)
            continue
        misses += 1
        missed += size
        if size > capacity:
            continue
        policy.admit(state, state.add(id, size, t))
        if state.used() > capacity:
            for _ in policy.victims(state):
                if state.used() <= capacity:
                    break
    return ReplayResult(requests, misses, nbytes, missed)
