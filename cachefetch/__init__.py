"""cachefetch: a content-addressed cache with request coalescing for WSGI apps and HTTP upstreams."""

__version__ = "0.1.0"

from .middleware import CacheFetch  # noqa: E402

__all__ = ["CacheFetch", "__version__"]
