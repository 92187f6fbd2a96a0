"""What every eviction policy offers, and how to pick one by name."""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

from .state import Item, QueueState

__all__ = ["Policy", "POLICIES", "DEFAULT_POLICY", "make_policy", "always"]


def always(item: Item) -> bool:
    """A ``can_evict`` that lets everything go."""
    return True


class Policy(Protocol):
    """An eviction policy over a :class:`~cachefetch.eviction.state.QueueState`.

    It keeps no state of its own between calls: everything lives in the
    state, so any worker (or a restarted one) can carry on.
    """

    name: str

    def admit(self, state: QueueState, item: Item) -> bool:
        """Place a newly stored (pending) ``item``; ``False`` if it was
        removed instead."""

    def victims(self, state: QueueState, *, can_evict: Callable[[Item], bool] = always,
                protect_from: float = float("inf")) -> Iterator[Item]:
        """Remove objects one at a time, in the policy's order, yielding each
        after it is gone; ends when nothing more may go. Objects for which
        ``can_evict`` is false, or used at or after ``protect_from``, stay."""


def make_policy(name: str, capacity: int) -> Policy:
    """The policy called ``name`` (see :data:`POLICIES`) for a cache of
    ``capacity`` bytes.

    :raises ValueError: on an unknown name or a negative capacity.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r} (choose from {', '.join(sorted(POLICIES))})")
    return POLICIES[name](capacity)


def _s3fifo(capacity: int) -> Policy:
    from .s3fifo import S3FIFO

    return S3FIFO(capacity)


def _lru(capacity: int) -> Policy:
    from .lru import LRU

    return LRU(capacity)


#: Policy names, as ``gc --policy`` and ``SizeLimiter(policy=...)`` take them.
POLICIES: dict[str, Callable[[int], Policy]] = {"s3fifo": _s3fifo, "lru": _lru}
#: The default: S3-FIFO misses less than LRU on every trace of
#: ``benchmarks/bench_eviction.py`` (see benchmarks/results/eviction.md).
DEFAULT_POLICY = "s3fifo"
