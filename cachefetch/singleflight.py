"""Duplicate call suppression, after Go's ``golang.org/x/sync/singleflight``.

Every :meth:`Group.do` for a key that already has a call in flight waits for
that call's outcome instead of starting another. The call itself runs on an
executor thread, never on a caller's, so each caller can wait with its own
timeout and give up alone while the call goes on for the others.
"""
from __future__ import annotations

import sys
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable, Generic, Hashable, TypeVar

__all__ = ["Group", "WaitTimeout"]

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """This caller's wait ran out; the call goes on for the others.

    A subclass of ``TimeoutError`` so it can be told apart from a
    ``TimeoutError`` raised by the call itself.
    """


class _Call(Generic[T]):
    """One flight: the event its waiters wait on, and its outcome."""

    __slots__ = ("done", "value", "error", "callers")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self.callers = 1


class Group(Generic[T]):
    """A set of keyed, deduplicated calls.

    :param executor: where calls run. By default the group owns a thread pool
        that starts a thread whenever none is idle, so a flight never queues
        behind unrelated ones. A given executor must have that property too.
    """

    def __init__(self, executor: Executor | None = None) -> None:
        if executor is not None and not isinstance(executor, Executor):
            raise TypeError(f"executor must be a concurrent.futures.Executor, not {type(executor).__name__}")
        self._owns_executor = executor is None
        # The pool only grows when no thread is idle, so this bound is never
        # reached in practice; it exists because ThreadPoolExecutor wants one.
        self._executor = executor or ThreadPoolExecutor(
            max_workers=sys.maxsize >> 32, thread_name_prefix="cachefetch-flight")
        self._lock = threading.Lock()
        self._calls: dict[Hashable, _Call[T]] = {}

    def do(self, key: Hashable, fn: Callable[[], T], timeout: float | None = None) -> tuple[T, bool]:
        """Run ``fn`` once for all concurrent callers with the same ``key``.

        :returns: ``(value, shared)``: ``shared`` is true when more than one
            caller took part in this flight.
        :raises WaitTimeout: if ``timeout`` seconds pass first (this caller only).
        :raises BaseException: whatever ``fn`` raised, in every caller.
        :raises TypeError: if ``key`` is unhashable or ``fn`` is not callable.
        :raises ValueError: if ``timeout`` is negative.
        """
        if not callable(fn):
            raise TypeError("fn must be callable")
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        hash(key)
        with self._lock:
            call = self._calls.get(key)
            if call is not None:
                call.callers += 1
            else:
                call = self._calls[key] = _Call()
                try:
                    self._executor.submit(self._run, key, call, fn)
                except BaseException:
                    # e.g. the executor is shut down: no flight started, so
                    # none may stay registered for later callers to wait on.
                    del self._calls[key]
                    raise
        if not call.done.wait(timeout):
            raise WaitTimeout(f"gave up waiting for {key!r} after {timeout}s")
        if call.error is not None:
            raise call.error
        return call.value, call.callers > 1  # type: ignore[return-value]

    def _run(self, key: Hashable, call: _Call[T], fn: Callable[[], T]) -> None:
        try:
            call.value = fn()
        except BaseException as exc:  # every waiter gets it, even SystemExit
            call.error = exc
        finally:
            with self._lock:
                # forget() may have replaced this flight with a newer one.
                if self._calls.get(key) is call:
                    del self._calls[key]
            call.done.set()

    def forget(self, key: Hashable) -> None:
        """Make the next :meth:`do` for ``key`` start a new call.

        Callers already waiting on the current flight still get its outcome.
        """
        with self._lock:
            self._calls.pop(key, None)

    def callers(self, key: Hashable) -> int:
        """How many callers the running flight for ``key`` has now (0 if none)."""
        with self._lock:
            call = self._calls.get(key)
            return call.callers if call is not None else 0

    def in_flight(self, key: Hashable) -> bool:
        """Whether a call for ``key`` is running now."""
        with self._lock:
            return key in self._calls

    def shutdown(self, wait: bool = True) -> None:
        """Stop the owned executor (a given one is left alone)."""
        if self._owns_executor:
            self._executor.shutdown(wait=wait)
