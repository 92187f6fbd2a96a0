"""Least recently used: evict in the order of last use."""
from __future__ import annotations

from typing import Callable, Iterator

from .policy import always
from .state import MAIN, Item, QueueState

__all__ = ["LRU"]


class LRU:
    """LRU for a cache of ``capacity`` bytes (the order needs no size; the
    capacity is kept for symmetry with :class:`~.s3fifo.S3FIFO`).

    :param page: objects read from the state per step of the last-use order.
    :raises ValueError: on a negative capacity or a page below 1.
    """

    name = "lru"

    def __init__(self, capacity: int = 0, *, page: int = 256) -> None:
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError("capacity must be an int >= 0")
        if page < 1:
            raise ValueError("page must be >= 1")
        self.capacity, self.page = capacity, page

    def __repr__(self) -> str:
        return f"LRU({self.capacity})"

    def admit(self, state: QueueState, item: Item) -> bool:
        """Mark ``item`` admitted (LRU orders by last use, not by queue)."""
        state.push(item, MAIN, item.freq)
        return True

    def victims(self, state: QueueState, *, can_evict: Callable[[Item], bool] = always,
                protect_from: float = float("inf")) -> Iterator[Item]:
        """Evict least recently used first, passing over those that may not go
        (keyset paging: no re-reading of what was passed over)."""
        after = None
        while True:
            page = state.least_recently_used(after, self.page)
            if not page:
                return
            for item in page:
                if item.last_used >= protect_from:
                    return  # the rest were used later still
                after = item
                if can_evict(item):
                    state.remove(item)
                    yield item
