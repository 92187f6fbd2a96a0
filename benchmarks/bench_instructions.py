#!/usr/bin/env python3
"""What a 4 KiB hit costs the gunicorn worker, in instructions: counted by
valgrind's cachegrind, so the same from run to run where req/s on a shared
2-core machine is not. Print a Markdown table, write it and a chart.

The servers are those of ``bench_middleware.py``'s scenario 1, as far as
they matter to its 4 KiB goal (a hit at >= 0.95x the bare app):

- ``floor``: the bare app returning the 4 KiB from memory with the Flask
  view's fields (``bench_apps.bytes_app``);
- ``fields``: the same bare app sending a CacheFetch hit's own fields (taken
  from a real hit: ETag, Accept-Ranges, Age and Cache-Status more);
- ``cachefetch``: the Flask view wrapped in CacheFetch, its entry warmed
  (hits answered from the worker's memory); and once more with
  ``cache_status=False``.

Each runs as ``gunicorn -k gthread -w 1 --threads 4`` under ``valgrind
--tool=cachegrind --cache-sim=yes --trace-children=yes``, twice: warmed, then
N GETs one after another on one keep-alive connection, for N =
``--requests`` and 11 times that. What the worker process executed per
request is the difference between the two runs over the difference in
requests: start-up, warm-up and exit cancel out.

What it counts: user-space instructions (``Ir``) and the simulated first-level
data cache's misses (``D1mr + D1mw``) of the worker; the kernel's work is not
seen (valgrind runs no kernel code), and neither is waiting. Work a worker
does once a second or so (CacheFetch's ``Age`` field, its batched use
records, gunicorn's heartbeat) is spread over the requests of a second under
valgrind, which is about 50 times slower: it is overstated here, and small.

Two more tables: what each of the four fields a hit adds costs (the
``fields`` server without it), and the C functions whose counts per request
differ most between ``cachefetch`` and ``fields``: where CacheFetch's own
cost goes, beyond the fields.

Needs valgrind (``apt-get install -y valgrind``: cachegrind and cg_annotate).
Nothing contacts a host other than 127.0.0.1; every server is stopped and
every file removed at the end, also on errors and Ctrl-C. Results:
``benchmarks/results/instructions.md`` and ``instructions.png``.

Usage: ``python benchmarks/bench_instructions.py [--requests N]``
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "results", "instructions.md")
RESULTS_PNG = os.path.join(HERE, "results", "instructions.png")
sys.path.insert(0, HERE)

import bench_apps  # noqa: E402
import report  # noqa: E402
from bench_middleware import FLOOR_GOAL, Gunicorn, answer_fields, check_small  # noqa: E402
from loadgen import one_by_one  # noqa: E402
from report import Bar, log, markdown_table  # noqa: E402

THREADS = 4
WARM = 5  # requests before counting starts: the miss, the commit, the first hot hit
# The fields a hit adds to the view's: what each costs gunicorn is measured apart.
HIT_FIELDS = ("ETag", "Accept-Ranges", "Age", "Cache-Status")
# The summary line cachegrind writes: the events named on its "events:" line.
_SUMMARY = re.compile(r"^summary:\s+(.*)$", re.M)
_EVENTS = re.compile(r"^events:\s+(.*)$", re.M)
_FUNCTION = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)$")


@dataclass(frozen=True)
class Counts:
    """One worker's cachegrind totals, and its instructions by C function."""

    events: dict[str, int]
    functions: dict[str, int]

    def minus(self, other: "Counts", requests: int) -> "Counts":
        """Per request: (self - other) / requests."""
        return Counts({k: (v - other.events.get(k, 0)) / requests for k, v in self.events.items()},
                      {k: (self.functions.get(k, 0) - other.functions.get(k, 0)) / requests
                       for k in set(self.functions) | set(other.functions)})

    @property
    def instructions(self) -> float:
        return self.events["Ir"]

    @property
    def d1_misses(self) -> float:
        return self.events.get("D1mr", 0) + self.events.get("D1mw", 0)


def counts_of(path: str) -> Counts:
    """Read a cachegrind output file: its totals, and ``cg_annotate``'s per-function instructions."""
    with open(path) as f:
        text = f.read()
    names = _EVENTS.search(text).group(1).split()
    totals = dict(zip(names, map(int, _SUMMARY.search(text).group(1).split())))
    out = subprocess.run(["cg_annotate", "--show=Ir", "--threshold=0", "--auto=no", path],
                         capture_output=True, text=True, check=True).stdout
    functions: dict[str, int] = {}
    for line in out.splitlines():
        m = _FUNCTION.match(line)
        if m and m.group(2) != "PROGRAM TOTALS":
            name = _short(m.group(2))
            functions[name] = functions.get(name, 0) + int(m.group(1).replace(",", ""))
    return Counts(totals, functions)


def _short(function: str) -> str:
    """``file:function`` with the build directory's part of the path dropped."""
    path, _, name = function.rpartition(":")
    return f"{os.path.basename(path)}:{name}" if path else function


class Counted:
    """One server under cachegrind, warmed, then ``requests`` GETs; then stopped (its counts read)."""

    def __init__(self, workdir: str, name: str, requests: int, env: dict[str, str]) -> None:
        self.out_dir = tempfile.mkdtemp(prefix=f"cg-{requests}-", dir=workdir)
        prefix = ("valgrind", "--tool=cachegrind", "--cache-sim=yes", "--trace-children=yes",
                  f"--cachegrind-out-file={self.out_dir}/cg.%p")
        log(f"{name}: {requests} requests under cachegrind")
        server = Gunicorn(workdir, f"{name.replace(' ', '-')}-{requests}", {"PYTHONHASHSEED": "0", **env}, workers=1,
                          threads=THREADS, prefix=prefix, boot_seconds=600)
        try:
            for _ in range(WARM):
                one_by_one(server.port, "/small", 1, bench_apps.SMALL_SIZE)
            if env.get("BENCH_CACHE") == "cachefetch":  # under valgrind: slow to answer, slow to commit
                check_small(server.port, "cachefetch", env.get("BENCH_CACHE_STATUS") != "off", wait=300,
                            timeout=600)
            self.last_headers = one_by_one(server.port, "/small", requests, bench_apps.SMALL_SIZE, timeout=600)
        finally:
            server.stop()
        worker, = server.pids
        self.counts = counts_of(os.path.join(self.out_dir, f"cg.{worker}"))


def hit_fields(workdir: str) -> list[tuple[str, str]]:
    """The fields of a real CacheFetch hit on the Flask view (but those gunicorn adds itself)."""
    server = Gunicorn(workdir, "fields-source", {"BENCH_APP": "flask", "BENCH_CACHE": "cachefetch",
                                                 "BENCH_STORE": tempfile.mkdtemp(dir=workdir)}, workers=1)
    try:
        check_small(server.port, "cachefetch")
        return answer_fields(server.port)
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200,
                        help="requests of the shorter run (the longer makes 11 times as many); default 200")
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    for tool in ("valgrind", "cg_annotate"):
        if shutil.which(tool) is None:
            print(f"{tool} is not on PATH: apt-get install -y valgrind", file=sys.stderr)
            return 2
    report.interrupt_on(signal.SIGTERM)
    workdir = tempfile.mkdtemp(prefix="cachefetch-bench-instructions-")
    started = time.monotonic()
    try:
        fields = hit_fields(workdir)
        servers = {
            "floor": {"BENCH_APP": "bytes", "BENCH_CACHE": "none"},
            "fields": {"BENCH_APP": "fields", "BENCH_CACHE": "none", "BENCH_FIELDS": json.dumps(fields)},
            "cachefetch": {"BENCH_APP": "flask", "BENCH_CACHE": "cachefetch"},
            "cachefetch, cache_status=False": {"BENCH_APP": "flask", "BENCH_CACHE": "cachefetch",
                                               "BENCH_CACHE_STATUS": "off"},
        }
        for field in HIT_FIELDS:
            servers[f"fields without {field}"] = {**servers["fields"], "BENCH_FIELDS": json.dumps(
                [(k, v) for k, v in fields if k != field])}
        short, long = args.requests, 11 * args.requests
        per: dict[str, Counts] = {}
        for name, env in servers.items():
            runs = []
            for requests in (short, long):
                cached = env["BENCH_CACHE"] == "cachefetch"
                store = {"BENCH_STORE": tempfile.mkdtemp(dir=workdir)} if cached else {}
                runs.append(Counted(workdir, name, requests, {**env, **store}))
            if name == "cachefetch":
                status = runs[-1].last_headers.get("Cache-Status") or ""
                if not status.startswith("cachefetch; hit"):
                    raise RuntimeError(f"the counted requests were not hits (Cache-Status {status!r})")
            per[name] = runs[1].counts.minus(runs[0].counts, long - short)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    floor, ours, cf = per["floor"], per["fields"], per["cachefetch"]
    quiet = per["cachefetch, cache_status=False"]

    def cell(c: Counts) -> str:
        return f"{c.instructions:,.0f} instructions, {c.d1_misses:,.0f} D1 misses"

    rows = [
        ("1c (instructions). floor ÷ CacheFetch, per request", f"{cell(cf)}; floor {cell(floor)}",
         f"{floor.instructions / cf.instructions:.3f}",
         f"(req/s goal ≥ {FLOOR_GOAL}; D1 misses {floor.d1_misses / cf.d1_misses:.3f})"),
        ("the four fields a hit adds: floor ÷ bare app with a hit's fields", f"{cell(ours)}",
         f"{floor.instructions / ours.instructions:.3f}", f"(D1 misses {floor.d1_misses / ours.d1_misses:.3f})"),
        ("CacheFetch's own work: bare app with a hit's fields ÷ CacheFetch", "",
         f"{ours.instructions / cf.instructions:.3f}",
         f"(+{cf.instructions - ours.instructions:,.0f} instructions per hit)"),
        ("floor ÷ CacheFetch with `cache_status=False` (no Cache-Status field)", cell(quiet),
         f"{floor.instructions / quiet.instructions:.3f}",
         f"({cf.instructions - quiet.instructions:,.0f} instructions fewer than with the field)"),
    ]
    body = markdown_table(["", "per request, in the worker", "ratio", "note"], rows)
    each = [(field, dict(fields)[field], f"{ours.instructions - per[f'fields without {field}'].instructions:,.0f}",
             f"{(ours.instructions - per[f'fields without {field}'].instructions) / floor.instructions:.1%}")
            for field in HIT_FIELDS]
    body += ("\n\nWhat gunicorn charges for each field a hit adds (the bare app with a hit's fields, less the "
             "same app without that one field; per request):\n\n"
             + markdown_table(["field", "value", "instructions", "of the floor's"], each))
    diff = sorted(((cf.functions.get(k, 0) - ours.functions.get(k, 0), k)
                   for k in set(cf.functions) | set(ours.functions)), reverse=True)
    top = [(k, f"{cf.functions.get(k, 0):,.0f}", f"{ours.functions.get(k, 0):,.0f}", f"{d:+,.0f}")
           for d, k in diff[:12]]
    body += ("\n\nWhere CacheFetch's instructions go beyond the fields' (C functions, per request; the "
             "interpreter's loop is CacheFetch's and Flask's Python code):\n\n"
             + markdown_table(["function", "cachefetch", "fields", "difference"], top))
    import gunicorn  # only for its version

    header = [
        "# cachefetch 4 KiB hit: instructions per request",
        "",
        (f"- {report.machine(datetime.datetime.now().astimezone())}; gunicorn {gunicorn.__version__} "
         f"`-k gthread -w 1 --threads {THREADS}` under valgrind's cachegrind "
         f"({subprocess.run(['valgrind', '--version'], capture_output=True, text=True).stdout.strip()}); "
         f"{report.cachefetch_revision()}"),
        (f"- per request: the worker's counts over {long:,} requests minus those over {short:,}, ÷ "
         f"{long - short:,}; user space only (no kernel work); simulated caches"),
        f"- the hit's fields: {', '.join(k for k, _ in fields)}",
        f"- whole run: {elapsed:.0f} s",
    ]
    report.write_results(RESULTS_MD, RESULTS_PNG, "4 KiB hit: instructions per request", header, body, [
        Bar("floor ÷ CacheFetch (↑)", floor.instructions / cf.instructions),
        Bar("floor ÷ bare app with a hit's fields (↑)", floor.instructions / ours.instructions),
        Bar("bare app with a hit's fields ÷ CacheFetch (↑)", ours.instructions / cf.instructions),
        Bar("floor ÷ CacheFetch, cache_status=False (↑)", floor.instructions / quiet.instructions),
    ], subtitle="user-space instructions in the gunicorn worker, counted by cachegrind", echo=True)
    return 0


if __name__ == "__main__":
    report.run_main(main)
