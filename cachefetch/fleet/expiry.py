"""How long the fleet's Redis keys live.

An entry's hash (and its blob's holders set) lives until
:data:`~cachefetch.maintenance.STALE_WINDOW` after the freshness of the
longest-lived entry written to it ends: the horizon after which the local
index purges an entry too, since nothing serves it any more. A write never
shortens a key's life, and a ``FOREVER`` entry keeps its key until it is
deleted. Without this, every URL a client ever invented would hold Redis
memory for good.

Keys written before this module existed have no expiry and keep none: the
script cannot tell them from a key kept for a ``FOREVER`` entry.
"""
from __future__ import annotations

import math
import time

from ..maintenance import STALE_WINDOW

__all__ = ["write_and_extend", "horizon_ms"]

# One script, so that "did the key exist before this write" and the write are
# one atomic step: a key created now gets the horizon; a key with an expiry is
# extended to it if that is later; a key without one (FOREVER) is left so.
# TIME, not PEXPIREAT's GT flag: GT needs Redis 7.
_WRITE_AND_EXTEND = """
local when = ARGV[#ARGV]
local before = redis.call('PTTL', KEYS[1])
if ARGV[1] == 'sadd' then
  redis.call('SADD', KEYS[1], ARGV[2])
else
  redis.call(ARGV[1], KEYS[1], ARGV[2], ARGV[3])
end
if when == 'inf' then
  redis.call('PERSIST', KEYS[1])
elseif before == -2 then
  redis.call('PEXPIREAT', KEYS[1], when)
elseif before >= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now + before < tonumber(when) then
    redis.call('PEXPIREAT', KEYS[1], when)
  end
end
return 1
"""

_OPS = frozenset({"hset", "hsetnx", "sadd"})


def horizon_ms(expires_at: float | None) -> str:
    """The script's ``when`` for an entry fresh until ``expires_at`` (Unix
    seconds; ``None`` or infinity: fresh until evicted): milliseconds as a
    decimal string, or ``"inf"``.

    :raises ValueError: if ``expires_at`` is NaN.
    """
    if expires_at is None or math.isinf(expires_at):
        return "inf"
    if math.isnan(expires_at):
        raise ValueError("expires_at is NaN")
    return str(int((expires_at + STALE_WINDOW) * 1000))


def write_and_extend(pipe, key: str, op: str, *args: str | bytes, when: str) -> None:
    """Queue on ``pipe`` (a redis-py pipeline or client) ``op`` (``hset``,
    ``hsetnx`` or ``sadd``) of ``args`` on ``key``, and the key's life
    extended to ``when`` (from :func:`horizon_ms`, or :func:`from_now_ms`).

    :raises ValueError: on another op, or the wrong number of arguments.
    """
    if op not in _OPS or len(args) != (1 if op == "sadd" else 2):
        raise ValueError(f"cannot write {op!r} with {len(args)} arguments")
    pipe.eval(_WRITE_AND_EXTEND, 1, key, op, *args, when)


def from_now_ms() -> str:
    """The ``when`` of a key written with no entry's freshness at hand (a
    holder announced after a peer fill): :data:`STALE_WINDOW` from now."""
    return horizon_ms(time.time())
