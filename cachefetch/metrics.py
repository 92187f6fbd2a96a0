"""Prometheus metrics of a proxy, correct under several gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set before the first import of
``prometheus_client`` (``cachefetch serve`` does it), every worker writes its
counters to files there and :func:`render` sums them; without it the metrics
are this process's.
"""
from __future__ import annotations

import os
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .policy import CacheStatus

__all__ = ["REQUESTS", "UPSTREAM_BYTES", "SERVED_BYTES", "UPSTREAM_ERRORS", "VERIFY_FAILURES", "render",
           "CONTENT_TYPE", "outcome_of"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUESTS = Counter("cachefetch_requests", "Requests by cache outcome", ["outcome"])
UPSTREAM_BYTES = Counter("cachefetch_upstream_bytes", "Body bytes received from the upstream")
SERVED_BYTES = Counter("cachefetch_served_bytes", "Body bytes announced to clients (Content-Length)")
UPSTREAM_ERRORS = Counter("cachefetch_upstream_errors", "Upstream failures by kind", ["kind"])
VERIFY_FAILURES = Counter("cachefetch_verification_failures", "Bodies whose digest did not match")


def outcome_of(cache_status: CacheStatus | None) -> str:
    """hit, stale, revalidated, collapsed, miss or bypass, from an answer's
    :class:`~cachefetch.policy.CacheStatus` (``None``: not through the cache)."""
    return "bypass" if cache_status is None else cache_status.outcome


class _StoreCollector:
    def __init__(self, store_stats: Callable[[], tuple[int, int]]) -> None:
        self._stats = store_stats

    def collect(self):
        entries, size = self._stats()
        yield GaugeMetricFamily("cachefetch_store_bytes", "Bytes of the blobs the index points at", value=size)
        yield GaugeMetricFamily("cachefetch_store_entries", "Entries in the index", value=entries)


def render(store_stats: Callable[[], tuple[int, int]]) -> bytes:
    """The metrics page: every worker's counters, plus the store's size now."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    output = generate_latest(registry)
    store_registry = CollectorRegistry()
    store_registry.register(_StoreCollector(store_stats))
    return output + generate_latest(store_registry)
