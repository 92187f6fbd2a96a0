"""Deterministic request traces for eviction benchmarks: ``(object id, size)`` per request.

- :func:`zipf`: a fixed catalogue of objects, each request picks one with
  probability ∝ 1/rank^alpha (alpha 0.8: a flat web-like tail; 1.0: a sharper core).
- :func:`registry`: a package registry's file traffic: a hot core of popular
  packages, a long tail requested once or twice (one-hit wonders: a CI job
  fetching an odd pin), and releases that make the previous version cold
  (most requests go to the newest version of a package).

Object sizes are drawn once per object (log-normal, a median of some tens of
KiB, clipped to [256 B, 8 MiB]), so a byte miss ratio differs from the object
miss ratio. The same arguments always give the same trace. Imports nothing
from cachefetch.
"""
from __future__ import annotations

import bisect
import itertools
import math
import random
from typing import Iterator

__all__ = ["zipf", "registry", "footprint"]

_MIN_SIZE, _MAX_SIZE = 256, 8 << 20


def _size(rng: random.Random, median: float = 32 << 10, sigma: float = 1.4) -> int:
    return int(min(_MAX_SIZE, max(_MIN_SIZE, rng.lognormvariate(math.log(median), sigma))))


def _zipf_sampler(rng: random.Random, n: int, alpha: float):
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** alpha for rank in range(n)))
    total = cumulative[-1]
    return lambda: min(bisect.bisect_left(cumulative, rng.random() * total), n - 1)


def zipf(alpha: float, requests: int = 400_000, objects: int = 100_000, seed: int = 1) -> list[tuple[int, int]]:
    """``requests`` requests over ``objects`` objects, Zipf-distributed with ``alpha``.

    :raises ValueError: on a non-positive count or a negative alpha.
    """
    if requests < 1 or objects < 1 or alpha < 0:
        raise ValueError("requests and objects must be >= 1 and alpha >= 0")
    rng = random.Random(seed)
    sizes = [_size(rng) for _ in range(objects)]
    # Popularity independent of size: shuffle which object has which rank.
    ranks = list(range(objects))
    rng.shuffle(ranks)
    pick = _zipf_sampler(rng, objects, alpha)
    return [(ranks[r], sizes[ranks[r]]) for r in (pick() for _ in range(requests))]


def registry(requests: int = 400_000, packages: int = 50_000, seed: int = 2,
             release_every: int = 2_000, one_hit_share: float = 0.25) -> list[tuple[int, int]]:
    """A package-registry-shaped trace.

    Each request asks for a file of a package (Zipf α 0.9 over ``packages``);
    85% of them for its newest version, the rest for one of the three before.
    Every ``release_every`` requests a batch of packages (weighted by
    popularity) publishes a new version: what was hot turns cold.
    ``one_hit_share`` of requests are for files never asked for again.

    :raises ValueError: on bad counts or a share outside [0, 1).
    """
    if requests < 1 or packages < 1 or release_every < 1 or not 0 <= one_hit_share < 1:
        raise ValueError("bad registry trace parameters")
    rng = random.Random(seed)
    pick = _zipf_sampler(rng, packages, 0.9)
    base = [_size(rng) for _ in range(packages)]
    latest = [0] * packages
    ids: dict[tuple[int, int], int] = {}
    sizes: dict[int, int] = {}
    next_one_hit = -1  # one-hit wonders get ids of their own, below zero

    def file_id(package: int, version: int) -> tuple[int, int]:
        key = (package, version)
        oid = ids.get(key)
        if oid is None:
            oid = ids[key] = len(ids)
            # A release is about the size of the one before it.
            sizes[oid] = int(min(_MAX_SIZE, max(_MIN_SIZE, base[package] * rng.uniform(0.8, 1.25))))
        return oid, sizes[oid]

    out: list[tuple[int, int]] = []
    for i in range(requests):
        if i and i % release_every == 0:
            for _ in range(max(1, packages // 500)):
                latest[pick()] += 1
        if rng.random() < one_hit_share:
            out.append((next_one_hit, _size(rng)))
            next_one_hit -= 1
            continue
        package = pick()
        version = latest[package]
        if rng.random() >= 0.85 and version > 0:
            version = max(0, version - rng.randint(1, 3))
        out.append(file_id(package, version))
    return out


def footprint(trace: list[tuple[int, int]]) -> tuple[int, int]:
    """``(distinct objects, their bytes)`` of a trace."""
    seen: dict[int, int] = {}
    for oid, size in trace:
        seen.setdefault(oid, size)
    return len(seen), sum(seen.values())


def _stats(name: str, trace: list[tuple[int, int]]) -> Iterator[str]:
    objects, size = footprint(trace)
    once = sum(1 for c in _counts(trace).values() if c == 1)
    yield f"{name}: {len(trace)} requests, {objects} objects ({size / 2**30:.2f} GiB), {once} requested once"


def _counts(trace: list[tuple[int, int]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for oid, _ in trace:
        counts[oid] = counts.get(oid, 0) + 1
    return counts


if __name__ == "__main__":
    for label, t in (("zipf 0.8", zipf(0.8)), ("zipf 1.0", zipf(1.0)), ("registry", registry())):
        print(*_stats(label, t))
