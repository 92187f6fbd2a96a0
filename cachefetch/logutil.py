"""Logging helpers shared by the modules that meet a full disk."""
from __future__ import annotations

import logging
import threading
import time

__all__ = ["warn_limited"]

_last: dict[str, float] = {}
_lock = threading.Lock()


def warn_limited(logger: logging.Logger, topic: str, message: str, *args: object, every: float = 60.0) -> None:
    """Log ``message`` as a warning at most once per ``every`` seconds per ``topic``
    (a full disk fails every write: one line a minute says it, thousands would bury it).
    Repeats in between go to debug."""
    now = time.monotonic()
    with _lock:
        due = now - _last.get(topic, -every) >= every
        if due:
            _last[topic] = now
    logger.log(logging.WARNING if due else logging.DEBUG, message, *args)
