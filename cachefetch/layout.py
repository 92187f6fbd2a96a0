"""The one place that knows how a store directory is laid out.

Every path under a store root, and every temp-file name pattern, is named
here and nowhere else::

    blobs/<ab>/<hex>        committed blobs, named by their BLAKE3-256 hash
    tmp/cf-<fid>-*.part     bodies being fetched by flight <fid>
    tmp/cf-*.tmp            other temp files (puts, copies in)
    inflight/<id>.lock      a flight's lock and journal
    index.sqlite3 (+ -wal, -shm, .gen)   the embedded index
    metrics/                prometheus_client's multi-process files (this run of serve)
    metrics/run-id          which run of serve they count
    request-totals.json     request counters of the earlier runs of serve
    gc.lock                 one garbage collector at a time
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .hashing import Hash

__all__ = ["StoreLayout", "TEMP_PREFIX", "flight_temp_prefix"]

#: Every temp file of the store starts with this.
TEMP_PREFIX = "cf-"


def flight_temp_prefix(fid: str) -> str:
    """The name prefix of flight ``fid``'s temp files (so a successor can find them)."""
    return f"{TEMP_PREFIX}{fid}-"


@dataclass(frozen=True)
class StoreLayout:
    """The paths of a store rooted at ``root`` (absolute). Creates nothing."""

    root: str

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root:
            raise TypeError(f"StoreLayout root must be a non-empty str, not {self.root!r}")
        object.__setattr__(self, "root", os.path.abspath(self.root))

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> "StoreLayout":
        """The layout of the store at ``root``. :raises TypeError: if not a path."""
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"a store root must be a path, not {type(root).__name__}")
        return cls(os.fspath(root))

    @property
    def blobs_dir(self) -> str:
        return os.path.join(self.root, "blobs")

    def blob_path(self, h: Hash) -> str:
        """Where blob ``h`` lives (whether or not it exists)."""
        return os.path.join(self.root, "blobs", h.shard, h.hex)

    @property
    def temp_dir(self) -> str:
        return os.path.join(self.root, "tmp")

    @property
    def flights_dir(self) -> str:
        return os.path.join(self.root, "inflight")

    @property
    def index_path(self) -> str:
        return os.path.join(self.root, "index.sqlite3")

    @property
    def metrics_dir(self) -> str:
        return os.path.join(self.root, "metrics")

    @property
    def metrics_run_id_path(self) -> str:
        return os.path.join(self.root, "metrics", "run-id")

    @property
    def request_totals_path(self) -> str:
        return os.path.join(self.root, "request-totals.json")

    @property
    def gc_lock_path(self) -> str:
        return os.path.join(self.root, "gc.lock")
