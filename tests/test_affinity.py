"""One CPU per worker: ``cachefetch serve --cpu-affinity auto`` and the
gunicorn hooks behind it (``cachefetch.affinity``), on real gunicorn servers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from harness import REPO_ROOT, cachefetch_serve, fetch, free_port, gunicorn, run_cli, wait_until
from origin import Origin, Resource

from cachefetch.affinity import choose_cpu

ALLOWED = sorted(os.sched_getaffinity(0))


# -- choose_cpu ----------------------------------------------------------------

def test_choose_cpu_takes_a_free_cpu_then_the_least_loaded_lowest_first():
    assert choose_cpu({2, 0, 1}, []) == 0
    assert choose_cpu({0, 1, 2}, [0]) == 1
    assert choose_cpu({0, 1, 2}, [0, 1]) == 2
    assert choose_cpu({0, 1, 2}, [0, 1, 2]) == 0          # every CPU has one: share the lowest
    assert choose_cpu({0, 1, 2}, [0, 1, 2, 0, 2]) == 1    # the one fewest share
    assert choose_cpu({0, 1}, [1, 1, 5, 5, 5]) == 0       # a CPU no longer allowed counts for nothing


def test_choose_cpu_refuses_an_empty_set():
    with pytest.raises(ValueError, match="no CPU"):
        choose_cpu([], [0])


# -- real servers --------------------------------------------------------------

def _pins(server, workers: int) -> list[frozenset[int]]:
    """Each worker's CPUs, once ``workers`` workers run and each is pinned to one."""
    def pinned():
        pids = server.worker_pids()
        if len(pids) != workers:
            return None
        try:
            masks = [frozenset(os.sched_getaffinity(pid)) for pid in pids]
        except ProcessLookupError:  # a worker ended between ps and the call
            return None
        return masks if all(len(m) == 1 for m in masks) else None

    return wait_until(pinned, what=f"{workers} workers, each pinned to one CPU")


def _assert_spread(masks: list[frozenset[int]]) -> None:
    """Every worker on one allowed CPU, no CPU with two more workers than another."""
    load = Counter(cpu for mask in masks for cpu in mask)
    assert set(load) <= set(ALLOWED)
    counts = [load[cpu] for cpu in ALLOWED]
    assert max(counts) - min(counts) <= 1, load


def test_serve_pins_each_worker_to_its_own_cpu_and_a_replacement_takes_the_freed_one(tmp_path):
    workers = len(ALLOWED) + 1  # one CPU must take two: the spread is checked, not only distinctness
    with Origin() as origin:
        origin.files["/a"] = Resource(b"pinned", headers={"Cache-Control": "max-age=60"})
        with cachefetch_serve(tmp_path, "--upstream", origin.url, "--store", str(tmp_path / "store"),
                              "--workers", str(workers), "--threads", "4", "--cpu-affinity", "auto") as server:
            masks = _pins(server, workers)
            _assert_spread(masks)
            assert fetch(server.port, "/a").body == b"pinned"

            # The worker alone on the highest CPU: its replacement must go there, not to the lowest.
            load = Counter(cpu for m in masks for cpu in m)
            victim = next(pid for pid in server.worker_pids() if os.sched_getaffinity(pid) == {ALLOWED[-1]})
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: victim not in server.worker_pids(), what="the killed worker to be reaped")
            masks = _pins(server, workers)
            assert Counter(cpu for m in masks for cpu in m) == load
            assert fetch(server.port, "/a").body == b"pinned"


def test_serve_leaves_workers_unpinned_by_default(tmp_path):
    with Origin() as origin:
        with cachefetch_serve(tmp_path, "--upstream", origin.url, "--store", str(tmp_path / "store"),
                              "--workers", "2", "--threads", "2") as server:
            wait_until(lambda: len(server.worker_pids()) == 2, what="two workers")
            assert [sorted(os.sched_getaffinity(pid)) for pid in server.worker_pids()] == [ALLOWED, ALLOWED]


def test_serve_rejects_an_unknown_affinity_with_a_clear_error(tmp_path):
    done = run_cli("serve", "--upstream", "http://127.0.0.1:9", "--store", str(tmp_path / "store"),
                   "--cpu-affinity", "all")
    assert done.returncode == 2
    assert "--cpu-affinity: invalid choice: 'all'" in done.stderr
    assert not (tmp_path / "store").exists()


def test_the_hooks_pin_a_plain_gunicorn_serving_the_middleware(tmp_path):
    """The README's recipe: the two hooks in a gunicorn config file of one's own."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text("from cachefetch.affinity import assign_cpu as pre_fork, pin_to_cpu as post_fork\n")
    workers = len(ALLOWED)
    version = tmp_path / "version"
    version.write_text("1")
    with gunicorn("hot_wsgi:application", tmp_path, workers=workers, threads=4, config=str(config),
                  env={"CF_TEST_STORE": str(tmp_path / "store"), "CF_TEST_VERSION": str(version)}) as server:
        masks = _pins(server, workers)
        assert sorted(cpu for m in masks for cpu in m) == ALLOWED  # one worker per CPU
        assert fetch(server.port, "/v").body.startswith(b"version=1")


def test_serve_refuses_auto_where_processes_cannot_be_pinned(tmp_path):
    """Where the system has no CPU affinity calls (macOS), ``auto`` is refused
    before the store is made. The missing call is the edge faked here, in a
    child process, so a regression that goes on to serve times out, not hangs."""
    store = tmp_path / "store"
    code = ("import os, sys; del os.sched_setaffinity; from cachefetch.cli import main; "
            f"sys.exit(main(['serve', '--upstream', 'http://127.0.0.1:9', '--store', {str(store)!r}, "
            f"'--bind', '127.0.0.1:{free_port()}', '--cpu-affinity', 'auto']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert done.returncode == 2, done.stderr
    assert "--cpu-affinity auto needs a system that can pin processes to CPUs" in done.stderr
    assert not store.exists()
