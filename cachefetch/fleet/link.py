"""The fleet's connection to Redis, and what happens while Redis is away.

Every Redis operation of the fleet goes through :meth:`RedisLink.run`. A
failure (Redis unreachable, killed, timing out) marks the link down: callers
get :class:`FleetUnavailable` at once and fall back to what their host can do
alone, a warning is logged at most once a minute, and after ``retry_after``
seconds the next call tries Redis again (that is how a host rejoins). Any
thread.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

import redis

from ..logutil import warn_limited
from . import metrics

__all__ = ["RedisLink", "FleetUnavailable"]

log = logging.getLogger("cachefetch.fleet")
_T = TypeVar("_T")


class FleetUnavailable(Exception):
    """Redis cannot be used now; do what this host can do alone."""


class RedisLink:
    """A redis-py client with a down/up state.

    :param client: a ``redis.Redis`` (from :meth:`from_url`).
    :param retry_after: seconds a failed link waits before trying Redis again.
    """

    def __init__(self, client: redis.Redis, retry_after: float = 1.0) -> None:
        if not isinstance(client, redis.Redis):
            raise TypeError(f"client must be a redis.Redis, not {type(client).__name__}")
        if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)) or not retry_after >= 0:
            raise ValueError(f"retry_after must be seconds >= 0, got {retry_after!r}")
        self.client = client
        self.retry_after = float(retry_after)
        self._lock = threading.Lock()
        self._down_since: float | None = None  # guarded by _lock
        self._on_rejoin: list[Callable[[], None]] = []

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 2.0, retry_after: float = 1.0) -> "RedisLink":
        """A link to ``redis://``/``rediss://``/``unix://`` ``url`` (passwords in the URL).

        :raises ValueError: on a URL redis-py does not accept.
        """
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"a fleet URL is redis://, rediss:// or unix://, got {url!r:.100}")
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                      health_check_interval=30)
        return cls(client, retry_after)

    @property
    def up(self) -> bool:
        """Whether the last use of Redis worked (or it is time to try again)."""
        with self._lock:
            return self._down_since is None

    def on_rejoin(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (in the thread that noticed) when Redis answers again after a failure."""
        self._on_rejoin.append(callback)

    def run(self, operation: Callable[[redis.Redis], _T]) -> _T:
        """``operation(client)``, or :class:`FleetUnavailable` if Redis fails or is known down.

        :raises FleetUnavailable: Redis failed now or within ``retry_after``.
        """
        with self._lock:
            down = self._down_since
            if down is not None and time.monotonic() - down < self.retry_after:
                raise FleetUnavailable("redis is down")
        try:
            result = operation(self.client)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            metrics.REDIS_ERRORS.inc()
            with self._lock:
                self._down_since = time.monotonic()
            warn_limited(log, "fleet-redis", "redis is unreachable (%s): serving from this host alone", exc)
            raise FleetUnavailable(str(exc)) from exc
        if down is not None:
            self._rejoined()
        return result

    def _rejoined(self) -> None:
        with self._lock:
            if self._down_since is None:
                return  # another thread noticed first
            self._down_since = None
        log.warning("redis answers again: rejoined the fleet")
        for callback in self._on_rejoin:
            try:
                callback()
            except FleetUnavailable:
                return
            except Exception:  # a rejoin task must not fail the request that noticed
                log.exception("a fleet rejoin task failed")

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()
