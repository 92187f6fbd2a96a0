"""Joining a fleet: one Redis, one shared secret, and this host's address.

:class:`Fleet` is the configuration (and the Redis connection) of one
process; :meth:`Fleet.attach` gives the middleware the three seams for a
store: the fleet's index, its flights, and the ``/-/fleet/`` endpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..flights import Flights
from ..index import SQLiteIndex
from ..store import CAFS
from .keys import FleetKeys
from .link import RedisLink
from .peers import FleetEndpoint, PeerFiller
from .redis_flights import RedisFlights
from .redis_index import RedisIndex

__all__ = ["Fleet", "FleetMember", "SECRET_ENV", "ADVERTISE_ENV"]

#: Where ``CacheFetch(fleet="redis://…")`` finds the shared secret and this host's URL.
SECRET_ENV = "CACHEFETCH_FLEET_SECRET"
ADVERTISE_ENV = "CACHEFETCH_FLEET_ADVERTISE"


@dataclass
class FleetMember:
    """What a store needs to be part of the fleet (from :meth:`Fleet.attach`)."""

    index: RedisIndex
    flights: RedisFlights
    endpoint: FleetEndpoint
    filler: PeerFiller


def _check_advertise(url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"advertise must be a URL str, not {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise ValueError(f"advertise must be this host's base URL, like http://10.0.0.5:8080, got {url!r:.100}")
    return url.rstrip("/")


class Fleet:
    """A fleet of cachefetch hosts sharing one Redis.

    :param link: the Redis link.
    :param secret: the shared secret peers authenticate with (>= 16 bytes).
    :param advertise: this host's base URL as the other hosts reach it.
    :param prefix: the Redis key prefix (several fleets on one database).
    :param lease_ms: how long a flight's lease lasts unrenewed (a dead
        leader is replaced after this).
    :param peer_timeout: seconds to connect to a peer and for each of its reads.
    :raises ValueError, TypeError: on a bad option.
    """

    def __init__(self, link: RedisLink, *, secret: bytes | str, advertise: str, prefix: str = "cachefetch",
                 lease_ms: int = 5000, peer_timeout: float = 5.0) -> None:
        if not isinstance(link, RedisLink):
            raise TypeError(f"link must be a RedisLink, not {type(link).__name__}")
        if isinstance(secret, str):
            secret = secret.encode()
        from .auth import sign

        sign(secret, "GET", "/")  # raises ValueError for a short secret
        if isinstance(lease_ms, bool) or not isinstance(lease_ms, int) or not 100 <= lease_ms <= 600_000:
            raise ValueError(f"lease_ms must be an int of 100..600000 milliseconds, got {lease_ms!r}")
        if isinstance(peer_timeout, bool) or not isinstance(peer_timeout, (int, float)) or not peer_timeout > 0:
            raise ValueError(f"peer_timeout must be seconds > 0, got {peer_timeout!r}")
        self.link = link
        self.secret = secret
        self.advertise = _check_advertise(advertise)
        self.keys = FleetKeys(prefix)
        self.lease_ms = lease_ms
        self.peer_timeout = float(peer_timeout)

    @classmethod
    def from_url(cls, url: str, *, secret: bytes | str | None = None, advertise: str | None = None,
                 **options) -> "Fleet":
        """The fleet on Redis at ``url`` (``redis://[:password@]host:port/db``, ``rediss://``).

        ``secret`` and ``advertise`` default to the environment variables
        :data:`SECRET_ENV` and :data:`ADVERTISE_ENV`.

        :raises ValueError: on a bad URL, or a missing secret or address.
        """
        secret = secret if secret is not None else os.environ.get(SECRET_ENV)
        advertise = advertise if advertise is not None else os.environ.get(ADVERTISE_ENV)
        if not secret:
            raise ValueError(f"a fleet needs a shared secret (secret= or ${SECRET_ENV})")
        if not advertise:
            raise ValueError(f"a fleet needs this host's URL (advertise= or ${ADVERTISE_ENV})")
        return cls(RedisLink.from_url(url), secret=secret, advertise=advertise, **options)

    def attach(self, store: CAFS, local: SQLiteIndex | None = None) -> FleetMember:
        """The seams that make ``store`` (with its ``local`` index) a member of this fleet."""
        if not isinstance(store, CAFS):
            raise TypeError(f"store must be a CAFS, not {type(store).__name__}")
        local = local if local is not None else SQLiteIndex(store.layout.index_path)
        filler = PeerFiller(store, self.link, self.keys, self.advertise, self.secret, self.peer_timeout)
        store.on_delete.append(filler.withdraw)  # gc and eviction withdraw this host at once
        index = RedisIndex(local, store, self.link, self.keys, filler)
        flights = RedisFlights(Flights(store.layout), self.link, self.keys, self.advertise, self.secret, store,
                               filler, self.lease_ms, self.peer_timeout)
        return FleetMember(index, flights, FleetEndpoint(store, self.secret, flights.flight_body), filler)

    def close(self) -> None:
        """Close the Redis connections."""
        self.link.close()


def as_fleet(fleet: "Fleet | str") -> Fleet:
    """``fleet`` itself, or the fleet of a Redis URL. :raises TypeError, ValueError."""
    if isinstance(fleet, Fleet):
        return fleet
    if isinstance(fleet, str):
        return Fleet.from_url(fleet)
    raise TypeError(f"fleet must be a Fleet or a redis:// URL, not {type(fleet).__name__}")
