"""An :class:`~cachefetch.index.Index` shared by a fleet through Redis.

Each entry is published to Redis (a hash per request key, one field per
variant) and kept in this host's own :class:`~cachefetch.index.SQLiteIndex`,
which keeps the host's uses and sizes for its own eviction. A ``get`` reads
Redis, so an invalidation on any host is seen by the next request on every
host; an entry this host lacks the blob of is filled from a peer first
(:class:`~cachefetch.fleet.peers.PeerFiller`), and is not returned if that
fails (the request then fetches it itself).

Redis forgets an entry a week after its freshness ends, as the local index
does (:mod:`~cachefetch.fleet.expiry`).

Redis keeps a set of the hosts that have published their entries: a host
that is not in it (it is new, or Redis restarted empty) republishes its
local index first. While Redis is unreachable every operation is local, and
what changed meanwhile is published when it returns.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Iterator

from ..hashing import Hash
from ..index import Entry, SQLiteIndex
from ..store import CAFS
from . import metrics
from .expiry import horizon_ms, write_and_extend
from .keys import FleetKeys
from .link import FleetUnavailable, RedisLink
from .peers import PeerFiller

__all__ = ["RedisIndex", "encode_entry", "decode_entry", "ENTRY_VERSION"]

log = logging.getLogger("cachefetch.fleet")

#: The version written in every published entry; others are ignored.
ENTRY_VERSION = 1
_REPUBLISH_BATCH = 500


def encode_entry(entry: Entry) -> bytes:
    """The JSON Redis keeps for ``entry``."""
    return json.dumps({"v": ENTRY_VERSION, "key": entry.key, "variant": entry.variant, "hash": entry.hash.hex,
                       "size": entry.size, "status": entry.status, "headers": entry.headers,
                       "stored_at": entry.stored_at, "expires_at": entry.expires_at, "vary": entry.vary,
                       "initial_age": entry.initial_age}, separators=(",", ":")).encode()


def decode_entry(data: bytes) -> Entry | None:
    """The entry of :func:`encode_entry`'s bytes; ``None`` for anything else."""
    try:
        d = json.loads(data)
        if not isinstance(d, dict) or d.get("v") != ENTRY_VERSION:
            return None
        return Entry(d["key"], d["variant"], Hash.from_hex(d["hash"]), d["size"], d["status"],
                     tuple((str(k), str(v)) for k, v in d["headers"]), d["stored_at"], d["expires_at"],
                     tuple(str(v) for v in d["vary"]), d["initial_age"])
    except (ValueError, TypeError, KeyError):
        return None


def _same(a: Entry, b: Entry) -> bool:
    # Not ==: the local index rounds some fields (initial_age is an INTEGER column).
    return (a.hash, a.size, a.status, a.stored_at, a.expires_at) == (b.hash, b.size, b.status, b.stored_at,
                                                                    b.expires_at)


class RedisIndex:
    """The fleet's index: Redis for what exists, the local index for what this host holds.

    :param local: this host's index (also used alone while Redis is away).
    :param store: this host's store.
    :param link: the Redis link.
    :param keys: the fleet's key names.
    :param filler: fills blobs from peers.
    Thread-safe; one per process.
    """

    def __init__(self, local: SQLiteIndex, store: CAFS, link: RedisLink, keys: FleetKeys,
                 filler: PeerFiller) -> None:
        if not isinstance(local, SQLiteIndex):
            raise TypeError(f"local must be a SQLiteIndex, not {type(local).__name__}")
        self.local = local
        self.store = store
        self.link = link
        self.keys = keys
        self.filler = filler
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], bool] = {}  # (key, variant) -> put (else delete); guarded by _lock
        self._republishing = threading.Lock()
        link.on_rejoin(self._publish_pending)

    # -- reads ------------------------------------------------------------

    def get(self, key: str) -> list[Entry]:
        """The variants of ``key`` that exist fleet-wide and whose blob is (now) local.

        An entry new to this host is filled from a peer and recorded locally
        on the way; local entries the fleet no longer has are dropped. With
        Redis away, the local entries.
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        try:
            raw = self._read(key)
        except FleetUnavailable:
            return [e for e in self.local.get(key) if self.store.exists(e.hash)]
        local = {e.variant: e for e in self.local.get(key)}
        found: list[Entry] = []
        for entry in raw:
            mine = local.pop(entry.variant, None)
            if mine is not None and _same(mine, entry) and self.store.exists(entry.hash):
                found.append(mine)
            elif self.filler.fill(entry.hash, entry.size):
                self.local.put(entry)
                if mine is None:
                    metrics.FLEET_HITS.inc()
                found.append(entry)
            elif mine is not None:
                self.local.delete(key, entry.variant)  # replaced elsewhere, and we cannot get the new one
        with self._lock:
            kept = {v for (k, v), put in self._pending.items() if k == key and put}
        for variant in local:
            if variant not in kept:
                self.local.delete(key, variant)  # invalidated on another host
        return found

    def _read(self, key: str) -> list[Entry]:
        def read(r) -> tuple[dict, bool]:
            pipe = r.pipeline(transaction=False)
            pipe.hgetall(self.keys.entries(key))
            pipe.sismember(self.keys.members(), self.filler.advertise)
            return tuple(pipe.execute())

        fields, member = self.link.run(read)
        if not member:
            self._republish()
            fields, _ = self.link.run(read)
        entries = [decode_entry(data) for data in fields.values()]
        return [e for e in entries if e is not None and e.key == key]

    # -- writes -----------------------------------------------------------

    def put(self, entry: Entry) -> None:
        """Publish ``entry`` fleet-wide (this host holds its blob), then record it locally."""
        if not isinstance(entry, Entry):
            raise TypeError(f"put takes an Entry, not {type(entry).__name__}")
        try:
            self.link.run(lambda r: self._publish(r.pipeline(transaction=True), entry).execute())
        except FleetUnavailable:
            with self._lock:
                self._pending[(entry.key, entry.variant)] = True
        self.local.put(entry)

    def _publish(self, pipe, entry: Entry, only_new: bool = False):
        # Both keys live until nothing may serve the entry any more (expiry.py).
        when = horizon_ms(entry.expires_at)
        write_and_extend(pipe, self.keys.entries(entry.key), "hsetnx" if only_new else "hset", entry.variant,
                         encode_entry(entry), when=when)
        write_and_extend(pipe, self.keys.holders(entry.hash), "sadd", self.filler.advertise, when=when)
        return pipe

    def delete(self, key: str, variant: str | None = None) -> int:
        """Remove one variant (or all) fleet-wide and here; returns how many this host had, or Redis had."""
        if not isinstance(key, str) or not (variant is None or isinstance(variant, str)):
            raise TypeError("delete takes a str key and a str or None variant")
        name = self.keys.entries(key)
        try:
            if variant is None:
                gone = self.link.run(lambda r: r.pipeline().hlen(name).delete(name).execute()[0])
            else:
                gone = self.link.run(lambda r: r.hdel(name, variant))
        except FleetUnavailable:
            gone = 0
            with self._lock:
                variants = [variant] if variant is not None else [e.variant for e in self.local.get(key)]
                for v in variants:
                    self._pending[(key, v)] = False
        return max(gone, self.local.delete(key, variant))

    def touch_many(self, uses: dict[tuple[str, str], float]) -> None:
        """Record uses locally (each host evicts its own blobs by its own uses)."""
        self.local.touch_many(uses)

    def totals(self) -> tuple[int, int]:
        """This host's ``(entries, bytes)``."""
        return self.local.totals()

    def referenced(self, h: Hash) -> bool:
        """Whether a local entry points at ``h``."""
        return self.local.referenced(h)

    def __iter__(self) -> Iterator[Entry]:
        """This host's entries."""
        return iter(self.local)

    def close(self) -> None:
        """Close the local index and the peer client."""
        self.local.close()
        self.filler.close()

    # -- rejoining --------------------------------------------------------

    def _republish(self) -> None:
        """Publish every local entry Redis lacks (this host is new to it, or
        Redis lost its data), then join the set of published hosts."""
        with self._republishing:
            if self.link.run(lambda r: r.sismember(self.keys.members(), self.filler.advertise)):
                return  # another thread did it
            count = 0
            batch: list[Entry] = []
            for entry in self.local:
                batch.append(entry)
                if len(batch) >= _REPUBLISH_BATCH:
                    count += self._publish_batch(batch)
                    batch = []
            count += self._publish_batch(batch)
            self.link.run(lambda r: r.sadd(self.keys.members(), self.filler.advertise))
            log.warning("published this host's %d entries to the fleet", count)

    def _publish_batch(self, batch: list[Entry]) -> int:
        if not batch:
            return 0

        def publish(r) -> None:
            pipe = r.pipeline(transaction=False)
            for entry in batch:
                self._publish(pipe, entry, only_new=True)
            pipe.execute()

        self.link.run(publish)
        return len(batch)

    def _publish_pending(self) -> None:
        """Publish the puts and deletes made while Redis was away (run on rejoin)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        try:
            for (key, variant), put in pending.items():
                if put:
                    for entry in self.local.get(key):
                        if entry.variant == variant:
                            self.link.run(lambda r, e=entry: self._publish(r.pipeline(), e).execute())
                else:
                    self.link.run(lambda r, k=key, v=variant: r.hdel(self.keys.entries(k), v))
        except FleetUnavailable:
            with self._lock:  # down again: keep what is left for the next rejoin
                for item, put in pending.items():
                    self._pending.setdefault(item, put)
            raise
