"""500 hostile requests against a running `cachefetch serve` (generic protocol),
sent over raw sockets: path traversal in every encoding, NUL and control
bytes, 64 KiB headers, malformed Range and If-None-Match, absurd methods,
bad digests and very long paths.

No answer may be a 5xx, the origin must never see a path outside its base,
no file may appear outside the store, and the server must still serve."""
from __future__ import annotations

import os
import random
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

from werkzeug.test import Client

from harness import cachefetch_serve, fetch
from origin import Origin, Resource

from cachefetch.serve import serve_from_store

BASE = "/base"
FILES = {"/a.txt": b"alpha\n" * 1000, "/dir/b.bin": os.urandom(50_000), "/c.txt": b"gamma\n"}
SECRET = b"the origin's secret, outside the proxied base path"
N_REQUESTS = 500


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> tuple[int | None, bytes]:
    """Send ``data`` on a fresh connection, half-close, read until the server
    closes. Returns (status or None if no status line came, the raw answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server may close on us while we are still sending a huge header
            pass
        chunks = []
        try:
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
    answer = b"".join(chunks)
    first = answer.split(b"\r\n", 1)[0].split()
    if len(first) >= 2 and first[0].startswith(b"HTTP/") and first[1].isdigit():
        return int(first[1]), answer
    return None, answer


def req(target: str | bytes, method: bytes = b"GET", headers: list[tuple[bytes, bytes]] = (),
        version: bytes = b"HTTP/1.1", body: bytes = b"") -> bytes:
    if isinstance(target, str):
        target = target.encode("latin-1")
    lines = [method + b" " + target + b" " + version, b"Host: 127.0.0.1", b"Connection: close"]
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


TRAVERSALS = [
    "/../secret.txt", "/a/../../secret.txt", "/%2e%2e/secret.txt", "/%2E%2e%2fsecret.txt", "/%2e%2E/%2e%2e/secret.txt",
    "/.%2e/secret.txt", "/%2e./secret.txt", "/..%2fsecret.txt", "/..%2Fsecret.txt", "/..%5csecret.txt",
    "/..%5Csecret.txt", "/..\\secret.txt", "/%252e%252e/secret.txt", "/%252e%252e%252fsecret.txt",
    "/./a.txt", "/%2e/a.txt", "//..//secret.txt", "/a.txt/..", "/a.txt/%2e%2e", "/%c0%ae%c0%ae/secret.txt",
    "/%e0%80%ae%e0%80%ae/secret.txt", "/%u002e%u002e/secret.txt", "/..;/secret.txt", "/%2e%2e;/secret.txt",
    "/..;jsessionid=1/secret.txt", "/.../secret.txt", "/..%20/secret.txt", "/..%09/secret.txt",
    "/.%00./secret.txt", "/..%00/secret.txt", "/dir/..%2f..%2fsecret.txt", "/dir/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/%ef%bc%8e%ef%bc%8e/secret.txt", "/a.txt?x=../../secret.txt", "/..?", "/%2e%2e", "/..",
    "http://127.0.0.1/../secret.txt", "http://127.0.0.1/%2e%2e/secret.txt", "*", "..", "../secret.txt",
    "secret.txt", "%2e%2e/secret.txt", "/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/dir/b.bin/../../../../../../etc/passwd", "/" + "../" * 50 + "etc/passwd",
    "/" + "%2e%2e/" * 50 + "etc/passwd", "/" + "%2e%2e%2f" * 50 + "etc%2fpasswd",
]

NULS_AND_CONTROLS = [
    "/a.txt%00", "/a.txt%00.jpg", "/%00", "/%00/..", "/a%01b", "/a%7fb", "/a%0d%0aSet-Cookie:%20x=1",
    "/a%0aX-Injected:%201", "/a%0d", "/%ff%fe", "/%80", "/a.txt?%00", "/a.txt?x=%0d%0aX:1",
    b"/a\x00b", b"/a\x01b", b"/a\x7fb", b"/a\tb", b"/a\x0bb", b"/a\x1bb", b"/\xff\xfe", b"/a.txt?\x00",
    b"/a.txt?x y", b"/a b", b"/a\rb",
]

RANGES = [
    b"bytes=abc", b"bytes=-", b"bytes=5-1", b"bytes=--1", b"bytes=1-2-3", b"bytes=99999999999999999999999-",
    b"bytes=0-0,", b"items=0-1", b"bytes=-0", b"bytes= 0-1", b"bytes=0-1,2-3", b"bytes=18446744073709551616-",
    b"bytes=-18446744073709551616", b"bytes=0-18446744073709551616", b"bytes=1e3-2e3", b"bytes=0x10-0x20",
    b"bytes=\xff-\xfe", b"bytes", b"=", b"", b"bytes=0-1" + b",0-1" * 2000, b"bytes=-1-", b"bytes=+1-2",
    b"bytes=1- 2", b"bytes=0--1", b"BYTES=0-1", b"bytes=\x00-1", b"bytes=6000-", b"bytes=5999-6000",
]

ETAGS = [
    b'"', b"W/", b"*", b'"a", W/"b"', b",,,,", b'"\x01"', b'W/W/"x"', b'"' * 1000, b"W/" * 1000, b'"a"b"c"',
    b"\xff\xfe", b'"' + b"a" * 60_000 + b'"', b'*, "x"', b"W/*", b'"abc', b'abc"', b"\x00",
]

METHODS = [
    b"FOO", b"PROPFIND", b"PROPPATCH", b"MKCOL", b"TRACE", b"OPTIONS", b"DELETE", b"PUT", b"POST", b"PATCH",
    b"CONNECT", b"get", b"Get", b"GET\x00", b"G ET", b"A" * 1000, b"A" * 40, b"GE\x7fT", b"\xffGET", b"-",
    b"", b"HEAD\t", b"GETGETGETGETGET",
]

FILE_PATHS = [
    "/-/files/127.0.0.1:1/zzz/x.whl", "/-/files/%2e%2e/x", "/-/files/h/" + "0" * 64 + "/../../etc/passwd",
    "/-/files/", "/-/files", "/-/files/h/" + "0" * 63 + "/x", "/-/files/h/" + "g" * 64 + "/x",
    "/-/files/evil.example/" + "0" * 64 + "/x", "/-/files/%00/" + "0" * 64 + "/x", "/-/metricsX",
    "/-/healthz/..", "/-/healthz%00", "/-/../secret.txt", "/-/files/h/" + "0" * 64 + "/%2e%2e/secret.txt",
    "/v2/x/blobs/sha256:" + "z" * 64, "/v2/../blobs/sha256:" + "0" * 64, "/simple/%2e%2e/",
]

LONG = [
    "/" + "a" * 4000, "/" + "a" * 5000, "/" + "a" * 10_000, "/" + "a/" * 2000, "/" + "%2e%2e/" * 1000,
    "/a.txt?" + "q" * 8000, "/" + "%41" * 1300, "/" + "a" * 255 + "/" + "b" * 255,
]


def build_requests(origin_port: int) -> list[tuple[str, bytes]]:
    rnd = random.Random(4)  # a fixed seed: the same 500 requests every run
    out: list[tuple[str, bytes]] = []

    def add(label: str, data: bytes) -> None:
        out.append((label, data))

    for t in TRAVERSALS:
        add(f"traversal {t!r}", req(t))
        add(f"traversal HEAD {t!r}", req(t, method=b"HEAD"))
    add("absolute-form to the origin itself",
        req(f"http://127.0.0.1:{origin_port}/secret.txt"))
    add("absolute-form traversal", req(f"http://127.0.0.1:{origin_port}/../secret.txt"))
    for t in NULS_AND_CONTROLS:
        add(f"control {t!r}", req(t))
    for name in (b"X-Big", b"Accept", b"Range", b"If-None-Match", b"Cookie", b"Authorization", b"Host",
                 b"Cache-Control", b"If-Range", b"User-Agent"):
        add(f"64 KiB {name!r}", req("/a.txt", headers=[(name, b"a" * 65536)]))
    add("64 KiB of headers", req("/a.txt", headers=[(b"X-H%d" % i, b"v" * 600) for i in range(110)]))
    add("200 small headers", req("/a.txt", headers=[(b"X-H%d" % i, b"v") for i in range(200)]))
    add("header without colon", req("/a.txt", headers=[(b"NoColon", b"")]).replace(b"NoColon: ", b"NoColon"))
    add("space before colon", req("/a.txt").replace(b"Connection: close", b"Connection : close"))
    add("obs-fold", req("/a.txt", headers=[(b"X-A", b"1\r\n continued")]))
    add("two Content-Length", req("/a.txt", headers=[(b"Content-Length", b"1"), (b"Content-Length", b"2")]))
    add("chunked garbage", req("/a.txt", method=b"POST", headers=[(b"Transfer-Encoding", b"chunked")],
                               body=b"zz\r\nxx\r\n"))
    add("CL and TE", req("/a.txt", headers=[(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
                         body=b"0\r\n\r\n"))
    add("negative Content-Length", req("/a.txt", headers=[(b"Content-Length", b"-1")]))
    add("huge Content-Length", req("/a.txt", headers=[(b"Content-Length", b"9" * 40)]))
    add("Accept with control bytes", req("/c.txt", headers=[(b"Accept", b"text/\x01plain\x7f")]))
    add("Accept with latin-1", req("/c.txt", headers=[(b"Accept", b"\xe9\xff")]))
    add("Accept with NUL", req("/c.txt", headers=[(b"Accept", b"a\x00b")]))
    add("Host with NUL", req("/c.txt").replace(b"Host: 127.0.0.1", b"Host: a\x00b"))
    add("Host with slash", req("/c.txt").replace(b"Host: 127.0.0.1", b"Host: evil.example/../x"))
    add("Host with userinfo", req("/c.txt").replace(b"Host: 127.0.0.1", b"Host: a@evil.example:99999"))
    add("no Host", req("/c.txt").replace(b"Host: 127.0.0.1\r\n", b""))
    add("two Hosts", req("/c.txt", headers=[(b"Host", b"evil.example")]))
    add("Cache-Control garbage", req("/c.txt", headers=[(b"Cache-Control", b"max-age=-1, no-cache=\"\x01, ===")]))
    add("Pragma no-cache", req("/c.txt", headers=[(b"Pragma", b"no-cache")]))
    add("HTTP/9.9", req("/a.txt", version=b"HTTP/9.9"))
    add("HTTP/0.9", b"GET /a.txt\r\n\r\n")
    add("HTTP/1.0", req("/a.txt", version=b"HTTP/1.0"))
    add("no version", b"GET /a.txt \r\n\r\n")
    add("garbage line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200))
    add("bare LF", b"GET /a.txt HTTP/1.1\nHost: x\nConnection: close\n\n")
    add("empty", b"")
    add("only CRLFs", b"\r\n" * 100)
    add("truncated request line", b"GET /a.t")
    add("truncated headers", b"GET /a.txt HTTP/1.1\r\nHost: x\r\nX-A: 1")
    for r in RANGES:
        add(f"Range {r[:40]!r}", req("/a.txt", headers=[(b"Range", r)]))
        add(f"Range+If-Range {r[:40]!r}", req("/a.txt", headers=[(b"Range", r), (b"If-Range", b'W/"x"')]))
    for e in ETAGS:
        add(f"If-None-Match {e[:40]!r}", req("/a.txt", headers=[(b"If-None-Match", e)]))
        add(f"If-Range {e[:40]!r}", req("/a.txt", headers=[(b"Range", b"bytes=0-1"), (b"If-Range", e)]))
    for m in METHODS:
        add(f"method {m[:40]!r}", req("/a.txt", method=m))
        add(f"method {m[:40]!r} with body", req("/a.txt", method=m, headers=[(b"Content-Length", b"4")], body=b"body"))
    for p in FILE_PATHS:
        add(f"files path {p!r}", req(p))
    for p in LONG:
        add(f"long path {len(p)}", req(p))
    # Fill up to N_REQUESTS with random mixtures of the above ingredients.
    pieces = ["..", "%2e%2e", "%2E%2e%2f", "%00", "%2f", "%5c", "a.txt", "dir", ".", "%2e", "%252e", ";", "%0d%0a",
              "%ff", "~", "%", "%zz", "?", "#", "@", "//"]
    while len(out) < N_REQUESTS:
        path = "/" + "/".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 6)))
        headers = []
        if rnd.random() < 0.3:
            headers.append((b"Range", rnd.choice(RANGES)[:200]))
        if rnd.random() < 0.3:
            headers.append((b"If-None-Match", rnd.choice(ETAGS)[:200]))
        method = rnd.choice([b"GET", b"GET", b"HEAD", rnd.choice(METHODS)])
        add(f"random {method[:20]!r} {path!r}", req(path, method=method, headers=headers))
    return out[:N_REQUESTS]


def escapes_base(target: str) -> bool:
    """Whether a request target the origin received is outside /base or climbs."""
    path = target.split("?", 1)[0]
    if not (path == BASE or path.startswith(BASE + "/")):
        return True
    if ".." in path:
        return True
    for decoded in (unquote(path),):
        if "\\" in decoded or "\0" in decoded:
            return True
        for segment in decoded.split("/"):
            # dot segments, and their disguises: "..;params", "...", ".. " (servers that trim)
            head = segment.split(";", 1)[0].strip()
            if head and head.strip(".") == "":
                return True
    return False


def snapshot(root, skip) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.abspath(dirpath) == os.path.abspath(skip):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if os.path.abspath(os.path.join(dirpath, d)) != os.path.abspath(skip)]
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def test_500_hostile_requests(tmp_path):
    store = tmp_path / "store"
    with Origin() as origin:
        for path, data in FILES.items():
            origin.files[BASE + path] = Resource(data)
        origin.files["/secret.txt"] = Resource(SECRET)
        origin.files["/etc/passwd"] = Resource(SECRET)
        # --read-only: odd methods are refused by the proxy itself; forwarded, the
        # origin's own 501 for them would be passed through as sent.
        with cachefetch_serve(tmp_path, "--default-ttl", "forever", "--upstream", origin.url + BASE, "--store", str(store),
                              "--workers", "2", "--threads", "16", "--read-only") as server:
            # warm: a.txt cached, so Range/If-None-Match meet a hit
            assert fetch(server.port, "/a.txt").body == FILES["/a.txt"]
            requests = build_requests(origin.port)
            assert len(requests) == N_REQUESTS
            before = snapshot(tmp_path, store)
            parent_before = set(os.listdir(tmp_path.parent))

            def send(item):
                label, data = item
                status, answer = raw_request(server.port, data)
                return label, status, answer

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(send, requests))

            server_errors = [(label, status, answer[:300]) for label, status, answer in results
                             if status is not None and status >= 500]
            assert server_errors == [], "\n".join(map(repr, server_errors[:20]))
            leaked = [label for label, _, answer in results if SECRET in answer]
            assert leaked == [], leaked
            answered = sum(1 for _, status, _ in results if status is not None)
            assert answered > N_REQUESTS * 0.8, f"only {answered} requests got an answer"

            climbed = [target for target in origin.hits if escapes_base(target)]
            assert climbed == [], climbed
            assert origin.hits["/secret.txt"] == 0 and origin.hits["/etc/passwd"] == 0

            after = snapshot(tmp_path, store)
            assert after - before == set(), f"files created outside the store: {sorted(after - before)}"
            assert set(os.listdir(tmp_path.parent)) - parent_before == set()

            # still serving, hits and misses alike
            ok = fetch(server.port, "/a.txt")
            assert ok.status == 200 and ok.body == FILES["/a.txt"]
            assert ok.headers["Cache-Status"].startswith("cachefetch; hit")
            fresh = fetch(server.port, "/dir/b.bin")
            assert fresh.status == 200 and fresh.complete and fresh.body == FILES["/dir/b.bin"]
            assert fetch(server.port, "/-/healthz").status == 200
            assert server.proc.poll() is None
        log = server.log()
        assert server.proc.returncode == 0, log[-3000:]
        assert "Error handling request" not in log, log[log.find("Error handling request") - 2000:][:6000]
        assert "WORKER TIMEOUT" not in log and "was sent SIG" not in log


def test_zero_length_suffix_range_is_unsatisfiable(store):
    blob = store.put(b"0123456789")

    def app(environ, start_response):
        return serve_from_store(environ, start_response, store, blob)

    # RFC 9110 §14.1.1: a suffix range of length 0 is unsatisfiable (werkzeug reads it as "0-").
    r = Client(app).get("/", headers={"Range": "bytes=-0"})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == "bytes */10"
