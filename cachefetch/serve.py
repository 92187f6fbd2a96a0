"""The seed's ``serve_from_store`` contract; the code lives in :mod:`cachefetch.replay`."""
from .replay import ServeOptions, etag_for, serve_blob_file, serve_from_store  # noqa: F401
from .wsgi import StartResponse, WSGIEnviron, normalize_headers, plain_response  # noqa: F401

__all__ = ["ServeOptions", "serve_from_store", "serve_blob_file", "etag_for", "normalize_headers", "plain_response"]
