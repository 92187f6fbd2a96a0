"""The WSGI middleware: :class:`CacheFetch`, one module per path.

``core`` carries out the policy's plan on one screen; ``hit``, ``leader``,
``follower``, ``revalidation`` and ``invalidation`` each own one path;
``keys`` says which resource a request names; ``context`` holds what they share.
"""
from .core import CacheFetch, close_all
from .keys import default_key

__all__ = ["CacheFetch", "default_key", "close_all"]
