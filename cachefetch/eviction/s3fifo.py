"""S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction",
SOSP 2023), byte-weighted.

Three FIFO queues: *small* (10% of the bytes) where every new object starts,
*main* for objects that proved themselves, and a *ghost* of ids recently
evicted from small (up to 90% of the bytes' worth). An object at the head of
small that was used since it came in moves to main; one that was not is
evicted and remembered in the ghost, and comes back straight into main if
asked for again while remembered. Main is a CLOCK: its head goes back to the
tail with one use fewer while it has any, and is evicted when it has none.
One-hit wonders thus leave quickly without pushing out what is used.

Where the paper leaves a choice, this follows libCacheSim's ``S3FIFO.c`` (so
its numbers can be checked against it): until the first eviction, new objects
that find small full go to main; a use count is capped at 3; main is
evicted from when it is over its share or small is empty.
"""
from __future__ import annotations

from typing import Callable, Iterator

from .policy import always
from .state import FREQ_CAP, MAIN, SMALL, Item, QueueState

__all__ = ["S3FIFO"]


class S3FIFO:
    """S3-FIFO for a cache of ``capacity`` bytes.

    :param small_ratio: the small queue's share of ``capacity``.
    :param ghost_ratio: the ghost's size as a share of ``capacity`` (in the
        weights of the objects it remembers).
    :param move_threshold: uses in small that earn an object its move to main.
    :raises ValueError: on a negative capacity, ratios outside [0, 1] or a
        threshold outside 1..3.
    """

    name = "s3fifo"

    def __init__(self, capacity: int, *, small_ratio: float = 0.1, ghost_ratio: float = 0.9,
                 move_threshold: int = 1) -> None:
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError("capacity must be an int >= 0")
        if not 0 <= small_ratio <= 1 or not 0 <= ghost_ratio <= 1:
            raise ValueError("small_ratio and ghost_ratio must be within [0, 1]")
        if not 1 <= move_threshold <= FREQ_CAP:
            raise ValueError(f"move_threshold must be within 1..{FREQ_CAP}")
        self.capacity = capacity
        self.small_capacity = int(capacity * small_ratio)
        self.main_capacity = capacity - self.small_capacity
        self.ghost_capacity = int(capacity * ghost_ratio)
        self.move_threshold = move_threshold

    def __repr__(self) -> str:
        return (f"S3FIFO({self.capacity}, small={self.small_capacity}, ghost={self.ghost_capacity}, "
                f"move_threshold={self.move_threshold})")

    def admit(self, state: QueueState, item: Item) -> bool:
        """Place a pending ``item``: into main if the ghost remembers it, else
        into small. An object too big for small goes to main while nothing
        was ever evicted (there is room), else it is removed and remembered:
        asked for again, it is admitted to main."""
        if state.ghost_take(item):
            state.push(item, MAIN, item.freq)
            return True
        if item.weight >= self.small_capacity:
            if state.been_full():
                self._remember(state, item)
                state.remove(item)
                return False
            state.push(item, MAIN, item.freq)
            return True
        if not state.been_full() and state.queue_bytes(SMALL) >= self.small_capacity:
            state.push(item, MAIN, item.freq)
        else:
            state.push(item, SMALL, item.freq)
        return True

    def victims(self, state: QueueState, *, can_evict: Callable[[Item], bool] = always,
                protect_from: float = float("inf")) -> Iterator[Item]:
        """Evict one object at a time (see the module's description); an
        object that may not go now is passed over to the tail of its queue
        with its use count kept."""
        state.mark_full()
        while True:
            if state.queue_bytes(MAIN) > self.main_capacity or state.queue_bytes(SMALL) == 0:
                order = (MAIN, SMALL)
            else:
                order = (SMALL, MAIN)
            for queue in order:
                victim = self._evict_from(state, queue, can_evict, protect_from)
                if victim is not None:
                    break
            else:
                return
            yield victim

    def _evict_from(self, state: QueueState, queue: int, can_evict: Callable[[Item], bool],
                    protect_from: float) -> Item | None:
        # Each object can be passed over once and reinserted at most FREQ_CAP
        # times before it must go: past that, everything left is protected.
        budget = (FREQ_CAP + 1) * state.queue_len(queue) + 1
        while budget > 0:
            budget -= 1
            item = state.head(queue)
            if item is None:
                return None
            if item.last_used >= protect_from or not can_evict(item):
                state.push(item, queue, item.freq)
            elif queue == SMALL and item.freq >= self.move_threshold:
                state.push(item, MAIN, 0)
            elif queue == MAIN and item.freq > 0:
                state.push(item, MAIN, min(item.freq, FREQ_CAP) - 1)
            else:
                if queue == SMALL:
                    self._remember(state, item)
                state.remove(item)
                return item
        return None

    def _remember(self, state: QueueState, item: Item) -> None:
        if item.weight > self.ghost_capacity:
            return
        while state.ghost_bytes() + item.weight > self.ghost_capacity and state.ghost_drop_oldest():
            pass
        state.ghost_add(item)
