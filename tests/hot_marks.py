"""Test-only instruments around a CacheFetch that gunicorn serves (for
``hot_wsgi`` and ``hot_large_wsgi``): ``X-Hot: 1`` marks an answer the hot
table gave, and ``X-Worker`` names the worker process that answered. Both
are added outside the cache, so neither is ever stored."""
import os


def instrumented(cached):
    """The WSGI app serving ``cached`` (a CacheFetch) with both marks; marks
    its hot table's answers (replacing ``cached.hot.serve``)."""
    serve = cached.hot.serve

    def marked_serve(environ, start_response, key):
        def start(status, headers, exc_info=None):
            return start_response(status, [*headers, ("X-Hot", "1")], exc_info)

        return serve(environ, start, key)

    cached.hot.serve = marked_serve

    def application(environ, start_response):
        def start(status, headers, exc_info=None):
            return start_response(status, [*headers, ("X-Worker", str(os.getpid()))], exc_info)

        return cached(environ, start)

    return application
