"""Real registry servers for the proxy's tests, each on 127.0.0.1 and a free port.

pypiserver, devpi-server (offline: no upstream of its own), verdaccio (no
uplinks) and Debian's docker-registry, as ``.ci/run`` installs them (pinned);
each context manager starts one, waits until it answers, and stops it.
Nothing here contacts another host.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from typing import Iterator

import pytest
import requests

from harness import REPO_ROOT, Server, _running, free_port, wait_until

CI_DIR = os.path.join(REPO_ROOT, ".ci")
REGISTRIES_BIN = os.path.join(CI_DIR, "registries", "bin")
NODE_BIN = os.path.join(CI_DIR, "node", "node_modules", ".bin")


def tool(name: str, where: str | None = None) -> str:
    """The path of an installed tool; fails (under CI) or skips saying how to install it."""
    path = os.path.join(where, name) if where else shutil.which(name)
    if path and os.access(path, os.X_OK):
        return path
    message = f"{name} is not installed: run `bash .ci/run` (it installs the real registries and clients)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def local_session() -> requests.Session:
    """A requests session that ignores proxy settings from the environment."""
    session = requests.Session()
    session.trust_env = False
    return session


def wait_http(url: str, proc: subprocess.Popen, what: str) -> None:
    """Wait until ``url`` answers at all (any status)."""
    session = local_session()

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            session.get(url, timeout=1)
            return True
        except requests.RequestException:
            return False

    wait_until(up, timeout=60, what=what)


@contextlib.contextmanager
def pypiserver(packages_dir, log_dir) -> Iterator[Server]:
    """pypiserver serving the wheels in ``packages_dir`` at ``/simple/``; no
    fallback redirect to pypi.org (it would send clients to the Internet)."""
    exe = tool("pypi-server", REGISTRIES_BIN)
    port = free_port()
    cmd = [exe, "run", "-i", "127.0.0.1", "-p", str(port), "--disable-fallback", "-a", ".", "-P", ".",
           str(packages_dir)]
    with _running(cmd, port, os.path.join(log_dir, f"pypiserver-{port}.log"), dict(os.environ), log_dir) as server:
        wait_http(f"{server.url}/simple/", server.proc, "pypiserver")
        yield server


@contextlib.contextmanager
def devpi(server_dir, log_dir, port: int | None = None) -> Iterator[Server]:
    """devpi-server in offline mode (no root/pypi mirror), with an index
    ``root/dev`` that :func:`devpi_upload` fills; ``server_dir`` keeps its
    state, so it can be stopped and started again."""
    exe = tool("devpi-server", REGISTRIES_BIN)
    if not os.path.exists(os.path.join(server_dir, ".nodeinfo")):
        subprocess.run([os.path.join(REGISTRIES_BIN, "devpi-init"), "--serverdir", str(server_dir),
                        "--no-root-pypi"], check=True, capture_output=True, timeout=120)
    port = port or free_port()
    cmd = [exe, "--serverdir", str(server_dir), "--host", "127.0.0.1", "--port", str(port), "--offline-mode"]
    with _running(cmd, port, os.path.join(log_dir, f"devpi-{port}.log"), dict(os.environ), log_dir) as server:
        wait_http(f"{server.url}/+api", server.proc, "devpi-server")
        yield server


def devpi_upload(server: Server, files: dict[str, bytes], index: str = "root/dev") -> None:
    """Create ``index`` (if new) and upload ``files`` (name -> wheel bytes) to it, as root."""
    session = local_session()
    login = session.post(f"{server.url}/+login", json={"user": "root", "password": ""},
                         headers={"Accept": "application/json"}, timeout=30)
    login.raise_for_status()
    auth = login.json()["result"]
    token = f"{auth['password']}"
    import base64
    session.headers["X-Devpi-Auth"] = base64.b64encode(f"root:{token}".encode()).decode()
    session.headers["Accept"] = "application/json"
    if session.get(f"{server.url}/{index}", timeout=30).status_code == 404:
        session.put(f"{server.url}/{index}", json={"bases": [], "volatile": True}, timeout=30).raise_for_status()
    for filename, data in files.items():
        name, version = filename.split("-")[:2]
        r = session.post(f"{server.url}/{index}/", data={":action": "file_upload", "name": name, "version": version},
                         files={"content": (filename, data)}, timeout=60)
        r.raise_for_status()


@contextlib.contextmanager
def verdaccio(storage_dir, log_dir) -> Iterator[Server]:
    """verdaccio with no uplinks, anyone may read and publish; a user
    ``test`` is created (see :func:`npm_token`)."""
    exe = tool("verdaccio", NODE_BIN)
    tool("node")
    port = free_port()
    os.makedirs(storage_dir, exist_ok=True)
    config = os.path.join(storage_dir, "config.yaml")
    with open(config, "w") as f:
        f.write(f"""storage: {storage_dir}/storage
auth:
  htpasswd:
    file: {storage_dir}/htpasswd
    max_users: 100
uplinks: {{}}
packages:
  '**':
    access: $all
    publish: $all
    unpublish: $all
server:
  keepAliveTimeout: 5
publish:
  allow_offline: true
log: {{type: stdout, format: pretty, level: warn}}
""")
    cmd = [exe, "--config", config, "--listen", f"127.0.0.1:{port}"]
    env = {**os.environ, "VERDACCIO_HANDLE_KILL_SIGNALS": "true"}
    with _running(cmd, port, os.path.join(log_dir, f"verdaccio-{port}.log"), env, log_dir) as server:
        wait_http(f"{server.url}/-/ping", server.proc, "verdaccio")
        yield server


def npm_token(server: Server) -> str:
    """Create (or log in) the user ``test`` on verdaccio; its bearer token."""
    r = local_session().put(f"{server.url}/-/user/org.couchdb.user:test",
                            json={"name": "test", "password": "test-password"}, timeout=30)
    r.raise_for_status()
    return r.json()["token"]


@contextlib.contextmanager
def docker_registry(root_dir, log_dir, port: int | None = None) -> Iterator[Server]:
    """Debian's docker-registry (the distribution registry) storing under
    ``root_dir``, which outlives it (so it can be stopped and started again)."""
    exe = tool("docker-registry")
    port = port or free_port()
    os.makedirs(root_dir, exist_ok=True)
    config = os.path.join(log_dir, f"registry-{port}.yml")
    with open(config, "w") as f:
        f.write(f"""version: 0.1
log: {{level: warn}}
storage:
  filesystem: {{rootdirectory: {root_dir}}}
  delete: {{enabled: true}}
http:
  addr: 127.0.0.1:{port}
""")
    with _running([exe, "serve", config], port, os.path.join(log_dir, f"registry-{port}.log"),
                  dict(os.environ), log_dir) as server:
        wait_http(f"{server.url}/v2/", server.proc, "docker-registry")
        yield server


def client_env(home) -> dict:
    """An environment for real clients (pip, uv, npm, skopeo) that reads no
    machine-wide configuration: no index, registry or proxy settings leak in."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().startswith(("pip_", "uv_", "npm_", "http_proxy", "https_proxy", "no_proxy"))}
    os.makedirs(home, exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=os.path.join(home, ".config"), PIP_CONFIG_FILE=os.devnull,
               PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", UV_NO_CONFIG="1",
               UV_CACHE_DIR=os.path.join(home, "uv-cache"), NO_PROXY="*",
               NPM_CONFIG_USERCONFIG=os.path.join(home, ".npmrc"),
               NPM_CONFIG_GLOBALCONFIG=os.path.join(home, "npmrc-global"),
               NPM_CONFIG_CACHE=os.path.join(home, "npm-cache"), NPM_CONFIG_UPDATE_NOTIFIER="false")
    return env


def run(cmd: list[str], env: dict, cwd, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a real client; its output is in the result (for assertion messages)."""
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


PYTHON = sys.executable


def json_of(result: subprocess.CompletedProcess) -> dict:
    """The JSON a client printed."""
    return json.loads(result.stdout)
