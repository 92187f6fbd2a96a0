"""Former name of :mod:`cachefetch.flights` (kept for imports that use it)."""
from .flights import *  # noqa: F401,F403
from .flights import __all__  # noqa: F401
