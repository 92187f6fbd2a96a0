"""Eviction: which stored objects go when a store is over its size.

Policies (:class:`S3FIFO`, the default, and :class:`LRU`) are written once
against :class:`~cachefetch.eviction.state.QueueState`, so the same code
evicts from a live store (the SQLite index's queues) and from a trace in
memory (:class:`MemoryQueues`, :func:`replay`).
"""
from .lru import LRU
from .memory import MemoryQueues, replay, ReplayResult
from .policy import POLICIES, Policy, make_policy
from .s3fifo import S3FIFO
from .state import FREQ_CAP, MAIN, PENDING, SMALL, Item, QueueState

__all__ = ["LRU", "S3FIFO", "Policy", "POLICIES", "make_policy", "MemoryQueues", "replay", "ReplayResult",
           "Item", "QueueState", "PENDING", "SMALL", "MAIN", "FREQ_CAP"]
