"""gunicorn settings for serving a CacheFetch-wrapped app.

gthread workers: a cached hit is a short sendfile, and a follower mostly waits
on the leader's file, so many threads per worker are cheap.
"""
worker_class = "gthread"
workers = 2
threads = 32
bind = "127.0.0.1:8000"
# A follower may wait for the leader's first byte, and a detached fetch keeps
# running after its client left: give requests room before they are killed.
timeout = 120
graceful_timeout = 30


def worker_exit(server, worker):
    """Let queued commits land before the worker goes, so no fetched body is lost."""
    from cachefetch.middleware import close_all

    close_all()
