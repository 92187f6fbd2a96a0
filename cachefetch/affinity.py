"""One CPU per gunicorn worker: the hooks behind ``cachefetch serve
--cpu-affinity auto``, usable by any gunicorn server.

A gthread worker's threads hand every request to one another: the event loop
gives a connection to a pool thread, which gives it back when the response
is sent. When the kernel runs them on different CPUs, each handoff is a
wake-up on another CPU, and on a virtual machine such wake-ups cost more than
the request itself. A worker pinned to one CPU hands off on that CPU. This is
nginx's ``worker_cpu_affinity auto``, for the same reason.

On the 2-core VM of ``benchmarks/`` (``bench_affinity.py``), two ``serve``
workers answered 1.75x the 4 KiB hits per second pinned (a bare app under
gunicorn gained as much); 10 MiB hits sent with ``sendfile`` ran at the same
speed either way (1.03x). Pinning
is a poor choice on a machine whose CPUs other busy processes share, which is
why it is not the default.

Linux only (:func:`supported`). In a gunicorn config file::

    from cachefetch.affinity import assign_cpu as pre_fork, pin_to_cpu as post_fork
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any, Iterable

__all__ = ["choose_cpu", "assign_cpu", "pin_to_cpu", "supported"]

# The attribute of gunicorn's worker object that carries its CPU from the
# arbiter (pre_fork) to the forked worker (post_fork).
_CPU = "cachefetch_cpu"


def choose_cpu(allowed: Iterable[int], taken: Iterable[int]) -> int:
    """The CPU of ``allowed`` with the fewest workers on it, ``taken`` being
    the CPUs the live workers are pinned to (one item per worker); the lowest
    numbered on a tie. CPUs in ``taken`` but not in ``allowed`` are ignored.

    :raises ValueError: if ``allowed`` is empty.
    """
    cpus = sorted(set(allowed))
    if not cpus:
        raise ValueError("no CPU is allowed")
    load = Counter(taken)
    return min(cpus, key=lambda cpu: (load[cpu], cpu))


def assign_cpu(server: Any, worker: Any) -> None:
    """gunicorn's ``pre_fork`` hook: choose the CPU the worker about to be
    forked will run on (:func:`choose_cpu` among the CPUs this process may
    use, given those of the workers alive now). Runs in the arbiter, which
    forks one worker at a time, so two workers never choose at once; a
    replacement for a dead worker takes the CPU it left."""
    taken = [getattr(w, _CPU) for w in list(server.WORKERS.values()) if getattr(w, _CPU, None) is not None]
    setattr(worker, _CPU, choose_cpu(os.sched_getaffinity(0), taken))


def pin_to_cpu(server: Any, worker: Any) -> None:
    """gunicorn's ``post_fork`` hook: pin the new worker process to the CPU
    :func:`assign_cpu` chose for it (the threads it starts later inherit it);
    a worker it chose none for is left as it is. Runs in the worker, before
    it loads the app.

    :raises OSError: if the system refuses the CPU (the worker then fails to
        start, and gunicorn says so).
    """
    cpu = getattr(worker, _CPU, None)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def supported() -> bool:
    """Whether this system can pin a process to CPUs (Linux can; macOS cannot)."""
    return hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")
