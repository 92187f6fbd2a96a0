"""`cachefetch serve` (generic) as a reverse proxy: every method, end-to-end
headers both ways, request bodies, redirects, keys, hostile header values,
and aria2c's parallel ranges on a cold file."""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import threading
import time

from harness import cachefetch_serve, fetch, free_port

from cachefetch.policy import format_http_date
from origin import Origin, Resource
from registries import tool


def serve(tmp_path, upstream: str, *args: str):
    return cachefetch_serve(tmp_path, "--upstream", upstream, "--store", str(tmp_path / "store"),
                            "--threads", "8", *args)


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_every_method_and_end_to_end_header_reaches_the_origin_and_back(tmp_path):
    with Origin() as origin:
        created = Resource(b"created", status=201, content_type="text/plain", headers={
            "Date": "Tue, 01 Dec 2026 10:00:00 GMT", "Age": "7", "X-Origin": "yes", "Connection": "X-Secret",
            "X-Secret": "hop"})
        origin.files["/api/items"] = origin.files["/api/items?x=1"] = created
        with serve(tmp_path, origin.url) as server:
            body = os.urandom(300_000)
            status, headers, answer = request(server.port, "POST", "/api/items?x=1", body, {
                "User-Agent": "cf-test/1", "X-Custom": "kept", "Authorization": "Bearer t",
                "Connection": "X-Hop", "X-Hop": "dropped", "Content-Type": "application/octet-stream",
                "If-None-Match": '"v1"', "Cache-Control": "max-age=0"})
            assert (status, answer) == (201, b"created")
            method, path, sent, received = origin.requests[-1]
            assert (method, path, received) == ("POST", "/api/items?x=1", body)  # the body streamed through
            for name, value in (("User-Agent", "cf-test/1"), ("X-Custom", "kept"), ("Authorization", "Bearer t"),
                                ("If-None-Match", '"v1"'), ("Cache-Control", "max-age=0"),
                                ("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-Proto", "http"),
                                ("X-Forwarded-Host", f"127.0.0.1:{server.port}"), ("Via", "1.1 cachefetch")):
                assert sent.get(name) == value, (name, sent)
            assert "X-Hop" not in sent  # named in Connection: hop-by-hop
            # the origin's end-to-end headers come back, its Age included (gunicorn itself
            # replaces Date and Server with its own: see the README)
            assert headers["X-Origin"] == "yes" and headers["Age"] == "7"
            assert "X-Secret" not in headers and headers["Via"] == "1.1 cachefetch"
            for method in ("PUT", "DELETE", "PATCH"):
                assert request(server.port, method, "/api/items", b"x")[0] == 201
                assert origin.requests[-1][0] == method
        with serve(tmp_path, origin.url, "--read-only") as server:
            status, headers, _ = request(server.port, "POST", "/api/items", b"x")
            assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_keys_are_the_upstream_urls_so_an_encoded_query_is_another_resource(tmp_path):
    with Origin() as origin:
        origin.files["/file/report?size=5"] = Resource(b"with query")
        origin.files["/file/report%3Fsize=5"] = Resource(b"named with a question mark")
        with serve(tmp_path, origin.url) as server:
            for _ in range(2):
                assert fetch(server.port, "/file/report?size=5").body == b"with query"
                assert fetch(server.port, "/file/report%3Fsize=5").body == b"named with a question mark"


def test_redirects_come_back_through_the_proxy_or_pass_unchanged_and_unfetched(tmp_path):
    with Origin() as origin, Origin() as elsewhere:
        origin.files["/base/old"] = Resource(b"", status=302, headers={"Location": f"{origin.url}/base/new?a=1"})
        origin.files["/base/away"] = Resource(b"", status=302, headers={"Location": f"{elsewhere.url}/x"})
        with serve(tmp_path, origin.url + "/base") as server:
            moved = fetch(server.port, "/old")
            assert moved.status == 302 and moved.headers["Location"] == "/new?a=1"
            away = fetch(server.port, "/away")
            assert away.status == 302 and away.headers["Location"] == f"{elsewhere.url}/x"
        assert elsewhere.hits == {}


def raw_origin(response: bytes):
    """A one-shot origin that writes ``response`` verbatim to each connection."""
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def loop():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(response)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return sock, stop, thread


def test_cr_lf_and_nul_inside_an_upstream_header_value_never_make_a_header_line(tmp_path):
    sock, stop, thread = raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bad: a\rInjected: yes\r\n"
                                    b"X-Nul: b\x00c\r\nConnection: close\r\n\r\nok")
    try:
        with serve(tmp_path, f"http://127.0.0.1:{sock.getsockname()[1]}") as server:
            r = fetch(server.port, "/h", headers={"Cache-Control": "no-store"})
            assert r.status == 200 and r.body == b"ok"
            assert r.headers["X-Bad"] == "a Injected: yes" and "Injected" not in r.headers
            assert r.headers["X-Nul"] == "b c"
    finally:
        stop.set()
        thread.join()
        sock.close()


def test_local_failures_are_one_line_reasons_without_a_traceback(tmp_path):
    port = free_port()
    with serve(tmp_path, f"http://127.0.0.1:{port}") as server:
        r = fetch(server.port, "/x")
        assert r.status == 502
        assert r.body == f"the upstream is unreachable: http://127.0.0.1:{port}: connection refused\n".encode()


def test_aria2c_with_8_connections_on_a_cold_300_mib_file_costs_one_upstream_fetch(tmp_path):
    aria2c = tool("aria2c")
    data = os.urandom(1 << 20) * 300
    with Origin() as origin:
        # As a file server sends it: validators, no explicit freshness (RFC 9111
        # heuristics then keep it 10% of its age since Last-Modified: a week -> 16.8 h).
        origin.files["/big.bin"] = Resource(data, headers={"Last-Modified": format_http_date(time.time() - 7 * 86400),
                                                           "ETag": '"big-v1"'})
        access = tmp_path / "access.log"
        with serve(tmp_path, origin.url, "--access-log", str(access)) as server:
            done = subprocess.run([aria2c, "-x8", "-s8", "-k1M", "--no-conf", "--allow-overwrite=true",
                                   "--file-allocation=none", "--summary-interval=0", "-d", str(tmp_path),
                                   "-o", "big.bin", f"{server.url}/big.bin"],
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            assert (tmp_path / "big.bin").read_bytes() == data
            assert origin.hits["/big.bin"] == 1
    statuses = [line.split('"')[2].split()[0] for line in access.read_text().splitlines() if "/big.bin" in line]
    assert statuses.count("206") >= 2, statuses  # its connections each got a part


def test_an_interim_1xx_is_not_mistaken_for_the_final_answer(tmp_path):
    sock, stop, thread = raw_origin(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nCache-Control: max-age=60\r\n"
                                    b"Connection: close\r\n\r\nfinal")
    try:
        with serve(tmp_path, f"http://127.0.0.1:{sock.getsockname()[1]}") as server:
            r = fetch(server.port, "/hints")
            assert r.status == 200 and r.body == b"final"
            assert r.headers["Cache-Status"] == "cachefetch; fwd=miss; stored"
    finally:
        stop.set()
        thread.join()
        sock.close()


def test_a_chunked_request_body_is_streamed_to_the_origin(tmp_path):
    with Origin() as origin:
        origin.files["/upload"] = Resource(b"thanks")
        with serve(tmp_path, origin.url) as server:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            try:
                conn.request("POST", "/upload", body=iter([b"part one, ", b"part two"]),
                             headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
                resp = conn.getresponse()
                assert resp.status == 200 and resp.read() == b"thanks"
            finally:
                conn.close()
    (method, path, headers, body), = [r for r in origin.requests if r[1] == "/upload"]
    assert method == "POST" and body == b"part one, part two"
