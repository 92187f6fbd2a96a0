"""Prometheus counters of a fleet member (summed over workers like the proxy's own)."""
from __future__ import annotations

from prometheus_client import Counter

__all__ = ["FLEET_HITS", "PEER_FILLS", "PEER_FILL_BYTES", "PEER_VERIFY_FAILURES", "REMOTE_FOLLOWERS",
           "LEASE_TAKEOVERS", "REDIS_ERRORS"]

FLEET_HITS = Counter("cachefetch_fleet_hits", "Entries found through Redis that this host did not store itself")
PEER_FILLS = Counter("cachefetch_fleet_peer_fills", "Blobs filled from a peer, by result", ["result"])
PEER_FILL_BYTES = Counter("cachefetch_fleet_peer_fill_bytes", "Verified bytes filled from peers")
PEER_VERIFY_FAILURES = Counter("cachefetch_fleet_peer_verification_failures",
                               "Blobs from a peer whose size or BLAKE3 hash did not match")
REMOTE_FOLLOWERS = Counter("cachefetch_fleet_remote_followers",
                           "Requests that followed a flight led by another host")
LEASE_TAKEOVERS = Counter("cachefetch_fleet_lease_takeovers",
                          "Flights led here after another host's lease expired unfinished")
REDIS_ERRORS = Counter("cachefetch_fleet_redis_errors", "Redis operations that failed (then run locally)")
