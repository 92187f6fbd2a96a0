"""Upkeep benchmark: what keeping a big store in shape costs.

Builds a store synthetically with 1,000,000 entries and 1,000,000 tiny blobs
(rows written in big transactions, blobs as tiny files), then measures:

1. a size check with nothing to evict (``SizeLimiter.check``), goal < 10 ms;
2. evicting 1% of the store's bytes (S3-FIFO, then LRU; the index's pages
   count, and a row deleted frees its page's bytes only when the page
   empties, so it takes more than 1% of the entries), goal < 2 s, the
   unlinks of the victims' files included;
3. ``cachefetch stats`` wall time (a new process), goal < 200 ms;
4. an in-process CacheFetch hit on that store vs a 1,000-entry store, goal ±10%;
5. ``verify`` throughput on a store of large blobs vs this machine's
   single-thread BLAKE3 speed in memory (measured in the same run), goal ≥ 0.8×
   (``--verify-gib 0`` skips it).

    python benchmarks/bench_upkeep.py [--entries N] [--verify-gib G] [--dir DIR]

Everything it creates lives in one temporary directory (under ``--dir``,
default /work or the system's temp dir), removed at the end. Timings on a
shared 2-core machine are noisy: medians are shown.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import blake3  # noqa: E402
from report import (Bar, cachefetch_revision, interrupt_on, log, machine, markdown_table, met, run_main,  # noqa: E402
                    write_results)

from cachefetch.hashing import hash_bytes  # noqa: E402
from cachefetch.index import SQLiteIndex  # noqa: E402
from cachefetch.maintenance import SizeLimiter, collect_garbage, verify_store  # noqa: E402
from cachefetch.store import CAFS  # noqa: E402

RESULTS = os.path.join(HERE, "results")
_HEADERS = json.dumps([["Content-Type", "application/octet-stream"], ["ETag", '"x"']])


def build(root: str, entries: int) -> tuple[CAFS, SQLiteIndex, float]:
    """A store of ``entries`` entries, each with a tiny blob of its own; returns it and the build time."""
    t0 = time.monotonic()
    store = CAFS(root, fsync=False)
    index = SQLiteIndex(os.path.join(store.root, "index.sqlite3"))
    db = index._connect()
    db.execute("PRAGMA synchronous=OFF")  # a throwaway store: no fsync per transaction
    now = time.time()
    made_dirs: set[str] = set()
    batch = 50_000
    for start in range(0, entries, batch):
        rows = []
        for i in range(start, min(entries, start + batch)):
            body = b"%d" % i
            h = hash_bytes(body)
            shard = os.path.join(store.blobs_dir, h.shard)
            if shard not in made_dirs:
                os.makedirs(shard, exist_ok=True)
                made_dirs.add(shard)
            fd = os.open(os.path.join(shard, h.hex), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            os.write(fd, body)
            os.close(fd)
            rows.append((f"http://bench.local/obj/{i}", "", h.hex, len(body), 200, _HEADERS, now, None, "[]", 0,
                         now - 7200 + i * 1e-3))
        with index.transaction():
            db.executemany("INSERT INTO entries (key, variant, hash, size, status, headers, stored_at, expires_at, "
                           "vary, initial_age, last_used) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        log(f"built {min(entries, start + batch):,} / {entries:,} entries")
    db.execute("PRAGMA synchronous=NORMAL")
    return store, index, time.monotonic() - t0


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def hit_latency(store_dir: str, rounds: int = 5, hits: int = 2000) -> list[float]:
    """Seconds per in-process CacheFetch hit on ``store_dir`` (one miss first stores the page)."""
    from werkzeug.test import EnvironBuilder

    from cachefetch import CacheFetch

    body = b"x" * 4096

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "max-age=3600"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    cached = CacheFetch(app, store=store_dir, fsync=False)
    try:
        def one() -> None:
            environ = EnvironBuilder(path="/page", base_url="http://bench.local/").get_environ()
            result = cached(environ, lambda status, headers, exc_info=None: None)
            try:
                for _ in result:
                    pass
            finally:
                if hasattr(result, "close"):
                    result.close()

        one()
        deadline = time.monotonic() + 10
        while not cached.index.get("http://bench.local/page") and time.monotonic() < deadline:
            time.sleep(0.05)  # the commit lands on the committer thread
        return [t / hits for t in timed(lambda: [one() for _ in range(hits)], rounds)]
    finally:
        cached.close()


def blake3_speed(buf: bytes, repeat: int = 3) -> float:
    """Bytes per second of single-thread BLAKE3 over ``buf`` in memory (best of ``repeat``)."""
    return len(buf) / min(timed(lambda: blake3.blake3(buf).digest(), repeat))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--verify-gib", type=float, default=10.0,
                        help="size of the verify store (GiB); 0 skips the verify measurement")
    parser.add_argument("--dir", default="/work" if os.path.isdir("/work") else None)
    args = parser.parse_args()
    interrupt_on(signal.SIGINT, signal.SIGTERM)  # the finally below removes the store
    top = tempfile.mkdtemp(prefix="cachefetch-upkeep-", dir=args.dir)
    rows, bars, notes = [], [], []
    try:
        store, index, build_s = build(os.path.join(top, "big"), args.entries)
        log(f"built in {build_s:.0f} s; admitting the entries to the eviction queues")
        t0 = time.monotonic()
        collect_garbage(store, index, 1 << 50)  # the first pass with a size admits every new entry (once)
        admit_s = time.monotonic() - t0
        u = index.usage()
        notes.append(f"store: {u.entries:,} entries, {u.blobs:,} blobs, index {u.index_bytes / 2**20:.0f} MiB "
                     f"+ -wal {u.wal_bytes / 2**20:.1f} MiB; built in {build_s:.0f} s, admitted to the "
                     f"S3-FIFO queues in {admit_s:.0f} s (once)")

        # 1. nothing to evict
        limiter = SizeLimiter(store, index, max_size=1 << 50)
        limiter._last_sweep = time.monotonic()  # its daily walk of the store is not the size check
        check = statistics.median(timed(limiter.check, 21))
        rows.append(["1", "size check, nothing to evict (`SizeLimiter.check`)", f"{check * 1e3:.2f} ms",
                     "< 10 ms", met(check < 0.010)])
        bars.append(Bar("size check / 10 ms", check / 0.010, 1.0, higher_is_better=False))

        # 2. evict 1%
        for policy in ("s3fifo", "lru"):
            u = index.usage()
            per_entry = (u.index_bytes + u.blob_bytes) / u.entries
            target = u.total - int(per_entry * u.entries * 0.01)
            # The load the pass meets (after it, the average counts the pass's own unlink threads).
            load = os.getloadavg()[0]
            t0, cpu0 = time.perf_counter(), time.process_time()
            report = collect_garbage(store, index, target, policy=policy, protect=0)
            took, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            rows.append([f"2 ({policy})", f"evict 1% of the store's bytes ({policy}): "
                         f"{report.evicted_entries:,} entries ({report.evicted_entries / u.entries:.1%} of them), "
                         f"{report.removed_blobs:,} blobs unlinked (CPU {cpu:.2f} s, all threads; load "
                         f"average {load:.1f} before it)", f"{took:.2f} s", "< 2 s", met(took < 2.0)])
            bars.append(Bar(f"evict 1% ({policy}) / 2 s", took / 2.0, 1.0, higher_is_better=False))

        # 3. stats
        env = dict(os.environ, PYTHONPATH=REPO)
        cmd = [sys.executable, "-m", "cachefetch.cli", "stats", "--store", store.root]
        stats = statistics.median(timed(lambda: subprocess.run(cmd, env=env, check=True, capture_output=True), 7))
        bare = statistics.median(timed(lambda: subprocess.run([sys.executable, "-c", "import cachefetch.cli"],
                                                              env=env, check=True, capture_output=True), 7))
        rows.append(["3", f"`cachefetch stats` wall time (a new process; importing the CLI alone: "
                     f"{bare * 1e3:.0f} ms)", f"{stats * 1e3:.0f} ms", "< 200 ms", met(stats < 0.2)])
        bars.append(Bar("stats / 200 ms", stats / 0.2, 1.0, higher_is_better=False))
        index.close()

        # 4. hit latency, 1M-entry store vs 1,000-entry store, interleaved
        small_store, small_index, _ = build(os.path.join(top, "small"), 1000)
        small_index.close()
        big_t, small_t = [], []
        for _ in range(3):
            big_t += hit_latency(store.root, rounds=3)
            small_t += hit_latency(small_store.root, rounds=3)
        ratio = statistics.median(big_t) / statistics.median(small_t)
        rows.append(["4", f"CacheFetch 4 KiB hit, in process: {args.entries:,}-entry store vs 1,000-entry store",
                     f"{statistics.median(big_t) * 1e6:.1f} µs vs {statistics.median(small_t) * 1e6:.1f} µs "
                     f"= {ratio:.3f}×", "0.9–1.1×", met(0.9 <= ratio <= 1.1)])
        bars.append(Bar("hit latency, 1M / 1k entries", ratio, 1.1, higher_is_better=False))
        shutil.rmtree(os.path.join(top, "big"))
        shutil.rmtree(os.path.join(top, "small"))

        if args.verify_gib > 0:
            _verify_throughput(top, args.verify_gib, rows, bars, notes)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    header = ["# cachefetch upkeep benchmark", "", f"- {machine(now)}; blake3 {_version('blake3')}",
              f"- cachefetch at {cachefetch_revision()}", *[f"- {n}" for n in notes],
              "- a 2-core machine shared with other work: timings are noisy (medians shown)"]
    body = markdown_table(["#", "measurement", "result", "goal", "met"], rows)
    write_results(os.path.join(RESULTS, "upkeep.md"), os.path.join(RESULTS, "upkeep.png"),
                  "Upkeep of a 1,000,000-entry store", header, body, bars,
                  subtitle="ratio to the goal (≤ 1 is met), except verify (≥ 0.8)", echo=True)
    return 0


def _verify_throughput(top: str, verify_gib: float, rows: list, bars: list, notes: list) -> None:
    """5. ``verify`` of a store of 64 MiB blobs against single-thread BLAKE3 in memory."""
    free = shutil.disk_usage(top).free
    gib = verify_gib if free > (verify_gib + 5) * 2**30 else max(1.0, free / 2**30 / 4)
    vstore = CAFS(os.path.join(top, "verify"), fsync=False)
    vindex = SQLiteIndex(os.path.join(vstore.root, "index.sqlite3"))
    chunk = os.urandom(64 << 20)
    nblobs = int(gib * 16)
    for i in range(nblobs):
        vstore.put(i.to_bytes(8, "big") + chunk[8:])
    log(f"verify store: {nblobs} blobs of 64 MiB ({gib:g} GiB)")
    base = blake3_speed(chunk)
    t0 = time.perf_counter()
    vreport = verify_store(vstore, vindex)
    took = time.perf_counter() - t0
    after = blake3_speed(chunk)
    speed = vreport.bytes_checked / took
    ratio = speed / max(base, after)
    rows.append(["5", f"`verify` of {gib:g} GiB ({nblobs} blobs) vs single-thread BLAKE3 in memory "
                 f"({max(base, after) / 1e9:.2f} GB/s, best of before/after)",
                 f"{speed / 1e9:.2f} GB/s = {ratio:.2f}×", "≥ 0.8×", met(ratio >= 0.8)])
    bars.append(Bar("verify / single-thread BLAKE3", ratio, 0.8))
    vindex.close()
    notes.append("verify reads each blob with 1 MiB `readinto`s on one thread (the store's pages are in "
                 "the page cache: the store was just written)")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    run_main(main)
