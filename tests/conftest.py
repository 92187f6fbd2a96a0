"""Shared pytest fixtures. Keep this file generic: helpers for one module's
tests belong in that module's test file."""
from __future__ import annotations

import os
import sys

import pytest

#: The repository root (the directory holding the ``cachefetch`` package).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Make ``import cachefetch`` work without an install (and in child processes
# started with PYTHONPATH=REPO_ROOT).
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from cachefetch.store import CAFS  # noqa: E402


@pytest.fixture
def store(tmp_path):
    """A fresh CAFS under the test's ``tmp_path``, with fsync on (the default)."""
    return CAFS(tmp_path / "store")
