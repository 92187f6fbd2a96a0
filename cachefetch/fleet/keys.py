"""The one place that names the fleet's Redis keys (all under one prefix)."""
from __future__ import annotations

from dataclasses import dataclass

from ..hashing import Hash, hash_bytes

__all__ = ["FleetKeys"]


def _digest(text: str) -> str:
    # Request keys are URLs of any length: Redis keys of a fixed size instead.
    return hash_bytes(text.encode("utf-8", "surrogatepass")).hex[:40]


@dataclass(frozen=True)
class FleetKeys:
    """Redis key names. ``prefix`` separates fleets sharing one Redis database."""

    prefix: str = "cachefetch"

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not self.prefix or any(c.isspace() for c in self.prefix):
            raise ValueError(f"a fleet key prefix is a non-empty word, got {self.prefix!r}")

    def entries(self, key: str) -> str:
        """HASH variant -> encoded entry, for request key ``key``."""
        return f"{self.prefix}:e:{_digest(key)}"

    def holders(self, h: Hash) -> str:
        """SET of the advertised URLs of the hosts that hold blob ``h``."""
        return f"{self.prefix}:h:{h.hex}"

    def lease(self, flight: str) -> str:
        """STRING ``token``: who leads flight ``flight`` now (with a TTL)."""
        return f"{self.prefix}:l:{_digest(flight)}"

    def fence(self, flight: str) -> str:
        """INTEGER: the fencing counter of flight ``flight`` (one more per lead)."""
        return f"{self.prefix}:n:{_digest(flight)}"

    def journal(self, fid: str) -> str:
        """STREAM of the journal records of flight id ``fid``."""
        return f"{self.prefix}:j:{fid}"

    def flight_of(self, fid: str) -> str:
        """STRING: the flight key that flight id ``fid`` fetches (for the body endpoint)."""
        return f"{self.prefix}:f:{fid}"

    def members(self) -> str:
        """SET of the advertised URLs of the hosts whose entries are published."""
        return f"{self.prefix}:members"

    def running(self, flight: str) -> str:
        """STRING fid: set by a leader when it takes the lease, removed when it
        releases it; found set by the next leader, its predecessor died."""
        return f"{self.prefix}:r:{_digest(flight)}"
