#!/usr/bin/env python3
"""Benchmark the cachefetch primitives; print a Markdown table of ratios, write it and a chart.

Every number in the table is measured in the same run:

1. ``Group.do`` on an uncontended key vs a bare function call under a
   ``threading.Lock`` (ns per call).
2. ``stream_through`` of 1 GiB from memory (1 MiB chunks of one ``bytes``
   object; temp file in a tmpfs if there is room, else the temp dir;
   ``on_complete`` deletes the file) vs plain iteration of the same chunks
   writing nothing, and vs iteration + writing them to a file; CPU time
   (``time.process_time``), and BLAKE3 single-threaded GB/s on its own.
3. ``CAFS.commit`` of 10,000 small files per second, fsync on and off.

The table is also written to ``benchmarks/results/primitives.md`` (with the
date, Python, CPUs and commit), and a chart of the ratios that mean something
(2b, 3a, BLAKE3 ÷ its 4 GB/s goal) to ``benchmarks/results/primitives.png``
(matplotlib, the ``bench`` extra; skipped with a note when it is missing).

Usage: ``python benchmarks/bench_primitives.py [--quick]``. It contacts no
host and removes every temp file it creates.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
RESULTS_MD = os.path.join(HERE, "results", "primitives.md")
RESULTS_PNG = os.path.join(HERE, "results", "primitives.png")
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, HERE)

import blake3  # noqa: E402

import report  # noqa: E402
from report import Bar, cachefetch_revision, finite, markdown_table  # noqa: E402

from cachefetch.singleflight import Group  # noqa: E402
from cachefetch.store import CAFS  # noqa: E402
from cachefetch.stream import StreamThroughOptions, stream_through  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
STREAM_GOAL = 1.5  # stream_through CPU ÷ iterate + write
BLAKE3_GOAL = 4.0  # GB/s, single thread


def best(runs: int, fn):
    """The smallest of ``runs`` results of ``fn()`` (each a number)."""
    return min(fn() for _ in range(runs))


# -- 1. Group.do ----------------------------------------------------------------

def bench_group(calls: int, bare_calls: int) -> tuple[float, float]:
    """ns per call: (Group.do on one uncontended key, bare call under a Lock)."""
    def fn():
        return 1

    group = Group()
    try:
        for _ in range(min(1000, calls)):  # warm the executor's thread
            group.do("key", fn)

        def run_do():
            do = group.do
            t = time.perf_counter_ns()
            for _ in range(calls):
                do("key", fn)
            return (time.perf_counter_ns() - t) / calls

        do_ns = best(3, run_do)
    finally:
        group.shutdown()

    lock = threading.Lock()

    def run_bare():
        t = time.perf_counter_ns()
        for _ in range(bare_calls):
            with lock:
                fn()
        return (time.perf_counter_ns() - t) / bare_calls

    return do_ns, best(3, run_bare)


# -- 2. stream_through ----------------------------------------------------------

def pick_temp_parent(need: int) -> str:
    shm = "/dev/shm"
    try:
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need + 64 * MiB:
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def bench_stream(total: int, work_dir: str, runs: int) -> dict[str, float]:
    chunk = os.urandom(MiB)
    n = total // MiB
    chunks = [chunk] * n  # one bytes object, n times

    def plain():
        c = time.process_time()
        size = 0
        for piece in chunks:
            size += len(piece)
        assert size == total
        return time.process_time() - c

    def with_write():
        path = os.path.join(work_dir, "plain.bin")
        c = time.process_time()
        with open(path, "wb", buffering=0) as f:
            for piece in chunks:
                f.write(piece)
        os.unlink(path)
        return time.process_time() - c

    def tee():
        done = []

        def on_complete(result, tmp_path):
            done.append(result.size)
            os.unlink(tmp_path)

        opts = StreamThroughOptions(content_length=total, temp_dir=work_dir)
        c = time.process_time()
        app_iter = stream_through({"REQUEST_METHOD": "GET"}, lambda status, headers, exc_info=None: None,
                                  chunks, opts, on_complete)
        try:
            for _ in app_iter:
                pass
        finally:
            app_iter.close()
        elapsed = time.process_time() - c
        assert done == [total], done
        return elapsed

    def blake3_rate():
        hasher = blake3.blake3()  # single-threaded (max_threads defaults to 1)
        t = time.perf_counter()
        for piece in chunks:
            hasher.update(piece)
        hasher.digest()
        return -(total / (time.perf_counter() - t) / 1e9)  # negated so best() picks the fastest

    return {
        "plain": best(runs, plain),
        "write": best(runs, with_write),
        "tee": best(runs, tee),
        "blake3_gbps": -best(runs, blake3_rate),
    }


# -- 3. CAFS.commit ---------------------------------------------------------------

def bench_commit(files: int, fsync: bool, parent: str) -> float:
    """Commits per second of ``files`` distinct small (~1 KiB) temp files."""
    root = tempfile.mkdtemp(prefix="cachefetch-bench-commit-", dir=parent)
    try:
        store = CAFS(root, fsync=fsync)
        temps = []
        for i in range(files):
            f, path = store.new_temp()
            with f:
                f.write(i.to_bytes(8, "big") * 128)
            temps.append(path)
        t = time.perf_counter()
        for path in temps:
            store.commit(path)
        elapsed = time.perf_counter() - t
        assert sum(1 for _ in store) == files and store.temp_files() == []
        return files / elapsed
    finally:
        shutil.rmtree(root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller, faster run")
    args = ap.parse_args(argv)

    if args.quick:
        do_calls, bare_calls, total, runs, files = 2_000, 200_000, 128 * MiB, 2, 1_000
    else:
        do_calls, bare_calls, total, runs, files = 20_000, 2_000_000, GiB, 3, 10_000

    revision = cachefetch_revision()
    do_ns, bare_ns = bench_group(do_calls, bare_calls)

    stream_parent = pick_temp_parent(total)
    work_dir = tempfile.mkdtemp(prefix="cachefetch-bench-stream-", dir=stream_parent)
    try:
        s = bench_stream(total, work_dir, runs)
    finally:
        shutil.rmtree(work_dir)

    commit_parent = tempfile.gettempdir()  # a real filesystem, so fsync means something
    rate_sync = bench_commit(files, True, commit_parent)
    rate_nosync = bench_commit(files, False, commit_parent)

    size = f"{total // MiB} MiB" if total < GiB else f"{total // GiB} GiB"
    tee_vs_plain = s["tee"] / s["plain"] if s["plain"] > 0 else float("inf")
    tee_vs_write = s["tee"] / s["write"]
    hash_cpu = total / (s["blake3_gbps"] * 1e9)  # seconds of CPU BLAKE3 alone needs

    intro = (f"cachefetch primitives — Python {platform.python_version()}, {os.cpu_count()} CPUs, "
             f"{'--quick' if args.quick else 'full'} run; stream temp dir on {stream_parent}, "
             f"commit store on {commit_parent}; best of {runs} for CPU timings")
    header = ["#", "measurement", "cachefetch", "baseline", "ratio", "goal"]
    rows = [
        ["1", f"`Group.do`, uncontended key, ns/call ({do_calls:,} calls)", f"{do_ns:,.0f} ns",
         f"{bare_ns:,.0f} ns (bare call under `threading.Lock`)", f"{do_ns / bare_ns:,.0f}×", "—"],
        ["2a", (f"`stream_through` {size}, CPU s, vs a baseline that touches no bytes (iterating "
                "references to one in-memory `bytes` object costs ~0 CPU: ratio not meaningful)"),
         f"{s['tee']:.3f} s", f"{s['plain']:.4f} s (iterate the chunks, write nothing)", f"{tee_vs_plain:,.0f}×",
         "≤ 1.5×"],
        ["2b", f"`stream_through` {size}, CPU s, vs iteration + file write", f"{s['tee']:.3f} s",
         f"{s['write']:.3f} s (iterate + write each chunk to a file)", f"{tee_vs_write:.2f}×", f"≤ {STREAM_GOAL}×"],
        ["2c", "BLAKE3 alone, single thread", f"{s['blake3_gbps']:.2f} GB/s", f"{hash_cpu:.3f} s for {size}", "—",
         f"≥ {BLAKE3_GOAL:g} GB/s"],
        ["2d", "`stream_through` CPU − (write + BLAKE3) = tee overhead",
         f"{max(0.0, s['tee'] - s['write'] - hash_cpu):.3f} s", "—", "—", "—"],
        ["3a", f"`CAFS.commit`, {files:,} ~1 KiB files, fsync=True", f"{rate_sync:,.0f} commits/s",
         f"{rate_nosync:,.0f} commits/s (fsync=False)", f"{rate_nosync / rate_sync:.1f}× slower", "—"],
        ["3b", f"`CAFS.commit`, {files:,} ~1 KiB files, fsync=False", f"{rate_nosync:,.0f} commits/s", "—", "—",
         "—"],
    ]
    table = markdown_table(header, rows)
    print(intro)
    print()
    print(table)

    # Only the ratios that mean something: 1 has no goal and dwarfs the rest, 2a's baseline costs
    # ~0 CPU, 2d and 3b are not ratios.
    bars = [
        Bar(f"2b: stream_through CPU ÷ iterate + write, {size} (↓)", finite(tee_vs_write), STREAM_GOAL,
            higher_is_better=False),
        Bar(f"2c: BLAKE3 single thread ÷ {BLAKE3_GOAL:g} GB/s goal (↑)", finite(s["blake3_gbps"] / BLAKE3_GOAL),
            1.0),
        Bar("3a: CAFS.commit/s, fsync=True ÷ fsync=False (↑)", finite(rate_sync / rate_nosync)),
    ]
    now = datetime.datetime.now().astimezone()
    title = f"cachefetch primitives benchmark{' (--quick)' if args.quick else ''}"
    md = [
        f"# {title}",
        "",
        f"- {report.machine(now)}; blake3 {blake3.__version__}",
        f"- cachefetch at {revision}",
        (f"- {'--quick' if args.quick else 'full'} run; stream temp dir on {stream_parent}, commit store on "
         f"{commit_parent}; best of {runs} for CPU timings"),
    ]
    report.write_results(RESULTS_MD, RESULTS_PNG, title, md, table, bars,
                         subtitle=f"{os.cpu_count()} CPUs; Python {platform.python_version()}; {now:%Y-%m-%d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
