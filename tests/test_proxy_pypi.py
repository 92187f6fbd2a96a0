"""`cachefetch serve --protocol pypi` with the real pip, against local index and files hosts."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile


from harness import cachefetch_serve, fetch, run_cli
from origin import Origin, Resource

from cachefetch.store import CAFS


def build_wheel(name: str, version: str, value: int) -> tuple[str, bytes]:
    """A minimal valid pure-Python wheel, built in memory."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {value}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: cachefetch-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


def pip(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_INDEX_URL", None)
    env.pop("PIP_EXTRA_INDEX_URL", None)
    return subprocess.run([sys.executable, "-m", "pip", *args, "--no-cache-dir", "--timeout", "15", "--retries", "0"],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=180)


def publish(index: Origin, files: Origin, name: str, filename: str, data: bytes, sha256: str | None = None):
    sha256 = sha256 or hashlib.sha256(data).hexdigest()
    files.files[f"/packages/{filename}"] = Resource(data)
    page = (f'<!DOCTYPE html><html><body><a href="{files.url}/packages/{filename}#sha256={sha256}" '
            f'data-requires-python="&gt;=3.8">{filename}</a></body></html>')
    index.files[f"/simple/{name}/"] = Resource(page.encode(), content_type="text/html")
    index.files["/simple/"] = Resource(f'<a href="/simple/{name}/">{name}</a>'.encode(), content_type="text/html")


def test_pip_download_and_install_through_the_proxy_then_from_cache_alone(tmp_path):
    filename, wheel = build_wheel("tinypkg", "1.0", 42)
    store = tmp_path / "store"
    with Origin() as index, Origin() as files:
        publish(index, files, "tinypkg", filename, wheel)
        with cachefetch_serve(tmp_path, "--upstream", index.url, "--protocol", "pypi", "--files-upstream",
                              files.url, "--store", str(store), "--index-ttl", "1", "--threads", "8") as server:
            simple = f"{server.url}/simple/"
            dl = pip("download", "--no-deps", "--index-url", simple, "-d", str(tmp_path / "dl"), "tinypkg",
                     cwd=tmp_path)
            assert dl.returncode == 0, dl.stderr + server.log()
            assert (tmp_path / "dl" / filename).read_bytes() == wheel
            # One log line per upstream fetch: key, size, duration, outcome.
            assert re.search(rf"fetch {re.escape(files.url)}/packages/{re.escape(filename)}: {len(wheel)} bytes "
                             r"in \d+\.\d+s, complete", server.log()), server.log()
            first = pip("install", "--no-deps", "--target", str(tmp_path / "t1"), "--index-url", simple, "tinypkg",
                        cwd=tmp_path)
            assert first.returncode == 0, first.stderr
            assert (tmp_path / "t1" / "tinypkg" / "__init__.py").read_text() == "VALUE = 42\n"
            assert files.hits[f"/packages/{filename}"] == 1  # the second fetch was a hit
            html = {"Accept": "text/html"}  # index pages vary on Accept: keep to one variant
            assert fetch(server.port, "/simple/tinypkg/", headers=html).status == 200
            index.stop()
            files.stop()
            time.sleep(1.2)  # let the 1 s index TTL lapse: the point is a *stale* page while the origin is down
            page = fetch(server.port, "/simple/tinypkg/", headers=html)
            assert page.status == 200
            assert "stale-if-error" in page.headers["Cache-Status"], page.headers["Cache-Status"]
            second = pip("install", "--no-deps", "--target", str(tmp_path / "t2"), "--index-url", simple, "tinypkg",
                         cwd=tmp_path)
            assert second.returncode == 0, second.stderr + server.log()
            assert (tmp_path / "t2" / "tinypkg" / "__init__.py").read_text() == "VALUE = 42\n"
        assert server.proc.returncode == 0
    assert CAFS(store).verify() == []
    verify = run_cli("verify", "--store", str(store))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_body_whose_sha256_differs_from_the_index_is_refused_and_never_stored(tmp_path):
    filename, wheel = build_wheel("badpkg", "1.0", 1)
    _, other = build_wheel("badpkg", "1.0", 2)
    store = tmp_path / "store"
    with Origin() as index, Origin() as files:
        publish(index, files, "badpkg", filename, other, sha256=hashlib.sha256(wheel).hexdigest())
        with cachefetch_serve(tmp_path, "--upstream", index.url, "--protocol", "pypi", "--files-upstream",
                              files.url, "--store", str(store), "--threads", "8") as server:
            result = pip("download", "--no-deps", "--index-url", f"{server.url}/simple/", "-d",
                         str(tmp_path / "dl"), "badpkg", cwd=tmp_path)
            assert result.returncode != 0
            assert not (tmp_path / "dl" / filename).exists()
            metrics = fetch(server.port, "/-/metrics").body.decode()
            assert "cachefetch_verification_failures_total 1.0" in metrics or \
                   "cachefetch_verification_failures_total 2.0" in metrics, metrics
    blobs = {CAFS(store).path(h) for h in CAFS(store)}
    stored = [open(p, "rb").read() for p in blobs]
    assert other not in stored and wheel not in stored
    verify = run_cli("verify", "--store", str(store))
    assert verify.returncode == 0, verify.stdout
    assert CAFS(store).temp_files() == []


def test_files_host_not_on_the_allow_list_is_refused(tmp_path):
    with Origin() as index:
        index.files["/simple/x/"] = Resource(b"<a href='http://127.0.0.2:9/x.whl#sha256=" + b"0" * 64 + b"'>x</a>",
                                             content_type="text/html")
        with cachefetch_serve(tmp_path, "--upstream", index.url, "--protocol", "pypi",
                              "--store", str(tmp_path / "store"), "--threads", "4") as server:
            page = fetch(server.port, "/simple/x/")
            assert b"127.0.0.2:9/x.whl" in page.body  # left as is: not routed through the proxy
            refused = fetch(server.port, "/-/files/127.0.0.2:9/" + "0" * 64 + "/x.whl")
            assert refused.status == 403


def test_pip_install_through_a_pep_691_json_index_with_pep_658_metadata(tmp_path):
    filename, wheel = build_wheel("jsonpkg", "2.0", 7)
    sha = hashlib.sha256(wheel).hexdigest()
    metadata = b"Metadata-Version: 2.1\nName: jsonpkg\nVersion: 2.0\n"
    with Origin() as index, Origin() as files:
        files.files[f"/packages/{filename}"] = Resource(wheel)
        files.files[f"/packages/{filename}.metadata"] = Resource(metadata)
        doc = {"meta": {"api-version": "1.1"}, "name": "jsonpkg",
               "files": [{"filename": filename, "url": f"{files.url}/packages/{filename}", "hashes": {"sha256": sha},
                          "core-metadata": {"sha256": hashlib.sha256(metadata).hexdigest()}}]}
        index.files["/simple/jsonpkg/"] = Resource(json.dumps(doc).encode(),
                                                   content_type="application/vnd.pypi.simple.v1+json")
        with cachefetch_serve(tmp_path, "--upstream", index.url, "--protocol", "pypi", "--files-upstream",
                              files.url, "--store", str(tmp_path / "store"), "--threads", "4") as server:
            result = pip("install", "--no-deps", "--target", str(tmp_path / "t"), "--index-url",
                         f"{server.url}/simple/", "jsonpkg", cwd=tmp_path)
            assert result.returncode == 0, result.stderr + server.log()
            assert (tmp_path / "t" / "jsonpkg" / "__init__.py").read_text() == "VALUE = 7\n"
            assert files.hits[f"/packages/{filename}"] == 1
            # PEP 658: pip read the metadata file through the proxy, verified by its own digest
            assert files.hits[f"/packages/{filename}.metadata"] == 1


def test_pip_installs_from_a_static_tree_with_relative_links(tmp_path):
    """A dumb-pypi-style static tree: pages and files under one path, links
    relative to the page (``../../packages/…``), index at ``/repo/simple/``."""
    filename, wheel = build_wheel("statpkg", "2.0", 7)
    sha = hashlib.sha256(wheel).hexdigest()
    with Origin() as tree:
        tree.files[f"/repo/packages/{filename}"] = Resource(wheel)
        tree.files["/repo/simple/statpkg/"] = Resource(
            f'<html><body><a href="../../packages/{filename}#sha256={sha}">{filename}</a></body></html>'.encode(),
            content_type="text/html")
        tree.files["/repo/simple/"] = Resource(b'<a href="statpkg/">statpkg</a>', content_type="text/html")
        with cachefetch_serve(tmp_path, "--upstream", tree.url + "/repo/simple/", "--protocol", "pypi",
                              "--store", str(tmp_path / "store"), "--threads", "8") as server:
            done = pip("install", "--no-deps", "--target", str(tmp_path / "t"), "--index-url",
                       f"{server.url}/simple/", "statpkg", cwd=tmp_path)
            assert done.returncode == 0, done.stderr + server.log()
            assert (tmp_path / "t" / "statpkg" / "__init__.py").read_text() == "VALUE = 7\n"
            again = pip("install", "--no-deps", "--target", str(tmp_path / "t2"), "--index-url",
                        f"{server.url}/simple/", "statpkg", cwd=tmp_path)
            assert again.returncode == 0, again.stderr
    assert tree.hits[f"/repo/packages/{filename}"] == 1  # the file came through the proxy, once
