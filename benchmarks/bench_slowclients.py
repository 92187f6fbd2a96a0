#!/usr/bin/env python3
"""Slow clients against ``cachefetch serve``: do probes still get answered?

Every server listens on 127.0.0.1 and nothing else is contacted. For each
worker class (ours, ``--worker-class cachefetch``, and gunicorn's own
``gthread``), on the default settings (2 workers x 32 threads):

1. a fresh store is warmed with a 4 KiB file (the probe's) and a 16 MiB one
   (the never-readers');
2. 200 probes at once (each a fresh connection, GET of the 4 KiB hit,
   released together) with no attack: the baseline latency;
3. the attack, from a process of its own: 4 x (workers x threads) = 256
   slowloris connections (a request line, then a header line every 3 s, never
   the end; a closed one reconnects) and 256 never-reading clients (a 4 KiB
   receive buffer, GET of the 16 MiB hit, never a read; a dropped one
   reconnects). It runs for a fixed time and stops by itself;
4. under attack, rounds of 200 probes at once: once the attack is connected,
   just after the server's header deadline (20 s) has cut the first slowloris
   wave (which then reconnects), and just after its send timeout (30 s) has
   dropped the first never-readers (which reconnect).

Reported: probes answered (200 with the right body) within 1 s, and p50/p99
latency (a probe that got no answer within its 5 s timeout counts as 5 s),
with the goal: >= 99% within 1 s for our worker under attack. Server CPU is
that of the worker processes over the attack.

Usage: ``python benchmarks/bench_slowclients.py [--quick]`` (--quick: 64 + 64
attackers, one round, shorter). Writes ``benchmarks/results/slowclients.md``
and a chart ``slowclients.png`` (matplotlib, the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import multiprocessing
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import report  # noqa: E402
from bench_proxy import Proc, clean_env, tail, wait_port  # noqa: E402
import loadgen  # noqa: E402
from procstat import machine_busy  # noqa: E402
from report import HOST, Bar, cachefetch_revision, free_port, log, markdown_table, met  # noqa: E402

RESULTS_MD = os.path.join(HERE, "results", "slowclients.md")
RESULTS_PNG = os.path.join(HERE, "results", "slowclients.png")
REPO_ROOT = os.path.dirname(HERE)
WORKERS, THREADS = 2, 32
PROBES = 200
PROBE_TIMEOUT = 5.0
WITHIN = 1.0
GOAL = 0.99
SMALL = os.urandom(4 << 10)
LARGE = os.urandom(16 << 20)
LORIS_EVERY = 3.0
HEADER_TIMEOUT, SEND_TIMEOUT = 20.0, 30.0  # serve's defaults, which the rounds are timed against


# -- the origin and the server ---------------------------------------------------------

class Origin:
    """The two files, from memory, on a thread of this process."""

    def __init__(self) -> None:
        files = {"/small.bin": SMALL, "/large.bin": LARGE}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self) -> None:
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Serve(Proc):
    """``cachefetch serve`` with default settings but for the worker class."""

    def __init__(self, workdir: str, worker_class: str, upstream: str) -> None:
        self.name = f"cachefetch serve --worker-class {worker_class}"
        self.port = free_port()
        store = tempfile.mkdtemp(prefix=f"store-{worker_class}-", dir=workdir)
        env = clean_env(PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "cachefetch.cli", "serve", "--upstream", upstream, "--store", store,
               "--bind", f"{HOST}:{self.port}", "--worker-class", worker_class]
        log(f"starting {self.name}")
        self.start_proc(cmd, os.path.join(workdir, f"serve-{worker_class}.log"), env=env, cwd=workdir)
        try:
            wait_port(self.port, self.alive, self.name)
            for path in ("/small.bin", "/large.bin"):
                deadline = time.monotonic() + 30
                while "; hit" not in (probe(self.port, path, timeout=30).cache_status or ""):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{path} never became a hit:\n{tail(self.log_path)}")
                    time.sleep(0.05)  # another process commits it: nothing to wait on here
        except BaseException:
            self.stop()
            raise


# -- probes ------------------------------------------------------------------------------

@dataclass
class Probe:
    seconds: float
    ok: bool
    cache_status: str | None = None


def probe(port: int, path: str = "/small.bin", timeout: float = PROBE_TIMEOUT) -> Probe:
    """One GET on a fresh connection; ``ok`` if it is a 200 with the right body in time."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        want = SMALL if path == "/small.bin" else LARGE
        elapsed = time.monotonic() - started
        return Probe(elapsed, resp.status == 200 and body == want and elapsed <= timeout,
                     resp.getheader("Cache-Status"))
    except OSError:
        return Probe(timeout, False)
    finally:
        conn.close()


@dataclass
class Round:
    label: str
    probes: list[Probe]

    @property
    def within(self) -> int:
        return sum(p.ok and p.seconds <= WITHIN for p in self.probes)

    @property
    def fraction(self) -> float:
        return self.within / len(self.probes)

    def quantile(self, q: float) -> float:
        times = sorted(p.seconds if p.ok else PROBE_TIMEOUT for p in self.probes)
        return times[min(len(times) - 1, int(q * len(times)))]

    def cells(self) -> list[str]:
        return [f"{self.within}/{len(self.probes)}", f"{self.quantile(0.5) * 1000:,.0f} ms",
                f"{self.quantile(0.99) * 1000:,.0f} ms"]


def probe_round(port: int, label: str) -> Round:
    results = loadgen.all_at_once(PROBES, lambda i: probe(port), label)
    return Round(label, results)


# -- the attack (a process of its own) -------------------------------------------------------

@dataclass
class AttackPlan:
    port: int
    loris: int
    readers: int
    seconds: float


def _open(port: int, rcvbuf: int | None = None) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(2.0)
        sock.connect((HOST, port))
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        return None


def attack(plan: AttackPlan, connected: "multiprocessing.sharedctypes.Synchronized",
           reconnects: "multiprocessing.sharedctypes.Synchronized") -> None:
    """Keep ``plan.loris`` slowloris and ``plan.readers`` never-reading
    connections open for ``plan.seconds``, reopening closed ones; then stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    end = time.monotonic() + plan.seconds
    poller = select.poll()
    socks: dict[int, tuple[socket.socket, str, float]] = {}   # fd -> (socket, kind, next header line)
    hup = select.POLLHUP | select.POLLERR | select.POLLRDHUP

    def start(kind: str) -> None:
        sock = _open(plan.port, rcvbuf=4096 if kind == "reader" else None)
        if sock is None:
            return
        try:
            if kind == "reader":
                sock.send(b"GET /large.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            else:
                sock.send(b"GET /small.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        except OSError:
            sock.close()
            return
        socks[sock.fileno()] = (sock, kind, time.monotonic() + LORIS_EVERY)
        # A slowloris drains what the server sends it (a 408); a reader never reads.
        poller.register(sock, hup | (select.POLLIN if kind == "loris" else 0))

    for kind, count in (("loris", plan.loris), ("reader", plan.readers)):
        for _ in range(count):
            start(kind)
    connected.value = len(socks)
    line = 0
    while time.monotonic() < end:
        for fd, event in poller.poll(200):
            sock, kind, _ = socks[fd]
            if kind == "loris" and event & select.POLLIN and not event & hup:
                with contextlib.suppress(OSError):
                    if sock.recv(65536):
                        continue
            poller.unregister(fd)
            del socks[fd]
            sock.close()
            reconnects.value += 1
            start(kind)
        now = time.monotonic()
        for fd, (sock, kind, due) in list(socks.items()):
            if kind == "loris" and now >= due:
                line += 1
                with contextlib.suppress(OSError):
                    sock.send(b"X-Loris-%d: slow\r\n" % line)
                socks[fd] = (sock, kind, now + LORIS_EVERY)
        connected.value = len(socks)
    for sock, _, _ in socks.values():
        sock.close()


# -- a run per worker class -------------------------------------------------------------------

@dataclass
class Run:
    worker_class: str
    baseline: Round
    rounds: list[Round]
    cpu: float
    reconnects: int
    connected: int

    @property
    def under_attack(self) -> Round:
        return Round("all rounds under attack", [p for r in self.rounds for p in r.probes])


def measure(workdir: str, origin: Origin, worker_class: str, quick: bool) -> Run:
    serve = Serve(workdir, worker_class, origin.url)
    ctx = multiprocessing.get_context("spawn")
    attacker = None
    try:
        baseline = probe_round(serve.port, "no attack")
        attackers = (WORKERS * THREADS) if quick else 4 * WORKERS * THREADS
        seconds = 12.0 if quick else 40.0
        connected, reconnects = ctx.Value("i", 0), ctx.Value("i", 0)
        plan = AttackPlan(serve.port, attackers, attackers, seconds)
        log(f"{worker_class}: attack with {attackers} slowloris + {attackers} never-readers for {seconds:g} s")
        cpu_before = serve.cpu_seconds()
        attack_started = time.monotonic()
        attacker = ctx.Process(target=attack, args=(plan, connected, reconnects), daemon=True)
        attacker.start()
        deadline = time.monotonic() + 30
        while connected.value < 2 * attackers * 0.95 and time.monotonic() < deadline:
            time.sleep(0.05)  # another process's progress: nothing to block on
        at_full = connected.value
        schedule = [("attack connected", 2.0)]
        if not quick:
            schedule += [("after the first header deadline", HEADER_TIMEOUT + 2.0),
                         ("after the first send timeout", SEND_TIMEOUT + 3.0)]
        rounds = []
        for label, at in schedule:
            wait = attack_started + at - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # the rounds are placed in time on purpose
            rounds.append(probe_round(serve.port, label))
            log(f"{worker_class}: {label}: {rounds[-1].within}/{PROBES} within {WITHIN:g} s")
        cpu = serve.cpu_seconds() - cpu_before
        attacker.join(seconds + 30)
        return Run(worker_class, baseline, rounds, cpu, reconnects.value, at_full)
    finally:
        if attacker is not None and attacker.is_alive():
            attacker.terminate()
            attacker.join(10)
        serve.stop()


def render(runs: list[Run], attackers: int) -> tuple[str, list[Bar]]:
    rows, bars = [], []
    for run in runs:
        for rnd in [run.baseline, *run.rounds, run.under_attack]:
            goal = run.worker_class == "cachefetch" and rnd is not run.baseline
            rows.append([run.worker_class, rnd.label, *rnd.cells(),
                         f"≥ {GOAL:.0%} within {WITHIN:g} s" if goal else "—",
                         met(rnd.fraction >= GOAL) if goal else "—"])
        total = run.under_attack
        bars.append(Bar(f"{run.worker_class}: probes within {WITHIN:g} s under attack", total.fraction,
                        GOAL if run.worker_class == "cachefetch" else None))
        if total.within:  # else the p99 is just the probes' timeout
            bars.append(Bar(f"{run.worker_class}: p99 under attack ÷ p99 without", total.quantile(0.99)
                            / max(run.baseline.quantile(0.99), 1e-3), higher_is_better=False))
    table = markdown_table(["worker class", "probe round", f"answered within {WITHIN:g} s", "p50", "p99",
                            "goal", "met"], rows)
    notes = [f"- attack: {attackers} slowloris + {attackers} never-reading connections "
             f"(at full strength: {', '.join(f'{r.worker_class} {r.connected}' for r in runs)} connected); "
             f"reconnects after the server closed one: "
             f"{', '.join(f'{r.worker_class} {r.reconnects}' for r in runs)}",
             f"- server CPU over the attack (both workers): "
             f"{', '.join(f'{r.worker_class} {r.cpu:.1f} s' for r in runs)}",
             f"- a probe with no good answer within its {PROBE_TIMEOUT:g} s timeout counts as {PROBE_TIMEOUT:g} s"]
    return "## Probes under a slow-client attack\n\n" + table + "\n\n" + "\n".join(notes), bars


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 + 64 attackers, one round, 12 s")
    parser.add_argument("--only", choices=("cachefetch", "gthread"), help="measure one worker class")
    args = parser.parse_args()
    report.interrupt_on(signal.SIGTERM)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    started = time.monotonic()
    revision = cachefetch_revision()
    busy_before = machine_busy()
    workdir = tempfile.mkdtemp(prefix="bench-slowclients-")
    origin = Origin()
    runs = []
    try:
        for worker_class in ("cachefetch", "gthread"):
            if args.only in (None, worker_class):
                runs.append(measure(workdir, origin, worker_class, args.quick))
    finally:
        origin.close()
        shutil.rmtree(workdir, ignore_errors=True)
    busy_after = machine_busy()
    attackers = WORKERS * THREADS * (1 if args.quick else 4)

    import gunicorn  # noqa: PLC0415  (only for its version)
    title = f"cachefetch serve under slow clients{' (--quick)' if args.quick else ''}"
    body, bars = render(runs, attackers)
    header = [
        f"# {title}",
        "",
        f"- {report.machine(datetime.datetime.now().astimezone())}; all on {HOST}",
        f"- `python -m cachefetch.cli serve --worker-class …` with the defaults otherwise ({WORKERS} workers x "
        f"{THREADS} threads, header timeout {HEADER_TIMEOUT:g} s, send timeout {SEND_TIMEOUT:g} s), "
        f"gunicorn {gunicorn.__version__}, at {revision}",
        f"- {PROBES} probes at once per round, each a fresh connection and a GET of a 4 KiB hit; the attack "
        "runs in a process of its own, the probes in this one, the server in a third: all share the "
        f"machine's {os.cpu_count()} CPUs, so latencies are noisy",
        f"- other work on the machine: before the run {busy_before}; after it {busy_after}",
        f"- whole run: {time.monotonic() - started:.0f} s",
    ]
    report.write_results(RESULTS_MD, RESULTS_PNG, title, header, body, bars, echo=True,
                         subtitle=f"{os.cpu_count()} CPUs shared by attackers, probes and server; "
                                  f"{datetime.datetime.now().astimezone():%Y-%m-%d}")
    return 0


if __name__ == "__main__":
    report.run_main(main)
