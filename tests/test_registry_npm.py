"""`cachefetch serve --protocol npm` in front of a real verdaccio, with the real npm:
install and ci through the proxy, then with verdaccio stopped; lockfiles name
the proxy; a newly published version shows within the packument TTL."""
from __future__ import annotations

import json
import os
import shutil

from harness import cachefetch_serve, fetch, wait_until
from registries import client_env, npm_token, run, tool, verdaccio


def npm(env, cwd, *args: str):
    return run([tool("npm"), *args, "--no-audit", "--no-fund", "--loglevel=error"], env, cwd)


def write_package(directory, name: str, version: str, dependencies: dict | None = None) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "package.json"), "w") as f:
        json.dump({"name": name, "version": version, "main": "index.js", "license": "MIT",
                   "dependencies": dependencies or {}}, f)
    with open(os.path.join(directory, "index.js"), "w") as f:
        f.write(f"module.exports = {json.dumps(name + '@' + version)};\n")


def publish(env, tmp_path, registry: str, name: str, version: str, dependencies: dict | None = None) -> None:
    directory = tmp_path / "src" / f"{name.replace('/', '_')}-{version}"
    write_package(directory, name, version, dependencies)
    result = npm(env, directory, "publish", "--registry", registry)
    assert result.returncode == 0, result.stderr


def latest(port: int, name: str) -> str:
    r = fetch(port, "/" + name.replace("/", "%2f"), headers={"Accept": "application/json"})
    assert r.status == 200, r.body
    return json.loads(r.body)["dist-tags"]["latest"]


def test_npm_install_and_ci_through_the_proxy_then_with_verdaccio_stopped(tmp_path):
    env = client_env(tmp_path / "home")
    with verdaccio(tmp_path / "verdaccio", tmp_path) as registry:
        host = registry.url.split("//", 1)[1]
        with open(env["NPM_CONFIG_USERCONFIG"], "w") as f:
            f.write(f"//{host}/:_authToken={npm_token(registry)}\n")
        publish(env, tmp_path, registry.url, "base-pkg", "1.0.0")
        publish(env, tmp_path, registry.url, "app-dep", "1.0.0", {"base-pkg": "^1.0.0"})
        publish(env, tmp_path, registry.url, "@cf/scoped", "1.0.0")

        with cachefetch_serve(tmp_path, "--upstream", registry.url, "--protocol", "npm", "--packument-ttl", "1",
                              "--store", str(tmp_path / "store"), "--threads", "8") as proxy:
            project = tmp_path / "project"
            write_package(project, "project", "0.0.1", {"app-dep": "^1.0.0", "@cf/scoped": "^1.0.0"})
            # a cache of its own: publishing left the tarballs in the publisher's
            installer = {**env, "NPM_CONFIG_CACHE": str(tmp_path / "home" / "npm-cache-1")}
            done = npm(installer, project, "install", "--registry", f"{proxy.url}/")
            assert done.returncode == 0, done.stderr + proxy.log()
            assert (project / "node_modules" / "base-pkg" / "index.js").exists()  # a dependency's dependency
            lock = json.loads((project / "package-lock.json").read_text())
            resolved = {path: entry["resolved"] for path, entry in lock["packages"].items() if path}
            assert set(resolved) == {"node_modules/app-dep", "node_modules/base-pkg", "node_modules/@cf/scoped"}
            for url in resolved.values():  # lockfiles name the proxy, whatever host verdaccio wrote
                assert url.startswith(f"{proxy.url}/-/tarballs/"), url
            for entry in lock["packages"].values():
                assert entry.get("integrity", "sha512-").startswith("sha512-")

            # a newly published version shows within the packument TTL (1 s here)
            assert latest(proxy.port, "base-pkg") == "1.0.0"
            publish(env, tmp_path, registry.url, "base-pkg", "1.1.0")
            wait_until(lambda: latest(proxy.port, "base-pkg") == "1.1.0", timeout=10,
                       what="the new version through the proxy")
            shown = npm(env, project, "view", "base-pkg", "version", "--registry", f"{proxy.url}/")
            assert shown.stdout.strip() == "1.1.0", shown.stderr
            # the lockfile follows it (fetching the new tarball through the proxy)
            updated = npm({**env, "NPM_CONFIG_CACHE": str(tmp_path / "home" / "npm-cache-u")}, project, "update",
                          "--registry", f"{proxy.url}/")
            assert updated.returncode == 0, updated.stderr
            assert json.loads((project / "package-lock.json").read_text())[
                "packages"]["node_modules/base-pkg"]["version"] == "1.1.0"
            # scoped names, as npm asks for them
            scoped = fetch(proxy.port, "/@cf%2fscoped", headers={"Accept": "application/json"})
            assert scoped.status == 200 and json.loads(scoped.body)["name"] == "@cf/scoped"

            registry.proc.terminate()
            registry.proc.wait(30)

            # npm ci from the lockfile, with an empty npm cache: every tarball from the proxy's store
            shutil.rmtree(project / "node_modules")
            env_cold = {**env, "NPM_CONFIG_CACHE": str(tmp_path / "home" / "npm-cache-2")}
            ci = npm(env_cold, project, "ci", "--registry", f"{proxy.url}/")
            assert ci.returncode == 0, ci.stderr + proxy.log()
            assert (project / "node_modules" / "@cf" / "scoped" / "index.js").exists()
            # and a fresh install resolving versions: stale packuments served while verdaccio is down
            shutil.rmtree(project / "node_modules")
            (project / "package-lock.json").unlink()
            env_cold = {**env, "NPM_CONFIG_CACHE": str(tmp_path / "home" / "npm-cache-3")}
            again = npm(env_cold, project, "install", "--registry", f"{proxy.url}/")
            assert again.returncode == 0, again.stderr + proxy.log()
            assert (project / "node_modules" / "app-dep" / "index.js").exists()
