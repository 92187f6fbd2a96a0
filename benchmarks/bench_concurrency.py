#!/usr/bin/env python3
"""Benchmark 1,000 clients at once on one ``cachefetch serve``, against nginx; print Markdown tables.

Every server listens on 127.0.0.1 and nothing else is contacted. Measured in
the same run, order alternated between the two servers:

1. 1,000 clients at once downloading one stored 100 MiB file (a hit):
   every download complete, the aggregate throughput (all bytes ÷ the time
   from the release to the last byte) of ``cachefetch serve`` vs nginx
   ``proxy_cache`` (goal: ratio >= 0.8), the servers' peak RSS (the sum over
   their worker processes, sampled every 0.2 s) and CPU.
2. 1,000 clients at once on one cold URL of a Python origin that waits 1 s,
   then trickles 20 MiB over 2 s (bench_proxy's): how many requests reached
   the origin (goal: 1), and whether every body is complete and right (each
   one's BLAKE3 checked).

The clients are :func:`loadgen.download_all`: asyncio in two forked
processes, every connection opened before a barrier releases all requests.
The script raises its open-file limit (inherited by the servers) first.
cachefetch runs with bench_proxy's settings, the recommended ones for this
load: ``--workers 2 --threads 32`` and gunicorn's default 1,000 connections
per worker (a hit's download holds a thread only while its client keeps up;
once its socket stays full, the event loop sends the rest, so the threads do
not bound the downloads). nginx: ``worker_processes 2``, 4,096 connections
each. Every process is stopped and every temp dir removed at the end, also
on errors, Ctrl-C and SIGTERM. Results go to
``benchmarks/results/concurrency.md`` and ``.png``.

Usage: ``python benchmarks/bench_concurrency.py [--quick] [--clients N] [--size MiB] [--rounds N]
[--cpu-affinity off|auto]``
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
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "results", "concurrency.md")
RESULTS_PNG = os.path.join(HERE, "results", "concurrency.png")
sys.path.insert(0, HERE)

import blake3  # noqa: E402  (a cachefetch dependency: checks the herd's bodies)

import report  # noqa: E402
from bench_proxy import (HERD_DELAY, HERD_SIZE, HERD_SPREAD, THREADS, WORKERS, CachefetchServe, Nginx,  # noqa: E402
                         PythonOrigin, Section, herd_body, mibps, nginx_proxy_body, nginx_version, ratio_text,
                         safe_div, stop_all, wait_hit_or_fail)
from loadgen import Got, download_all, raise_fd_limit  # noqa: E402
from procstat import descendants, machine_busy, proc_cpu, tree_rss  # noqa: E402
from report import HOST, Bar, cachefetch_revision, free_port, log, met  # noqa: E402

MiB = 1 << 20
GOAL = 0.8


class Sampler:
    """The peak summed RSS of a server's worker processes, sampled on a thread every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self.before = tree_rss(descendants(self.pid))
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, tree_rss(descendants(self.pid)))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def server_cpu(pid: int) -> float:
    return sum(proc_cpu(p) for p in descendants(pid))


def check(got: list[Got], size: int, what: str, digest: str = "") -> int:
    """How many came whole (and right, when ``digest`` is given); logs the first failures."""
    bad = [g for g in got if g.error or g.status != 200 or g.size != size or (digest and g.digest != digest)]
    for g in bad[:3]:
        log(f"{what}: a client got status {g.status}, {g.size} bytes, error {g.error!r}")
    return len(got) - len(bad)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 10 MiB file and one round")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--size", type=int, default=100, help="the stored file's size in MiB")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the hit download per server")
    parser.add_argument("--cpu-affinity", choices=("off", "auto"), default="off",
                        help="cachefetch serve's --cpu-affinity (default: %(default)s)")
    args = parser.parse_args()
    size = (10 if args.quick else args.size) * MiB
    nginx = shutil.which("nginx")
    if nginx is None:
        log("nginx is not on PATH (Debian: `apt-get install -y nginx`): nothing to compare with")
        return 2
    report.interrupt_on(signal.SIGTERM)
    limit = raise_fd_limit()
    if limit < 2 * args.clients + 256:
        log(f"the open-file limit is {limit}: too low for {args.clients} clients")
        return 2
    started = time.monotonic()
    busy_before = machine_busy()
    workdir = tempfile.mkdtemp(prefix="cachefetch-bench-concurrency-")
    servers: list = []
    bars: list[Bar] = []
    try:
        files = os.path.join(workdir, "files")
        os.mkdir(files)
        with open(os.path.join(files, "big.bin"), "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        trickle = PythonOrigin(workdir, "trickle")
        servers.append(trickle)
        port = free_port()
        origin = Nginx(nginx, workdir, "origin", f"    server {{\n        listen {HOST}:{port};\n"
                       f"        root {files};\n    }}", port, access_log=False)
        servers.append(origin)
        port = free_port()
        proxy = Nginx(nginx, workdir, "proxy", nginx_proxy_body(workdir, port, origin.port, trickle.port), port,
                      access_log=False)
        servers.append(proxy)
        serve_args = ("--cpu-affinity", args.cpu_affinity)
        cf = CachefetchServe(workdir, "concurrency", f"http://{HOST}:{origin.port}", extra=serve_args)
        servers.append(cf)
        targets = {"cachefetch": cf, "nginx": proxy}
        for name, server in targets.items():
            wait_hit_or_fail(server.port, "/big.bin", name)

        # 1. the hit, downloaded by every client at once
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(targets)[::-1]
            for name in order:
                server = targets[name]
                cpu0 = server_cpu(server.proc.pid)
                with Sampler(server.proc.pid) as rss:
                    got = download_all(server.port, "/big.bin", args.clients)
                cpu = server_cpu(server.proc.pid) - cpu0
                whole = check(got, size, f"hit {name}")
                seconds = max(g.end for g in got)
                res = {"whole": whole, "bps": sum(g.size for g in got) / seconds, "seconds": seconds,
                       "rss": rss.peak, "rss0": rss.before, "cpu": cpu,
                       "ttfb": statistics.median(g.ttfb for g in got if g.ttfb)}
                runs[name].append(res)
                log(f"hit round {r + 1}/{args.rounds} {name}: {whole}/{args.clients} whole, {mibps(res['bps'])} "
                    f"aggregate over {seconds:.1f} s, peak RSS {rss.peak / MiB:,.0f} MiB "
                    f"(before {rss.before / MiB:,.0f} MiB), server CPU {cpu:.1f} s")

        def med(name: str, key: str) -> float:
            return statistics.median(run[key] for run in runs[name])

        cf_bps, nx_bps = med("cachefetch", "bps"), med("nginx", "bps")
        ratio = safe_div(cf_bps, nx_bps)
        all_whole = all(run["whole"] == args.clients for name in runs for run in runs[name])
        how = f"median of {args.rounds}" if args.rounds > 1 else "one run"
        hit = Section(f"1. {args.clients:,} clients at once downloading one stored {size // MiB} MiB file",
                      ["measurement", "cachefetch", "nginx", "cachefetch ÷ nginx", "goal", "met"])
        hit.rows.append(["downloads complete", *(f"{min(r['whole'] for r in runs[n])}/{args.clients}"
                                                 for n in targets), "–", f"{args.clients}/{args.clients}",
                         met(all_whole)])
        hit.rows.append([f"aggregate throughput ({how})", mibps(cf_bps), mibps(nx_bps), ratio_text(ratio),
                         f"≥ {GOAL}", met(ratio >= GOAL)])
        hit.rows.append(["time from the release to the last byte",
                         *(f"{med(n, 'seconds'):.1f} s" for n in targets), "–", "—", met(None)])
        hit.rows.append(["median time to first byte", *(f"{med(n, 'ttfb') * 1e3:,.0f} ms" for n in targets), "–",
                         "—", met(None)])
        hit.rows.append(["server peak RSS, all workers (before the run)",
                         *(f"{med(n, 'rss') / MiB:,.0f} MiB ({med(n, 'rss0') / MiB:,.0f} MiB)" for n in targets),
                         ratio_text(safe_div(med("cachefetch", "rss"), med("nginx", "rss"))), "— (reported)",
                         met(None)])
        hit.rows.append(["server CPU (all workers)", *(f"{med(n, 'cpu'):.1f} s" for n in targets),
                         ratio_text(safe_div(med("cachefetch", "cpu"), med("nginx", "cpu"))), "—", met(None)])
        hit.notes.append("clients: `loadgen.download_all`, asyncio in 2 processes on the same 2 CPUs as the "
                         "servers, bodies counted and dropped; the client's own CPU caps both servers alike")
        bars.append(Bar(f"{args.clients:,}-client hit: aggregate MiB/s, cachefetch ÷ nginx (↑)", ratio, GOAL))

        # 2. the cold herd
        expected_size = HERD_SIZE
        herd: dict[str, dict] = {}
        cf_herd = CachefetchServe(workdir, "herd", f"http://{HOST}:{trickle.port}", extra=serve_args)
        servers.append(cf_herd)
        for name, server in {"cachefetch": cf_herd, "nginx": proxy}.items():
            path = f"/herd/{name}-concurrency.bin"
            expected = blake3.blake3(herd_body(path)).hexdigest()
            got = download_all(server.port, path, args.clients, digest=True)
            herd[name] = {"upstream": trickle.requests(path), "right": check(got, expected_size, f"herd {name}",
                                                                             expected),
                          "seconds": max(g.end for g in got),
                          "ttfb": statistics.median(g.ttfb for g in got if g.ttfb),
                          "statuses": sorted({g.cache for g in got})}
            log(f"herd {name}: {herd[name]['upstream']} upstream requests, {herd[name]['right']}/{args.clients} "
                f"bodies right, last byte after {herd[name]['seconds']:.1f} s, statuses {herd[name]['statuses']}")
        cold = Section(f"2. {args.clients:,} clients at once on one cold URL (origin: {HERD_DELAY:g} s to first byte, "
                       f"then {HERD_SIZE // MiB} MiB over {HERD_SPREAD:g} s)",
                       ["measurement", "cachefetch", "nginx (`proxy_cache_lock on`)", "goal", "met"])
        cold.rows.append(["upstream requests", herd["cachefetch"]["upstream"], herd["nginx"]["upstream"],
                          "1 (cachefetch)", met(herd["cachefetch"]["upstream"] == 1)])
        cold.rows.append(["bodies complete and right (BLAKE3)", *(f"{herd[n]['right']}/{args.clients}"
                                                                 for n in targets),
                          f"{args.clients}/{args.clients}", met(herd["cachefetch"]["right"] == args.clients)])
        cold.rows.append(["median time to first byte", *(f"{herd[n]['ttfb'] * 1e3:,.0f} ms" for n in targets), "—",
                          met(None)])
        cold.rows.append(["time from the release to the last byte", *(f"{herd[n]['seconds']:.1f} s" for n in targets),
                          "—", met(None)])
        cold.notes.append("cache statuses seen: " + "; ".join(
            f"{n}: {', '.join(f'`{s}`' for s in herd[n]['statuses'])}" for n in targets))
        bars.append(Bar("cold herd: upstream requests (↓)", float(herd["cachefetch"]["upstream"]), 1.0,
                        higher_is_better=False))
        bars.append(Bar("cold herd: bodies right ÷ clients (↑)", herd["cachefetch"]["right"] / args.clients, 1.0))
    finally:
        stop_all(servers, workdir)

    import gunicorn  # noqa: PLC0415  (only for its version)
    title = f"cachefetch serve with {args.clients:,} clients{' (--quick)' if args.quick else ''}"
    header = [
        f"# {title}",
        "",
        f"- {report.machine(datetime.datetime.now().astimezone())}; all on {HOST}",
        f"- cachefetch: `python -m cachefetch.cli serve --workers {WORKERS} --threads {THREADS} --cpu-affinity "
        f"{args.cpu_affinity}` (gunicorn "
        f"{gunicorn.__version__}, our worker, 1,000 connections per worker) at {cachefetch_revision()}",
        f"- nginx {nginx_version(nginx)}: `worker_processes 2`, `worker_connections 4096`, `proxy_cache` with "
        "`proxy_cache_lock on`, `sendfile on`; the origin is another nginx serving the file",
        f"- open-file limit raised to {limit}; clients, origins and servers share the machine's "
        f"{os.cpu_count()} CPUs",
        f"- other work on the machine: before the run {busy_before}; after it {machine_busy()}",
        f"- whole run: {time.monotonic() - started:.0f} s",
    ]
    report.write_results(RESULTS_MD, RESULTS_PNG, title, header, hit.render() + "\n\n" + cold.render(), bars,
                         echo=True, subtitle=f"{os.cpu_count()} CPUs shared by clients and servers; "
                                             f"{datetime.datetime.now().astimezone():%Y-%m-%d}")
    return 0


if __name__ == "__main__":
    report.run_main(main)
