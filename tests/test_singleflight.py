"""cachefetch.singleflight.Group: the seed's singleflight cases, and more."""
from __future__ import annotations

import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import wait_until

from cachefetch.singleflight import Group, WaitTimeout

WAIT = 10.0  # seconds: an upper bound for things that should take microseconds


@pytest.fixture
def group():
    g = Group()
    yield g
    g.shutdown(wait=True)


class Runner:
    """Run ``group.do`` on threads, keeping each outcome."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.outcomes: dict[int, tuple[str, object]] = {}

    def start(self, group: Group, key, fn, timeout=None) -> int:
        i = len(self.threads)

        def run() -> None:
            try:
                self.outcomes[i] = ("value", group.do(key, fn, timeout))
            except BaseException as exc:
                self.outcomes[i] = ("error", exc)

        t = threading.Thread(target=run, name=f"caller-{i}")
        self.threads.append(t)
        t.start()
        return i

    def join(self) -> None:
        for t in self.threads:
            t.join(WAIT)
            assert not t.is_alive(), f"{t.name} is still waiting"


def test_one_call(group):
    calls = []

    def fn():
        calls.append(threading.current_thread().name)
        return "bar"

    assert group.do("key", fn) == ("bar", False)
    assert len(calls) == 1
    # fn ran on the group's executor, not on the caller's thread.
    assert calls[0] != threading.current_thread().name
    assert not group.in_flight("key")


def test_sequential_calls_each_run(group):
    counter = iter(range(10))
    assert group.do("k", lambda: next(counter)) == (0, False)
    assert group.do("k", lambda: next(counter)) == (1, False)


def test_concurrent_callers_share_one_call(group):
    n = 100
    release = threading.Event()
    calls = []
    result = object()

    def fn():
        calls.append(1)
        assert release.wait(WAIT)
        return result

    runner = Runner()
    try:
        for _ in range(n):
            runner.start(group, "key", fn)
        wait_until(lambda: group.callers("key") == n)  # all 100 joined the flight
    finally:
        release.set()
        runner.join()
    assert len(calls) == 1
    assert len(runner.outcomes) == n
    for kind, (value, shared) in runner.outcomes.values():
        assert kind == "value"
        assert value is result
        assert shared is True


def test_caller_timeout_raises_while_call_finishes_for_another_waiter(group):
    release, started = threading.Event(), threading.Event()
    calls = []

    def fn():
        calls.append(1)
        started.set()
        assert release.wait(WAIT)
        return "done"

    runner = Runner()
    try:
        patient = runner.start(group, "key", fn)  # no timeout
        assert started.wait(WAIT)  # the flight is registered before its call starts
        with pytest.raises(WaitTimeout) as info:
            group.do("key", fn, timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        assert group.in_flight("key")  # giving up did not cancel the call
    finally:
        release.set()
        runner.join()
    assert runner.outcomes[patient] == ("value", ("done", True))
    assert len(calls) == 1


def test_first_caller_timeout_does_not_cancel_the_call(group):
    release = threading.Event()
    finished = threading.Event()

    def fn():
        assert release.wait(WAIT)
        finished.set()
        return 42

    with pytest.raises(WaitTimeout):
        group.do("key", fn, timeout=0.01)
    assert not finished.is_set()
    release.set()
    assert finished.wait(WAIT)  # the call went on without any caller


def test_timeout_raised_by_the_call_is_not_a_wait_timeout(group):
    def fn():
        raise TimeoutError("upstream timed out")

    with pytest.raises(TimeoutError) as info:
        group.do("key", fn, timeout=WAIT)
    assert not isinstance(info.value, WaitTimeout)


def test_error_propagates_to_all_waiters(group):
    n = 10
    release = threading.Event()
    boom = ValueError("boom")

    def failing_fn():
        assert release.wait(WAIT)
        raise boom

    runner = Runner()
    try:
        for _ in range(n):
            runner.start(group, "key", failing_fn)
        wait_until(lambda: group.callers("key") == n)
    finally:
        release.set()
        runner.join()
    assert [runner.outcomes[i] for i in range(n)] == [("error", boom)] * n
    # The call's own traceback travels with it.
    frames = [f.name for f in traceback.extract_tb(boom.__traceback__)]
    assert "failing_fn" in frames


def test_forget_allows_a_retry(group):
    release, started = threading.Event(), threading.Event()
    boom = OSError("first attempt fails")

    def failing():
        started.set()
        assert release.wait(WAIT)
        raise boom

    runner = Runner()
    try:
        waiter = runner.start(group, "key", failing)
        assert started.wait(WAIT)
        group.forget("key")
        assert not group.in_flight("key")
        # While the failing call still runs, the next do() starts a new one.
        assert group.do("key", lambda: "retried") == ("retried", False)
    finally:
        release.set()
        runner.join()
    assert runner.outcomes[waiter] == ("error", boom)  # the old flight's waiter got its outcome
    # And after a failed flight the key is free: the next do() calls fn again.
    def fails_again():
        raise OSError("again")

    with pytest.raises(OSError):
        group.do("key", fails_again)
    assert group.do("key", lambda: "ok") == ("ok", False)


def test_old_flight_finishing_after_forget_leaves_the_new_flight_in_place(group):
    release_old, release_new = threading.Event(), threading.Event()
    old_started, new_started = threading.Event(), threading.Event()
    calls = []

    def old():
        calls.append("old")
        old_started.set()
        assert release_old.wait(WAIT)
        return "old"

    def new():
        calls.append("new")
        new_started.set()
        assert release_new.wait(WAIT)
        return "new"

    runner = Runner()
    try:
        a = runner.start(group, "key", old)
        assert old_started.wait(WAIT)
        group.forget("key")
        b = runner.start(group, "key", new)
        assert new_started.wait(WAIT)
        release_old.set()
        runner.threads[a].join(WAIT)
        assert runner.outcomes[a] == ("value", ("old", False))
        # The old flight ended; the new one must still be the key's flight.
        assert group.in_flight("key")
        c = runner.start(group, "key", lambda: calls.append("third"))
        wait_until(lambda: group.callers("key") == 2)
    finally:
        release_old.set()
        release_new.set()
        runner.join()
    assert calls == ["old", "new"]
    assert runner.outcomes[b] == runner.outcomes[c] == ("value", ("new", True))


def test_base_exception_reaches_the_waiter(group):
    class Cancelled(BaseException):
        pass

    def fn():
        raise Cancelled()

    with pytest.raises(Cancelled):
        group.do("key", fn)
    assert group.do("key", lambda: 1) == (1, False)  # the executor survived it


def test_different_keys_run_in_parallel(group):
    n = 8
    # Every call waits at the barrier for all the others: if calls of
    # different keys were serialised, the barrier would break.
    barrier = threading.Barrier(n, timeout=WAIT)

    def fn():
        return barrier.wait()

    runner = Runner()
    for i in range(n):
        runner.start(group, f"key-{i}", fn)
    runner.join()
    assert sorted(v[0] for _, v in runner.outcomes.values()) == list(range(n))
    assert all(kind == "value" and not v[1] for kind, v in runner.outcomes.values())


def test_a_flight_does_not_queue_behind_a_stuck_one(group):
    release, started = threading.Event(), threading.Event()

    def stuck():
        started.set()
        return release.wait(WAIT)

    runner = Runner()
    try:
        runner.start(group, "stuck", stuck)
        assert started.wait(WAIT)
        assert group.do("other", lambda: "fine", timeout=WAIT) == ("fine", False)
    finally:
        release.set()
        runner.join()


def test_given_executor_is_used_and_not_shut_down():
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="given") as executor:
        g = Group(executor)
        assert g.do("k", lambda: threading.current_thread().name)[0].startswith("given")
        g.shutdown()
        assert executor.submit(lambda: 5).result(WAIT) == 5


def test_argument_checks(group):
    with pytest.raises(TypeError):
        group.do("k", "not callable")
    with pytest.raises(TypeError):
        group.do(["unhashable"], lambda: 1)
    with pytest.raises(ValueError):
        group.do("k", lambda: 1, timeout=-1)
    with pytest.raises(TypeError):
        Group(executor="no")
    assert not group.in_flight("k")


def test_do_after_shutdown_raises_and_does_not_wedge_the_key():
    g = Group()
    g.shutdown()
    with pytest.raises(RuntimeError):
        g.do("k", lambda: 1)
    # A second caller must get the same error, not wait for a flight that never started.
    with pytest.raises(RuntimeError):
        g.do("k", lambda: 1, timeout=1.0)
    assert not g.in_flight("k")
