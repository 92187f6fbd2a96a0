"""`cachefetch serve --protocol pypi` in front of real indexes (pypiserver,
devpi-server) with the real clients (pip, uv): a cache warmed by one client
serves the other with the index stopped."""
from __future__ import annotations

import os

import pytest

from harness import cachefetch_serve, fetch
from registries import PYTHON, REGISTRIES_BIN, client_env, devpi, devpi_upload, pypiserver, run, tool
from test_proxy_pypi import build_wheel


@pytest.fixture(scope="module")
def wheels():
    """Two projects, one with a name that PEP 503 normalises."""
    return dict(build_wheel(name, "1.0", value) for name, value in (("tiny_pkg", 1), ("other", 2)))


def uv_install(env, target, index_url: str, *names: str):
    uv = tool("uv", REGISTRIES_BIN)
    return run([uv, "pip", "install", "--no-cache", "--python", PYTHON, "--target", str(target), "--index-url",
                index_url, "--no-deps", *names], env, target.parent)


def pip_install(env, target, index_url: str, *names: str):
    return run([PYTHON, "-m", "pip", "install", "--no-cache-dir", "--timeout", "15", "--retries", "0", "--no-deps",
                "--target", str(target), "--index-url", index_url, *names], env, target.parent)


def installed(target, name: str) -> str:
    return (target / name / "__init__.py").read_text()


def test_pypiserver_warmed_by_uv_serves_pip_with_the_index_stopped(tmp_path, wheels):
    packages = tmp_path / "packages"
    packages.mkdir()
    for filename, data in wheels.items():
        (packages / filename).write_bytes(data)
    env = client_env(tmp_path / "home")
    with pypiserver(packages, tmp_path) as index:
        with cachefetch_serve(tmp_path, "--upstream", f"{index.url}/simple/", "--protocol", "pypi",
                              "--store", str(tmp_path / "store"), "--threads", "8") as proxy:
            simple = f"{proxy.url}/simple/"
            warm = uv_install(env, tmp_path / "uv", simple, "tiny-pkg", "other")
            assert warm.returncode == 0, warm.stderr + proxy.log()
            assert installed(tmp_path / "uv", "tiny_pkg") == "VALUE = 1\n"
            # an HTML-only client's page, cached too
            assert fetch(proxy.port, "/simple/other/", headers={"Accept": "text/html"}).status == 200
            # the proxy redirects a name PEP 503 would normalise
            moved = fetch(proxy.port, "/simple/Tiny_Pkg/")
            assert moved.status == 301 and moved.headers["Location"] == "/simple/tiny-pkg/"
            index.proc.terminate()
            index.proc.wait(30)

            offline = pip_install(env, tmp_path / "pip", simple, "tiny-pkg", "other")
            assert offline.returncode == 0, offline.stderr + proxy.log()
            assert installed(tmp_path / "pip", "other") == "VALUE = 2\n"
            # a client that takes JSON or HTML is given the stored HTML page when it is all there is
            html_only = fetch(proxy.port, "/simple/other/", headers={
                "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.01"})
            assert html_only.status == 200, html_only.body
            assert html_only.headers["Content-Type"].startswith("text/html")


def test_devpi_index_path_warmed_by_pip_serves_uv_with_devpi_stopped(tmp_path, wheels):
    env = client_env(tmp_path / "home")
    with devpi(tmp_path / "devpi", tmp_path) as server:
        devpi_upload(server, wheels)
        upstream = f"{server.url}/root/dev/+simple/"
        with cachefetch_serve(tmp_path, "--upstream", upstream, "--protocol", "pypi",
                              "--store", str(tmp_path / "store"), "--threads", "8") as proxy:
            simple = f"{proxy.url}/simple/"
            warm = pip_install(env, tmp_path / "pip", simple, "tiny-pkg", "other")
            assert warm.returncode == 0, warm.stderr + proxy.log()
            assert installed(tmp_path / "pip", "tiny_pkg") == "VALUE = 1\n"
            page = fetch(proxy.port, "/simple/other/", headers={"Accept": "text/html"})
            # devpi's relative links (../../+f/...) come back through the proxy, with their digest
            assert b"/-/files/127.0.0.1%3A" in page.body and b"/root/dev/+f/" in page.body
            server.proc.terminate()
            server.proc.wait(30)

            offline = uv_install(env, tmp_path / "uv", simple, "tiny-pkg", "other")
            assert offline.returncode == 0, offline.stderr + proxy.log()
            assert installed(tmp_path / "uv", "other") == "VALUE = 2\n"
    assert os.listdir(tmp_path / "store" / "blobs")
