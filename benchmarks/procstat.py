"""What the benchmark scripts read from ``/proc``: processes, their CPU and memory, the machine's load.

One copy for every script (they used to carry their own, which drifted apart).
Linux only; every reader returns 0 (or an empty list) for a process that is
gone rather than raising, since a benchmark samples processes that may exit.
It imports nothing from ``cachefetch`` or ``tests``.
"""
from __future__ import annotations

import ctypes
import os
import resource
import time

__all__ = ["CLK_TCK", "children", "descendants", "proc_cpu", "proc_cpu_ns", "proc_rss", "tree_rss", "children_cpu",
           "machine_busy_seconds", "machine_busy"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 onwards), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``, sorted."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(name))
    return sorted(out)


def descendants(pid: int) -> list[int]:
    """``pid``'s children, their children and so on (not ``pid`` itself)."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return sorted(out)


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads, live and ended), in seconds; 0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # stat fields 14 and 15


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)


def proc_cpu_ns(pid: int) -> int:
    """CPU time of a process (all its threads, live and ended), in nanoseconds;
    0 if it is gone.

    The process's CPU-time clock (``clock_getcpuclockid``): the scheduler's own
    count, where :func:`proc_cpu` rounds down to clock ticks (10 ms), too
    coarse for a batch of a few hundred milliseconds.
    """
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:  # returns the error, sets no errno
        return 0
    ts = _Timespec()
    if _libc.clock_gettime(clock.value, ctypes.byref(ts)) != 0:
        return 0  # the process ended in between
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


def proc_rss(pid: int) -> int:
    """A process's resident set size in bytes (``VmRSS``); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pids: list[int]) -> int:
    """The RSS of ``pids`` summed, in bytes (shared pages counted once per process)."""
    return sum(proc_rss(pid) for pid in pids)


def children_cpu() -> float:
    """CPU seconds of this script's waited-for children (wrk, the Python load processes)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]  # guest time is in user already
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all CPUs)."""
    return _cpu_ticks()[0] / CLK_TCK


def machine_busy(seconds: float = 1.0) -> str:
    """How busy the machine is over ``seconds`` (other work skews every number):
    load average and CPU use, as a phrase; ``"unknown"`` where /proc says nothing."""
    try:
        b0, t0 = _cpu_ticks()
        time.sleep(seconds)
        b1, t1 = _cpu_ticks()
        with open("/proc/loadavg") as f:
            load1 = f.read().split()[0]
    except (OSError, ValueError, IndexError):
        return "unknown"
    return f"load average {load1}, CPUs {100 * (b1 - b0) / max(1, t1 - t0):.0f}% busy over {seconds:g} s"
