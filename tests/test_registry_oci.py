"""`cachefetch serve --protocol oci` in front of Debian's docker-registry, with
the real skopeo: inspect, copy by tag, by digest and --all (a multi-arch
index), online and with the registry stopped."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest

from harness import cachefetch_serve, fetch
from registries import client_env, docker_registry, run, tool

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _blob(layout, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_layout(layout) -> str:
    """An OCI image layout holding a two-platform image tagged ``1``; returns the index digest."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifests = []
    for arch in ("amd64", "arm64"):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            data = f"hello from {arch}\n".encode() + os.urandom(4096)
            info = tarfile.TarInfo("hello.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        layer = _blob(layout, gzip.compress(raw.getvalue(), mtime=0))
        config = _blob(layout, json.dumps({
            "architecture": arch, "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()]},
        }).encode())
        manifest = _blob(layout, json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
        }).encode())
        manifests.append({"mediaType": MANIFEST, **manifest, "platform": {"architecture": arch, "os": "linux"}})
    index = _blob(layout, json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": INDEX, **index, "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))
    return index["digest"]


def skopeo(env, cwd, *args: str):
    return run([tool("skopeo"), "--insecure-policy", *args], env, cwd, timeout=120)


def test_skopeo_through_the_proxy_online_and_with_the_registry_stopped(tmp_path):
    env = client_env(tmp_path / "home")
    index_digest = build_layout(tmp_path / "layout")
    with docker_registry(tmp_path / "registry", tmp_path) as registry:
        host = registry.url.split("//", 1)[1]
        pushed = skopeo(env, tmp_path, "copy", "--all", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:1",
                        f"docker://{host}/test/hello:1")
        assert pushed.returncode == 0, pushed.stderr
        with cachefetch_serve(tmp_path, "--upstream", registry.url, "--protocol", "oci", "--tag-ttl", "300",
                              "--store", str(tmp_path / "store"), "--threads", "8") as proxy:
            mirror = f"docker://127.0.0.1:{proxy.port}/test/hello"

            def pull_everything(stage: str) -> None:
                raw = skopeo(env, tmp_path, "inspect", "--raw", "--tls-verify=false", f"{mirror}:1")
                assert raw.returncode == 0, raw.stderr + proxy.log()
                assert json.loads(raw.stdout)["mediaType"] == INDEX
                assert "sha256:" + hashlib.sha256(raw.stdout.encode()).hexdigest() == index_digest
                # inspect (not raw) reads the platform's manifest, its config and tags/list
                shown = skopeo(env, tmp_path, "inspect", "--tls-verify=false", "--override-arch", "arm64",
                               f"{mirror}:1")
                assert shown.returncode == 0, shown.stderr + proxy.log()
                assert json.loads(shown.stdout)["Architecture"] == "arm64"
                assert json.loads(shown.stdout)["RepoTags"] == ["1"]
                for ref, extra in ((f"{mirror}:1", ()), (f"{mirror}@{index_digest}", ()),
                                   (f"{mirror}:1", ("--all",))):
                    out = tmp_path / f"out-{stage}-{len(os.listdir(tmp_path))}"
                    copied = skopeo(env, tmp_path, "copy", *extra, "--src-tls-verify=false", ref, f"oci:{out}:x")
                    assert copied.returncode == 0, (ref, extra, copied.stderr + proxy.log())
                    blobs = os.listdir(out / "blobs" / "sha256")
                    assert len(blobs) == (7 if extra else 3), (ref, extra, blobs)  # index + 2 x 3, or one platform

            pull_everything("online")
            # the manifest by tag was stored under its digest too, with one Docker-Content-Digest
            by_digest = fetch(proxy.port, f"/v2/test/hello/manifests/{index_digest}", headers={"Accept": INDEX})
            assert by_digest.status == 200 and by_digest.headers["Cache-Status"].startswith("cachefetch; hit")
            assert by_digest.headers.get_all("Docker-Content-Digest") == [index_digest]

            registry.proc.terminate()
            registry.proc.wait(30)
            pull_everything("offline")
            missing = fetch(proxy.port, "/v2/test/other/manifests/latest", headers={"Accept": MANIFEST})
            assert missing.status in (502, 504)
            assert json.loads(missing.body)["errors"][0]["code"] == "UNAVAILABLE"
