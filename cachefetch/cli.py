"""The ``cachefetch`` command: serve, stats, verify, gc.

Bad arguments get a one-line error and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sqlite3
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import affinity
from .layout import StoreLayout
from .maintenance import parse_size
from .worker import CachefetchWorker, leave_promptly

__all__ = ["main", "default_store_dir"]

log = logging.getLogger("cachefetch.cli")

#: serve's largest stored response when neither --max-object-size nor --max-size is given.
DEFAULT_MAX_OBJECT_SIZE = 8 << 30
UNLIMITED = "unlimited"


def default_store_dir() -> str:
    """``$XDG_CACHE_HOME/cachefetch``, or ``~/.cache/cachefetch``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cachefetch")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _bind(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _object_size(text: str) -> int | str:
    if text.strip().lower() == UNLIMITED:
        return UNLIMITED
    size = _size(text)
    if size == 0:
        raise argparse.ArgumentTypeError("0 would store nothing; to store any size, say 'unlimited'")
    return size


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0 seconds: {text}")
    return value


def _add_limit_arguments(serve: argparse.ArgumentParser) -> None:
    """serve's bounds on what one response and one client may cost."""
    serve.add_argument("--max-object-size", type=_object_size, default=None, metavar="SIZE|unlimited",
                       help="larger responses are passed through, not stored (default: 1/8 of --max-size, "
                            f"or {_human(DEFAULT_MAX_OBJECT_SIZE)} without it)")
    serve.add_argument("--header-timeout", type=_seconds, default=CachefetchWorker.header_timeout,
                       metavar="SECONDS", help="a client must send its whole request head within this "
                                               "(default: %(default)s)")
    serve.add_argument("--send-timeout", type=_seconds, default=CachefetchWorker.send_timeout, metavar="SECONDS",
                       help="a client that takes (or sends) no byte for this long is dropped "
                            "(default: %(default)s)")
    serve.add_argument("--fetch-timeout", type=_seconds, default=3600.0, metavar="SECONDS",
                       help="an upstream fetch may take this long in all, whoever reads it; then it is "
                            "cut and nothing stored (default: %(default)s)")
    serve.add_argument("--idle-timeout", type=_seconds, default=60.0, metavar="SECONDS",
                       help="an upstream fetch may go this long without a byte (default: %(default)s)")
    serve.add_argument("--worker-class", choices=("cachefetch", "gthread"), default="cachefetch",
                       help="cachefetch: gthread with the slow-client defences (default); gthread: "
                            "gunicorn's own, without them (for comparison)")
    serve.add_argument("--cpu-affinity", choices=("off", "auto"), default="off",
                       help="auto: pin each worker to a CPU of its own, as nginx's worker_cpu_affinity auto "
                            "(1.75x the small hits per second on a 2-core VM; Linux only); off: let the kernel "
                            "place them (default: %(default)s)")
    serve.add_argument("--cache-status", choices=("on", "off"), default="on",
                       help="off: answers carry no Cache-Status field, which tells any client whether the "
                            "cache held a URL (RFC 9211 section 6); the access log still has it "
                            "(default: %(default)s)")
    serve.add_argument("--graceful-timeout", type=_positive_int, default=4, metavar="SECONDS",
                       help="on SIGTERM, in-flight requests get half of this; the server is gone "
                            "within it (default: %(default)s)")


def max_object_size(args: argparse.Namespace) -> int | None:
    """``--max-object-size`` in bytes, ``None`` for "unlimited"; by default
    1/8 of ``--max-size``, or :data:`DEFAULT_MAX_OBJECT_SIZE` without one.

    :raises ValueError: if it exceeds ``--max-size`` (one object would evict all the rest).
    """
    size = args.max_object_size
    if size is None:
        return DEFAULT_MAX_OBJECT_SIZE if args.max_size is None else max(args.max_size // 8, 1)
    if size == UNLIMITED:
        return None
    if args.max_size is not None and size > args.max_size:
        raise ValueError(f"--max-object-size {_human(size)} exceeds --max-size {_human(args.max_size)}")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cachefetch", description="A content-addressed caching proxy with request coalescing.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the pull-through caching proxy")
    serve.add_argument("--upstream", default=None, help="origin base URL, e.g. https://pypi.org")
    serve.add_argument("--protocol", choices=("generic", "pypi", "npm", "oci"), default="generic")
    serve.add_argument("--store", default=default_store_dir(), help="store directory (default: %(default)s)")
    serve.add_argument("--bind", type=_bind, default="127.0.0.1:8080", help="HOST:PORT (default: %(default)s)")
    serve.add_argument("--workers", type=_positive_int, default=2)
    serve.add_argument("--threads", type=_positive_int, default=32)
    serve.add_argument("--max-size", type=_size, default=None, help="evict past this size, e.g. 20G")
    serve.add_argument("--files-upstream", action="append", default=None,
                       help="(pypi) another host files may come from; repeatable")
    serve.add_argument("--index-ttl", type=float, default=600, help="(pypi) seconds an index page is fresh")
    serve.add_argument("--negative-ttl", type=float, default=60, help="seconds an upstream 404 is remembered")
    serve.add_argument("--tag-ttl", type=float, default=300, help="(oci) seconds a manifest by tag is fresh")
    serve.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect upstream")
    serve.add_argument("--read-timeout", type=float, default=60.0, help="seconds to wait for each upstream read")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--access-log", default=None, metavar="FILE",
                       help="write an access log line per request to FILE ('-' for stderr); off by default")
    _add_limit_arguments(serve)

    _add_route_flags(serve)
    _add_fleet_flags(serve)

    for name, text in (("stats", "show what the store holds and how it was used"),
                       ("verify", "re-hash every blob and check the index"),
                       ("gc", "evict entries down to a size (S3-FIFO or LRU), purge expired ones")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--store", default=default_store_dir(), help="store directory (default: %(default)s)")
        if name == "stats":
            p.add_argument("--json", action="store_true", help="print JSON")
        if name == "verify":
            p.add_argument("--repair", action="store_true", help="remove what is damaged")
        if name == "gc":
            from .eviction.policy import DEFAULT_POLICY, POLICIES

            p.add_argument("--max-size", type=_size, required=True,
                           help="target size, e.g. 20G (the index's own file counts)")
            p.add_argument("--policy", choices=sorted(POLICIES), default=DEFAULT_POLICY,
                           help="eviction order (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return _serve(args)
        if not os.path.isdir(StoreLayout.at(args.store).blobs_dir):
            print(f"cachefetch: error: no store at {args.store} (no blobs/ directory)", file=sys.stderr)
            return 2
        return {"stats": _stats, "verify": _verify, "gc": _gc}[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        print(f"cachefetch: error: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:  # e.g. index.sqlite3 is not a database
        print(f"cachefetch: error: cannot use the index in {args.store}: {exc}", file=sys.stderr)
        return 2


# -- serve -------------------------------------------------------------------

def _default_ttl(text: str) -> float | str | None:
    if text == "forever":
        return text
    if text == "rfc":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SECONDS or 'forever', got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _add_route_flags(serve: argparse.ArgumentParser) -> None:
    """serve's flags for what is proxied and how (routes, methods, freshness)."""
    serve.add_argument("--config", default=None, metavar="FILE",
                       help="TOML file of [[route]] prefix/protocol/upstream entries (instead of --upstream)")
    serve.add_argument("--read-only", action="store_true", help="refuse every method but GET and HEAD (405)")
    serve.add_argument("--default-ttl", type=_default_ttl, default=None, metavar="SECONDS|forever|rfc",
                       help="freshness of an answer that states none; rfc: RFC 9111 heuristics and "
                            "revalidation (default: %(default)s)")
    serve.add_argument("--packument-ttl", type=float, default=300, help="(npm) seconds a packument is fresh")


def _route_options(args: argparse.Namespace) -> dict[str, Any]:
    """create_app's keyword arguments for serve's route flags.

    :raises ValueError: for --config with --upstream, neither, or a bad file.
    """
    if (args.config is None) == (args.upstream is None):
        raise ValueError("give --upstream URL or --config FILE (one of them)")
    options: dict[str, Any] = dict(read_only=args.read_only, default_ttl=args.default_ttl,
                                   packument_ttl=args.packument_ttl)
    if args.config is not None:
        from .config import load_config

        options["routes"] = load_config(args.config)
    return options

def _add_fleet_flags(serve: argparse.ArgumentParser) -> None:
    """serve's flags for joining a fleet of hosts through Redis."""
    serve.add_argument("--fleet", default=None, metavar="URL",
                       help="join the fleet on this Redis (redis://[:password@]host:port/db or rediss://)")
    serve.add_argument("--fleet-secret-file", default=None, metavar="FILE",
                       help="file holding the fleet's shared secret (at least 16 bytes)")
    serve.add_argument("--advertise", default=None, metavar="URL",
                       help="this host's base URL as the other hosts reach it, e.g. http://10.0.0.5:8080")
    serve.add_argument("--fleet-lease-ms", type=_positive_int, default=5000, metavar="MS",
                       help="a flight's lease: a dead leader is replaced after this (default: %(default)s)")


def _fleet_factory(args: argparse.Namespace) -> Callable[[], Any]:
    """A function making the fleet of --fleet (one per process), or ``None`` each time without it.

    :raises ValueError: for a fleet flag without --fleet, or --fleet without its secret or address.
    """
    if args.fleet is None:
        if args.fleet_secret_file is not None or args.advertise is not None:
            raise ValueError("--fleet-secret-file and --advertise need --fleet")
        return lambda: None
    if args.fleet_secret_file is None or args.advertise is None:
        raise ValueError("--fleet needs --fleet-secret-file and --advertise")
    with open(args.fleet_secret_file, "rb") as f:
        secret = f.read().strip()

    def make() -> Any:
        from .fleet import Fleet  # not before serve has set up prometheus_client's multi-process mode

        return Fleet.from_url(args.fleet, secret=secret, advertise=args.advertise, lease_ms=args.fleet_lease_ms)

    return make


def _serve(args: argparse.Namespace) -> int:
    store_dir = os.path.abspath(args.store)
    object_limit = max_object_size(args)
    fleet = _fleet_factory(args)
    settings = _gunicorn_settings(args)  # before the store is touched: a bad option fails first
    # Before prometheus_client is first imported: it picks multi-process mode then.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = StoreLayout.at(store_dir).metrics_dir
    _start_metrics(store_dir)

    from .proxy import create_app

    options = dict(files_upstreams=args.files_upstream, index_ttl=args.index_ttl, tag_ttl=args.tag_ttl,
                   negative_ttl=args.negative_ttl, threads=args.threads,
                   connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
                   max_object_size=object_limit, fetch_timeout=args.fetch_timeout,
                   idle_timeout=args.idle_timeout, cache_status=args.cache_status == "on",
                   **_route_options(args))
    # Build one app now, in the arbiter, so bad options fail before any worker starts.
    create_app(args.upstream, store_dir, args.protocol, fleet=fleet(), **options).close()
    from gunicorn.app.base import BaseApplication

    def load() -> Any:
        app = create_app(args.upstream, store_dir, args.protocol, fleet=fleet(), **options)
        if args.max_size is not None:
            from .maintenance import SizeLimiter

            SizeLimiter(app.cached.store, app.index, args.max_size).start()
        return app

    class Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in settings.items():
                if key in self.cfg.settings:  # older gunicorns lack some
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return load()

    what = f"{args.upstream} ({args.protocol})" if args.config is None else f"the routes of {args.config}"
    print(f"cachefetch: serving {what} on http://{args.bind}/ from {store_dir}", file=sys.stderr)
    Server().run()
    return 0


#: Apache's combined format, then the Cache-Status (from the environ: the
#: answer may not carry it, see --cache-status) and the request's duration.
ACCESS_LOG_FORMAT = ('%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" '
                     '"%({cachefetch.cache_status}e)s" %(M)sms')


def _gunicorn_settings(args: argparse.Namespace) -> dict[str, Any]:
    """gunicorn's configuration for ``serve``: our gthread worker with its
    client timeouts, the access log, the exit hooks, and the CPU affinity hooks if asked."""
    pinning = {}
    if args.cpu_affinity == "auto":
        if not affinity.supported():
            raise ValueError("--cpu-affinity auto needs a system that can pin processes to CPUs (Linux)")
        pinning = {"pre_fork": affinity.assign_cpu, "post_fork": affinity.pin_to_cpu}
    return {
        "bind": [args.bind], "workers": args.workers, "threads": args.threads,
        "worker_class": (CachefetchWorker.configured(header_timeout=args.header_timeout,
                                                     send_timeout=args.send_timeout)
                         if args.worker_class == "cachefetch" else "gthread"),
        # The arbiter kills a worker still there after graceful_timeout; ours leave by 3/4 of it.
        "timeout": 120, "graceful_timeout": args.graceful_timeout,
        # A line per request costs a third of a hit's CPU: opt in.
        "loglevel": args.log_level, "accesslog": args.access_log, "access_log_format": ACCESS_LOG_FORMAT,
        "worker_exit": _worker_exit, "child_exit": _child_exit,
        # gunicorn's control socket would live in ~/.gunicorn, shared by every server.
        "control_socket_disable": True,
        **pinning,
    }


def _worker_exit(server: Any, worker: Any) -> None:
    from .middleware import close_all

    close_all()
    leave_promptly(worker)


def _child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


# -- request counters across runs ----------------------------------------------
# The running server's counters are prometheus_client's multi-process files in
# <store>/metrics (summed over workers); a start folds the last run's into
# <store>/request-totals.json, then begins a new directory. The run id written
# in each directory makes the fold happen once even if a start dies half-way.

@dataclass
class RequestTotals:
    """Requests by outcome of the runs folded so far, and the last run folded."""

    requests: dict[str, int] = field(default_factory=dict)
    folded: str | None = None

    def add(self, counts: dict[str, float]) -> None:
        for outcome, n in counts.items():
            self.requests[outcome] = self.requests.get(outcome, 0) + int(n)


def _start_metrics(store_dir: str) -> None:
    """Fold the last run's request counters into the store's totals and
    start an empty metrics directory for this run.

    :raises OSError: if the store's directory cannot hold them.
    """
    layout = StoreLayout.at(store_dir)
    metrics_dir = layout.metrics_dir
    if os.path.isdir(metrics_dir):
        totals = _load_totals(store_dir)
        run = _run_id(store_dir)
        if run is None or run != totals.folded:
            totals.add(_run_counts(metrics_dir))
            totals.folded = run
            _save_totals(store_dir, totals)
        shutil.rmtree(metrics_dir)
    os.makedirs(metrics_dir)
    with open(layout.metrics_run_id_path, "w") as f:
        f.write(uuid.uuid4().hex)


def _run_id(store_dir: str) -> str | None:
    try:
        with open(StoreLayout.at(store_dir).metrics_run_id_path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _load_totals(store_dir: str) -> RequestTotals:
    path = StoreLayout.at(store_dir).request_totals_path
    try:
        with open(path) as f:
            data = json.load(f)
        requests = data["requests"]
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in requests.items()):
            raise ValueError("not counts")
        return RequestTotals(dict(requests), data.get("folded"))
    except FileNotFoundError:
        return RequestTotals()
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        log.warning("%s is damaged; request totals start again from 0", path)
        return RequestTotals()


def _save_totals(store_dir: str, totals: RequestTotals) -> None:
    path = StoreLayout.at(store_dir).request_totals_path
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"requests": totals.requests, "folded": totals.folded}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _run_counts(metrics_dir: str) -> dict[str, float]:
    """Requests by outcome in one run's metrics directory."""
    if not os.path.isdir(metrics_dir) or not any(name.endswith(".db") for name in os.listdir(metrics_dir)):
        return {}
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    counts: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "cachefetch_requests_total":
                counts[sample.labels["outcome"]] = counts.get(sample.labels["outcome"], 0) + sample.value
    return counts


def _request_counts(store_dir: str) -> dict[str, float]:
    """Requests by outcome over every run on this store."""
    totals = _load_totals(store_dir)
    counts: dict[str, float] = dict(totals.requests)
    if totals.folded is None or _run_id(store_dir) != totals.folded:  # else folded, not yet wiped
        for outcome, n in _run_counts(StoreLayout.at(store_dir).metrics_dir).items():
            counts[outcome] = counts.get(outcome, 0) + n
    return counts


# -- stats / verify / gc -----------------------------------------------------

def _open(store_dir: str, heal: bool = True):
    """The store and its index; with ``heal``, a damaged index is moved aside and rebuilt."""
    from .index import SQLiteIndex
    from .store import CAFS

    store = CAFS(store_dir)
    return store, SQLiteIndex(store.layout.index_path, heal=heal)


def _stats(args: argparse.Namespace) -> int:
    # The index's running totals: no walk of the store, whatever its size.
    store, index = _open(args.store, heal=False)  # stats only looks
    usage = index.usage()
    counts = _request_counts(store.root)
    data = {"store": store.root, "entries": usage.entries, "blobs": usage.blobs,
            "bytes": usage.blob_bytes + usage.orphan_bytes, "index_bytes": usage.index_bytes + usage.wal_bytes,
            "hits": int(counts.get("hit", 0)), "misses": int(counts.get("miss", 0)),
            "collapsed": int(counts.get("collapsed", 0)), "stale": int(counts.get("stale", 0))}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    width = max(map(len, data))
    for name, value in data.items():
        shown = _human(value) if name.endswith("bytes") else value
        print(f"{name:<{width}}  {shown}")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _verify(args: argparse.Namespace) -> int:
    from .maintenance import verify_store

    store, index = _open(args.store, heal=args.repair)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int, nbytes: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        line = f"\rverifying [{'#' * filled}{'.' * (width - filled)}] {done}/{total} blobs, {_human(nbytes)}"
        if tty or done == total:
            sys.stderr.write(line + ("\n" if done == total else ""))
            sys.stderr.flush()

    report = verify_store(store, index, repair=args.repair, progress=progress)
    verb = "removed" if args.repair else "found"
    print(f"checked {report.blobs_checked} blobs ({_human(report.bytes_checked)})")
    for h in report.corrupt_blobs:
        print(f"corrupt blob {h.hex} ({verb})")
    for key, _variant, h in report.missing_blob_entries:
        print(f"entry {key} points at missing blob {h.hex} ({verb})")
    for path in report.orphan_files:
        print(f"cleared orphan {path}")
    if index.rebuilt_from is not None:
        print(f"damaged index moved aside to {index.rebuilt_from} and rebuilt empty (its blobs stay for gc)")
        return 1
    if report.damaged:
        print(f"damage {verb}: {len(report.corrupt_blobs)} corrupt blobs, "
              f"{len(report.missing_blob_entries)} entries without a blob")
        return 1
    print("store is sound")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from .maintenance import collect_garbage

    store, index = _open(args.store)
    # By hand, walk the store too: it finds blobs a crash left without an entry.
    report = collect_garbage(store, index, args.max_size, policy=args.policy, sweep=True)
    print(f"{_human(report.before)} -> {_human(report.after)} ({report.policy}): "
          f"{report.evicted_entries} entries evicted, {report.expired_entries} expired purged, "
          f"{report.removed_blobs} blobs removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
