#!/usr/bin/env python3
"""Benchmark ``cachefetch serve --cpu-affinity auto`` against the default (off); print a Markdown table.

Two ``cachefetch serve --workers 2 --threads 32`` on 127.0.0.1, identical but
for ``--cpu-affinity``, in front of one nginx serving the files; both warmed
(every file stored and hit) first. Then interleaved rounds, order alternated:

1. 4 KiB hits: ``wrk -t2 -c64`` for 4 s; requests per second.
2. 10 MiB hits (``sendfile``): ``wrk -t2 -c4`` for 4 s; bytes per second.

The figure is pinned ÷ unpinned, the ratio of the medians over the rounds.
There is no goal: the script shows what the option buys on this machine,
which is what the README and ``--help`` say of it. Every process is stopped
and every temp dir removed at the end, also on errors, Ctrl-C and SIGTERM.
Results go to ``benchmarks/results/affinity.md`` and ``.png``.

Usage: ``python benchmarks/bench_affinity.py [--rounds N] [--seconds S]``
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "results", "affinity.md")
RESULTS_PNG = os.path.join(HERE, "results", "affinity.png")
sys.path.insert(0, HERE)

import report  # noqa: E402
from bench_proxy import (THREADS, WORKERS, CachefetchServe, Nginx, Section, mibps, ratio_text, safe_div,  # noqa: E402
                         stop_all, wait_hit_or_fail)
from loadgen import run_wrk, wrk_version  # noqa: E402
from procstat import machine_busy  # noqa: E402
from report import HOST, Bar, cachefetch_revision, free_port, log, met  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
#: (path, size, wrk connections, what the row counts)
LOADS = (("/small.bin", 4 * KiB, 64, "req/s"), ("/big.bin", 10 * MiB, 4, "MiB/s"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per load (default 8)")
    parser.add_argument("--seconds", type=int, default=4, help="seconds of wrk per round (default 4)")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds < 1:
        parser.error("--rounds and --seconds must be at least 1")
    nginx = shutil.which("nginx")
    if nginx is None or shutil.which("wrk") is None:
        log("nginx and wrk must be on PATH (Debian: `apt-get install -y nginx wrk`)")
        return 2
    report.interrupt_on(signal.SIGTERM)
    started = time.monotonic()
    busy_before = machine_busy()
    workdir = tempfile.mkdtemp(prefix="cachefetch-bench-affinity-")
    servers: list = []
    try:
        files = os.path.join(workdir, "files")
        os.mkdir(files)
        for path, size, _, _ in LOADS:
            with open(files + path, "wb") as f:
                f.write(os.urandom(size))
        port = free_port()
        origin = Nginx(nginx, workdir, "origin", f"    server {{\n        listen {HOST}:{port};\n"
                       f"        root {files};\n    }}", port, access_log=False)
        servers.append(origin)
        targets = {}
        for mode in ("off", "auto"):
            targets[mode] = CachefetchServe(workdir, f"affinity-{mode}", f"http://{HOST}:{origin.port}",
                                            extra=("--cpu-affinity", mode))
            servers.append(targets[mode])
            for path, *_ in LOADS:
                wait_hit_or_fail(targets[mode].port, path, f"--cpu-affinity {mode}")
        results = {(path, mode): [] for path, *_ in LOADS for mode in targets}
        for path, size, connections, unit in LOADS:
            for server in targets.values():  # every thread and connection made once before the counted rounds
                run_wrk(server.port, path, 1, connections, 2)
            for r in range(args.rounds):
                for mode in (list(targets) if r % 2 == 0 else list(targets)[::-1]):
                    load = run_wrk(targets[mode].port, path, args.seconds, connections, 2)
                    if load.non_2xx or load.errors:
                        raise RuntimeError(f"{mode} {path}: {load.non_2xx} non-2xx answers, {load.errors} errors")
                    rate = load.requests / load.seconds
                    results[path, mode].append(rate if unit == "req/s" else rate * size)
                    log(f"round {r + 1}/{args.rounds} {path} --cpu-affinity {mode}: {rate:,.0f} req/s")
    finally:
        stop_all(servers, workdir)

    section = Section("`--cpu-affinity auto` ÷ `off`, hits through `cachefetch serve`",
                      ["load", "off", "auto", "auto ÷ off (ratio of medians)", "per-round ratios", "goal", "met"])
    bars = []
    for path, size, connections, unit in LOADS:
        off, auto = results[path, "off"], results[path, "auto"]

        def shown(values: list[float]) -> str:
            value = statistics.median(values)
            span = f"[{min(values):,.0f}–{max(values):,.0f}]" if unit == "req/s" else \
                f"[{mibps(min(values))}–{mibps(max(values))}]"
            return (f"{value:,.0f} req/s " if unit == "req/s" else f"{mibps(value)} ") + span

        ratio = safe_div(statistics.median(auto), statistics.median(off))
        per_round = sorted(a / o for a, o in zip(auto, off))
        label = f"{size // KiB} KiB" if size < MiB else f"{size // MiB} MiB"
        section.rows.append([f"{label} hits, `wrk -t2 -c{connections}`, {unit}", shown(off), shown(auto),
                             ratio_text(ratio), f"{per_round[0]:.2f}–{per_round[-1]:.2f}", "— (reported)",
                             met(None)])
        bars.append(Bar(f"{label} hits: {unit}, pinned ÷ unpinned (↑)", ratio))
    section.notes.append(f"median [min–max] of {args.rounds} interleaved {args.seconds} s rounds, order "
                         "alternated; wrk shares the machine's CPUs with the servers")

    import gunicorn  # noqa: PLC0415  (only for its version)
    title = "cachefetch serve: workers pinned to CPUs (`--cpu-affinity auto`) or not"
    header = [
        f"# {title}",
        "",
        f"- {report.machine(datetime.datetime.now().astimezone())}; all on {HOST}",
        f"- cachefetch: `python -m cachefetch.cli serve --workers {WORKERS} --threads {THREADS} --cpu-affinity "
        f"off|auto` (gunicorn {gunicorn.__version__}, our worker) at {cachefetch_revision()}; origin: nginx",
        f"- load: {wrk_version()}",
        f"- other work on the machine: before the run {busy_before}; after it {machine_busy()}",
        f"- whole run: {time.monotonic() - started:.0f} s",
    ]
    report.write_results(RESULTS_MD, RESULTS_PNG, title, header, section.render(), bars, echo=True,
                         subtitle=f"{os.cpu_count()} CPUs shared by wrk and the servers; "
                                  f"{datetime.datetime.now().astimezone():%Y-%m-%d}")
    return 0


if __name__ == "__main__":
    report.run_main(main)
