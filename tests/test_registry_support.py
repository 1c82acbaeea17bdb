"""The test-image builder and local registries behave like the real thing.

Everything the image tests pull comes from tests/support, so it is checked
here against Debian's real docker-registry: what we push is what a puller gets
back, digests and sizes included, and auth really is enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.support import images as im
from tests.support.catalog import (
    PASSWORD,
    UPSTREAMS,
    USERNAME,
    ServedCatalog,
    critest_images,
)
from tests.support.registry import (
    FakeRegistry,
    Registry,
    RegistryClient,
    RegistryError,
    broken_mirror,
    stalling_registry,
)
from tests.support.tools import require_tool


@pytest.fixture
def registry_installed() -> None:
    require_tool("docker-registry", "docker-registry")


# docker-registry missing fails these tests (deploy/setup-dev.sh installs it).
needs_registry = pytest.mark.usefixtures("registry_installed")


def layer_names(blob: im.Blob) -> list[str]:
    data = gzip.decompress(blob.data) if blob.media_type.endswith("gzip") else blob.data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


# ------------------------------------------------------------------ image builder


def test_builds_are_reproducible() -> None:
    a, b = im.multilayer_image(), im.multilayer_image()
    assert a.digest == b.digest
    assert a.layers == b.layers
    assert im.multiarch_index().digest == im.multiarch_index().digest


def test_manifest_describes_config_and_layers() -> None:
    cases: list[tuple[im.MediaKind, str, str]] = [
        ("oci", im.OCI_MANIFEST, im.OCI_LAYER_GZIP),
        ("docker", im.DOCKER_MANIFEST, im.DOCKER_LAYER_GZIP),
    ]
    for media, manifest_type, layer_type in cases:
        img = im.multilayer_image(media=media)
        manifest = json.loads(img.manifest.data)
        assert manifest["mediaType"] == manifest_type == img.media_type
        assert manifest["config"] == img.config.descriptor()
        assert [d["mediaType"] for d in manifest["layers"]] == [layer_type] * 3
        assert [d["digest"] for d in manifest["layers"]] == [b.digest for b in img.layers]
        assert [d["size"] for d in manifest["layers"]] == [len(b.data) for b in img.layers]
        config = img.config_json
        diff_ids = [im.sha256_digest(gzip.decompress(b.data)) for b in img.layers]
        assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
        assert config["architecture"] == im.goarch()


def test_whiteouts_and_rootfs_layout() -> None:
    base, _, delete = im.multilayer_image().layers
    names = layer_names(delete)
    assert "data/.wh.b" in names
    assert "opaque/.wh..wh..opq" in names
    base_names = set(layer_names(base))
    assert {"bin/busybox", "bin/sh", "bin/ls", "etc/passwd", "etc/group", "tmp"} <= base_names
    assert names == sorted(names, key=lambda n: n.split("/"))


def test_config_fields() -> None:
    cfg = im.entrypoint_image().config_json["config"]
    assert isinstance(cfg, dict)
    assert cfg["Entrypoint"][0] == "/bin/sh"
    assert cfg["Cmd"] == ["cmd-arg1", "cmd-arg2"]
    assert "FOO=bar" in cfg["Env"]
    assert cfg["WorkingDir"] == "/work"
    assert cfg["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert cfg["StopSignal"] == "SIGUSR1"
    assert cfg["Labels"]["org.example.test"] == "entrypoint"
    user_cfg = im.user_image("www:www").config_json["config"]
    assert isinstance(user_cfg, dict)
    assert user_cfg["User"] == "www:www"


def test_multiarch_index_has_host_and_foreign_platforms() -> None:
    idx = im.multiarch_index(media="docker")
    body = json.loads(idx.manifest.data)
    assert body["mediaType"] == im.DOCKER_MANIFEST_LIST
    plats = [im.Platform(**m["platform"]) for m in body["manifests"]]
    assert im.Platform.host() in plats
    assert len(plats) >= 2
    host = idx.for_platform(im.Platform.host())
    assert "etc/platform" in layer_names(host.layers[-1])


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_busybox_rootfs_runs(tmp_path: Path) -> None:
    img = im.nonewprivs_image()
    root = tmp_path / "root"
    root.mkdir()
    for blob in img.layers:
        subprocess.run(
            ["tar", "-xzf", "-", "-C", str(root)], input=blob.data, check=True, timeout=60
        )
    out = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "id -un; echo hi | wc -c; /usr/local/bin/nnp"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["root", "3", "Effective uid: 0"]
    assert (root / "usr/local/bin/nnp").stat().st_mode & 0o4000


def test_oci_layout(tmp_path: Path) -> None:
    idx = im.multiarch_index()
    im.write_oci_layout(tmp_path, {"example.com/test/multiarch:1": idx})
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["manifests"][0]["digest"] == idx.digest
    for child in idx.images:
        for blob in (child.manifest, *child.blobs()):
            assert (tmp_path / "blobs/sha256" / blob.digest[7:]).read_bytes() == blob.data


# ------------------------------------------------------------- real docker-registry


@pytest_asyncio.fixture(scope="module", params=["none", "basic", "token"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    require_tool("docker-registry", "docker-registry")
    async with Registry(auth=request.param) as reg:
        yield reg


async def check_roundtrip(reg: Registry, repo: str, ref: str, image: im.AnyImage) -> None:
    async with reg.client() as c:
        body, media, digest = await c.get_manifest(repo, ref)
        assert (body, media, digest) == (image.manifest.data, image.media_type, image.digest)
        for child in image.images:
            body, media, digest = await c.get_manifest(repo, child.digest)
            assert body == child.manifest.data and digest == child.digest
            manifest = json.loads(body)
            for desc, blob in zip(
                [manifest["config"], *manifest["layers"]], child.blobs(), strict=True
            ):
                assert (desc["digest"], desc["size"]) == (blob.digest, blob.size)
                _, headers, _ = await c.request(
                    "HEAD", f"/v2/{repo}/blobs/{blob.digest}", scope=f"repository:{repo}:pull"
                )
                assert int(headers["content-length"]) == blob.size
            assert await c.get_blob(repo, child.config.digest) == child.config.data


async def test_push_single_layer_oci(registry: Registry) -> None:
    img = await asyncio.to_thread(im.busybox_image)
    assert len(img.layers) == 1
    assert await registry.push("library/busybox", "latest", img) == img.digest
    await check_roundtrip(registry, "library/busybox", "latest", img)


async def test_push_docker_schema2_chunked(registry: Registry) -> None:
    img = await asyncio.to_thread(im.multilayer_image, media="docker")
    digest = await registry.push("test/docker", "1", img, upload="chunked", chunk_size=256 << 10)
    assert digest == img.digest
    await check_roundtrip(registry, "test/docker", "1", img)


async def test_push_multiarch_index(registry: Registry) -> None:
    medias: tuple[im.MediaKind, ...] = ("oci", "docker")
    for media in medias:
        idx = await asyncio.to_thread(im.multiarch_index, media=media)
        assert await registry.push("test/multiarch", media, idx) == idx.digest
        await check_roundtrip(registry, "test/multiarch", media, idx)
    async with registry.client() as c:
        assert sorted(await c.tags("test/multiarch")) == ["docker", "oci"]


async def test_push_by_digest(registry: Registry) -> None:
    img = await asyncio.to_thread(im.user_image, "1234")
    await registry.push("test/bydigest", img.digest, img)
    await check_roundtrip(registry, "test/bydigest", img.digest, img)


@pytest.mark.parametrize("registry", ["basic", "token"], indirect=True)  # not the open one
async def test_anonymous_push_refused(registry: Registry) -> None:
    img = await asyncio.to_thread(im.busybox_image)
    async with registry.client(anonymous=True) as c:
        with pytest.raises(RegistryError) as err:
            await c.push("anon/busybox", "latest", img)
        assert err.value.status == 401
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{registry.url}/v2/") as resp:
            assert resp.status == 401
        url = f"{registry.url}/v2/anon/busybox/blobs/uploads/"
        async with s.post(url) as resp:
            assert resp.status == 401
            assert (
                resp.headers["WWW-Authenticate"]
                .lower()
                .startswith("basic" if registry.auth == "basic" else "bearer")
            )


@pytest.mark.parametrize("registry", ["basic", "token"], indirect=True)  # not the open one
async def test_wrong_password_refused(registry: Registry) -> None:
    async with RegistryClient(registry.url, username=registry.username, password="nope") as c:
        with pytest.raises(RegistryError) as err:
            await c.get_manifest("library/busybox", "latest")
        assert err.value.status == 401


# ------------------------------------------------------------------ fake registries


async def test_fake_registry_serves_and_ranges() -> None:
    img = await asyncio.to_thread(im.busybox_image)
    async with FakeRegistry() as fake:
        fake.add("library/busybox", "latest", img)
        async with RegistryClient(fake.url) as c:
            body, media, digest = await c.get_manifest("library/busybox", "latest")
            assert (body, media, digest) == (img.manifest.data, img.media_type, img.digest)
            assert await c.get_blob("library/busybox", img.layers[0].digest) == img.layers[0].data
            _, h, part = await c.request(
                "GET",
                f"/v2/library/busybox/blobs/{img.layers[0].digest}",
                scope="",
                headers={"Range": "bytes=10-"},
                allow=(206,),
            )
            assert part == img.layers[0].data[10:]
            assert h["content-range"].startswith("bytes 10-")
        assert fake.requested("manifests")


async def test_stalling_registry_stalls_mid_blob() -> None:
    img = await asyncio.to_thread(im.busybox_image)
    layer = img.layers[0]
    async with (
        stalling_registry("library/busybox", "latest", img, fault_after=1000) as fake,
        aiohttp.ClientSession() as s,
        s.get(f"{fake.url}/v2/library/busybox/blobs/{layer.digest}") as resp,
    ):
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) == layer.size
        got = await resp.content.readexactly(1000)
        assert got == layer.data[:1000]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.content.read(1), 0.5)


async def test_fake_registry_truncates_and_corrupts() -> None:
    img = await asyncio.to_thread(im.busybox_image)
    layer = img.layers[0]
    path = f"/v2/library/busybox/blobs/{layer.digest}"
    async with FakeRegistry(blob_fault="truncate", fault_after=500) as fake:
        fake.add("library/busybox", "latest", img)
        async with aiohttp.ClientSession() as s, s.get(fake.url + path) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        async with RegistryClient(fake.url) as c:  # configs are left alone
            assert await c.get_blob("library/busybox", img.config.digest) == img.config.data
    async with FakeRegistry(blob_fault="corrupt", fault_after=7) as fake:
        fake.add("library/busybox", "latest", img)
        async with RegistryClient(fake.url) as c:
            data = await c.get_blob("library/busybox", layer.digest)
            assert len(data) == layer.size
            assert im.sha256_digest(data) != layer.digest


async def test_trickling_registry_trickles() -> None:
    img = await asyncio.to_thread(im.busybox_image)
    layer = img.layers[0]
    fake = stalling_registry("library/busybox", "latest", img, trickle=True, trickle_interval=0.05)
    async with fake, aiohttp.ClientSession() as s:
        url = f"{fake.url}/v2/library/busybox/blobs/{layer.digest}"
        async with s.get(url) as resp:
            got = b""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    while chunk := await resp.content.read(64):
                        got += chunk
            assert 0 < len(got) < 100
            assert layer.data.startswith(got)


async def test_broken_mirror_answers_500() -> None:
    async with broken_mirror() as mirror, aiohttp.ClientSession() as s:
        async with s.get(f"{mirror.url}/v2/") as resp:
            assert resp.status == 200
        async with s.get(f"{mirror.url}/v2/library/busybox/manifests/latest") as resp:
            assert resp.status == 500
        assert len(mirror.requests) == 2


# ------------------------------------------------------------------------- catalog


@needs_registry
async def test_catalog_serves_everything() -> None:
    async with ServedCatalog() as cat:
        assert set(cat.mirrors) == set(UPSTREAMS)
        for entry in critest_images():
            for name in entry.names():
                assert name in cat.images, name
        tags = [cat.digest(f"gcr.io/k8s-staging-cri-tools/test-image-tags:{i}") for i in (1, 2, 3)]
        assert len(set(tags)) == 1
        assert cat.digest("registry.k8s.io/pause:3.9") == cat.digest("k8s.gcr.io/pause:3.9")
        different = {
            cat.digest(f"gcr.io/k8s-staging-cri-tools/test-image-{i}:latest") for i in (1, 2, 3)
        }
        assert len(different) == 3
        # A mirror keeps the repository path: only the host changes.
        local = cat.local("registry.k8s.io/e2e-test-images/nginx:1.14-2")
        assert local == f"{cat.endpoint('registry.k8s.io')}/e2e-test-images/nginx:1.14-2"
        async with RegistryClient(cat.mirrors["registry.k8s.io"]) as c:
            _, media, digest = await c.get_manifest("e2e-test-images/nginx", "1.14-2")
            assert media == im.DOCKER_MANIFEST_LIST
            assert digest == cat.digest("registry.k8s.io/e2e-test-images/nginx:1.14-2")
        # Private copies: refused anonymously, served with the catalog's credentials.
        for key in ("auth", "token"):
            pushed = cat.images[f"{key}/private/busybox:latest"]
            async with RegistryClient(f"http://{cat.endpoint(key)}") as c:
                with pytest.raises(RegistryError) as err:
                    await c.get_manifest("private/busybox", "latest")
                assert err.value.status == 401
            async with RegistryClient(
                f"http://{cat.endpoint(key)}", username=USERNAME, password=PASSWORD
            ) as c:
                assert (await c.get_manifest("private/busybox", "latest"))[2] == pushed.digest
        state = cat.state()
        assert state["mirrors"] == cat.mirrors
        json.dumps(state)
