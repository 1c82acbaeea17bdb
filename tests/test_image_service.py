"""The CRI ImageService against a real containerd and real local registries.

Everything goes through the shim's socket the way kubelet and crictl call it,
and containerd's own view is checked too: image records with the CRI plugin's
names and labels, GC labels on the content, committed snapshots per chain id,
no pull lease left behind. The shims here use their own containerd namespace
so removals never disturb other test modules.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.containerd.leases import Leases
from cri_shim.containerd.snapshots import Snapshots
from cri_shim.cri.image import oci_image_spec
from cri_shim.errors import ContainerdError
from cri_shim.gen.containerd.services.content import v1 as content_v1
from cri_shim.gen.containerd.services.images import v1 as images_v1
from cri_shim.gen.containerd.services.leases import v1 as leases_v1
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.gen.google.protobuf import FieldMask
from cri_shim.gen.runtime import v1 as cri
from cri_shim.images.store import ImageContent, ImageStore, chain_ids, split_names
from cri_shim.images.usage import disk_usage, upper_directory
from cri_shim.registry.types import Descriptor
from cri_shim.server import Shim
from tests.conftest import CriClient, make_settings, short_tempdir, wait_for
from tests.support import images as im
from tests.support.catalog import AUTH, LOCAL, PASSWORD, TOKEN, USERNAME, ServedCatalog, own_images
from tests.support.registry import FakeRegistry, broken_mirror, stalling_registry
from tests.support.tools import require_tool

NAMESPACE = "cri-shim-image-tests"
SANDBOX_IMAGE = "registry.k8s.io/pause:3.9"


# ------------------------------------------------------------------ fixtures


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def catalog() -> AsyncIterator[ServedCatalog]:
    require_tool("docker-registry", "docker-registry")
    async with ServedCatalog(entries=own_images()) as served:
        yield served


@contextlib.asynccontextmanager
async def running_shim(
    containerd: EmbeddedContainerd, **overrides: object
) -> AsyncIterator[tuple[Shim, CriClient]]:
    base = short_tempdir("crishim-img-")
    settings = make_settings(
        base,
        containerd.address,
        containerd__namespace=NAMESPACE,
        runtime__sandbox_image=SANDBOX_IMAGE,
        **overrides,
    )
    shim = Shim(settings)
    await shim.start()
    client = CriClient.connect(shim.socket_path)
    try:
        yield shim, client
    finally:
        client.close()
        await shim.stop()
        shutil.rmtree(base, ignore_errors=True)


def mirrors(catalog: ServedCatalog, *extra_first: str) -> dict[str, object]:
    """docker.io and registry.k8s.io served by the local registry (extra mirrors first)."""
    local = catalog.registries[LOCAL].url
    endpoints = [*extra_first, local]
    return {
        "docker.io": {"endpoint": endpoints},
        "registry.k8s.io": {"endpoint": [local]},
    }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(
    containerd: EmbeddedContainerd, catalog: ServedCatalog
) -> AsyncIterator[tuple[Shim, CriClient]]:
    """A shim whose docker.io and registry.k8s.io are the local registry."""
    async with running_shim(containerd, registry__mirrors=mirrors(catalog)) as pair:
        yield pair


@pytest_asyncio.fixture(loop_scope="session")
async def images(served: tuple[Shim, CriClient]) -> cri.ImageServiceStub:
    return served[1].image


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ctd(containerd: EmbeddedContainerd) -> AsyncIterator[ContainerdClient]:
    """A direct containerd client in the tests' namespace, to check containerd's view."""
    client = ContainerdClient(containerd.address, NAMESPACE)
    yield client
    client.close()


# ------------------------------------------------------------------ helpers


def spec(image: str) -> cri.ImageSpec:
    return cri.ImageSpec(image=image)


async def pull(stub: cri.ImageServiceStub, image: str, auth: cri.AuthConfig | None = None) -> str:
    reply = await stub.pull_image(cri.PullImageRequest(image=spec(image), auth=auth), timeout=60)
    return reply.image_ref


async def status(
    stub: cri.ImageServiceStub, image: str, verbose: bool = False
) -> cri.ImageStatusResponse:
    return await stub.image_status(cri.ImageStatusRequest(image=spec(image), verbose=verbose))


async def records(ctd: ContainerdClient) -> dict[str, images_v1.Image]:
    reply = await ctd.images.list(images_v1.ListImagesRequest())
    return {image.name: image for image in reply.images}


async def content_labels(ctd: ContainerdClient, digest: str) -> dict[str, str] | None:
    try:
        reply = await ctd.call(
            "Content.Info", ctd.content.info(content_v1.InfoRequest(digest=digest))
        )
    except ContainerdError as err:
        assert err.status is Status.NOT_FOUND
        return None
    assert reply.info is not None
    return dict(reply.info.labels)


async def snapshot_kind(ctd: ContainerdClient, key: str) -> snapshots_v1.Kind | None:
    try:
        reply = await ctd.call(
            "Snapshots.Stat",
            ctd.snapshots.stat(snapshots_v1.StatSnapshotRequest(snapshotter="overlayfs", key=key)),
        )
    except ContainerdError as err:
        assert err.status is Status.NOT_FOUND
        return None
    assert reply.info is not None
    return reply.info.kind


async def pull_leases(ctd: ContainerdClient) -> list[str]:
    reply = await ctd.leases.list(leases_v1.ListRequest())
    return [lease.id for lease in reply.leases if lease.id.startswith("cri-shim-")]


def expected_size(image: im.Image, index: im.ImageIndex | None = None) -> int:
    """What containerd reports: index (if any) + manifest + config + compressed layers."""
    size = image.manifest.size + image.config.size + sum(layer.size for layer in image.layers)
    return size + (index.manifest.size if index is not None else 0)


def host_image(catalog: ServedCatalog, name: str) -> tuple[im.Image, im.ImageIndex | None]:
    pushed = catalog.images[name].image
    if isinstance(pushed, im.ImageIndex):
        return pushed.for_platform(im.Platform.host()), pushed
    return pushed, None


# ------------------------------------------------------------------ store (no containerd)


def _content(config_digest: str, diff_ids: list[str]) -> ImageContent:
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    layers = tuple(Descriptor("application/vnd.oci.image.layer.v1.tar", d, 10) for d in diff_ids)
    manifest = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "m" * 64, 5)
    return ImageContent.build(
        manifest, manifest, Descriptor("x", config_digest, len(config)), config, layers
    )


def test_chain_ids_follow_the_oci_definition() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    chains = chain_ids([a, b])
    assert chains[0] == a
    assert chains[1] == im.sha256_digest(f"{a} {b}".encode())


def test_store_lookups_like_containerd() -> None:
    store = ImageStore()
    one = "sha256:" + "1" * 63 + "a"
    two = "sha256:" + "1" * 63 + "b"
    store.set(
        "docker.io/library/busybox:latest", _content(one, ["sha256:" + "c" * 64]), pinned=False
    )
    store.set(one, _content(one, ["sha256:" + "c" * 64]), pinned=False)
    store.set("docker.io/library/busybox@sha256:" + "d" * 64, _content(one, []), pinned=False)
    store.set("registry.k8s.io/pause:3.9", _content(two, []), pinned=True)
    assert store.resolve_id("busybox") == one
    assert store.resolve_id("docker.io/library/busybox") == one
    assert store.resolve_id("busybox@sha256:" + "d" * 64) == one
    assert store.resolve_id(one) == one
    assert store.resolve_id(one.removeprefix("sha256:")[:70]) == one
    assert store.resolve_id("111111") is None  # ambiguous prefix
    assert store.resolve_id("sha256:" + "1" * 63 + "b") == two
    assert store.resolve_id("nothing") is None
    record = store.get("busybox")
    assert record is not None and not record.pinned
    assert record.repo_tags == ["docker.io/library/busybox:latest"]
    assert record.repo_digests == ["docker.io/library/busybox@sha256:" + "d" * 64]
    pause = store.get("registry.k8s.io/pause:3.9")
    assert pause is not None and pause.pinned
    # A tag moving to another image leaves the old one with its other names.
    store.set("docker.io/library/busybox:latest", _content(two, []), pinned=False)
    assert store.resolve_id("busybox") == two
    assert store.get(one) is not None
    store.discard(one)
    store.discard("docker.io/library/busybox@sha256:" + "d" * 64)
    assert store.get(one) is None
    assert len(store) == 1


def test_verbose_image_spec_keeps_only_oci_fields() -> None:
    docker_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-02T03:04:05.123456789Z",
        "container": "abc",
        "docker_version": "24.0.0",
        "container_config": {"Hostname": "abc"},
        "config": {"Hostname": "", "User": "", "Env": ["A=b"], "Cmd": ["sh"], "Labels": None},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
        "history": [{"created": "2024-01-02T03:04:05Z", "created_by": "x", "empty_layer": True}],
    }
    assert oci_image_spec(docker_config) == {
        "created": "2024-01-02T03:04:05.123456789Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["A=b"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
        "history": [{"created": "2024-01-02T03:04:05Z", "created_by": "x", "empty_layer": True}],
    }


def test_split_names_skips_the_id_record() -> None:
    tags, digests = split_names(
        ["sha256:" + "a" * 64, "busybox:1", "docker.io/library/busybox@sha256:" + "b" * 64]
    )
    assert tags == ["docker.io/library/busybox:1"]
    assert digests == ["docker.io/library/busybox@sha256:" + "b" * 64]


# ------------------------------------------------------------------ pull


async def test_pull_by_tag_creates_what_containerd_would(
    images: cri.ImageServiceStub, catalog: ServedCatalog, ctd: ContainerdClient
) -> None:
    image, _ = host_image(catalog, "library/busybox:latest")
    digest = catalog.digest("library/busybox:latest")
    image_ref = await pull(images, "busybox")
    assert image_ref == image.config.digest

    got = (await status(images, "busybox")).image
    assert got is not None
    assert got.id == image_ref
    assert got.repo_tags == ["docker.io/library/busybox:latest"]
    assert got.repo_digests == [f"docker.io/library/busybox@{digest}"]
    assert got.size == expected_size(image)
    assert not got.pinned

    found = await records(ctd)
    for name in (
        image_ref,
        "docker.io/library/busybox:latest",
        f"docker.io/library/busybox@{digest}",
    ):
        assert name in found, name
        target = found[name].target
        assert target is not None and target.digest == digest
        assert found[name].labels.get("io.cri-containerd.image") == "managed"
        assert "io.cri-containerd.pinned" not in found[name].labels

    chains = chain_ids(image.diff_ids)
    manifest = await content_labels(ctd, image.manifest.digest)
    assert manifest is not None
    assert manifest["containerd.io/gc.ref.content.config"] == image.config.digest
    assert manifest["containerd.io/gc.ref.content.l.0"] == image.layers[0].digest
    assert manifest["containerd.io/distribution.source.docker.io"] == "library/busybox"
    config = await content_labels(ctd, image.config.digest)
    assert config is not None
    assert config["containerd.io/gc.ref.snapshot.overlayfs"] == chains[-1]
    for layer, diff_id in zip(image.layers, image.diff_ids, strict=True):
        labels = await content_labels(ctd, layer.digest)
        assert labels is not None and labels["containerd.io/uncompressed"] == diff_id
    for chain in chains:
        assert await snapshot_kind(ctd, chain) == snapshots_v1.Kind.COMMITTED
    assert await pull_leases(ctd) == []


async def test_pull_multilayer_by_digest(
    images: cri.ImageServiceStub, catalog: ServedCatalog, ctd: ContainerdClient
) -> None:
    image, _ = host_image(catalog, "test/multilayer:1")
    ref = f"{catalog.endpoint(LOCAL)}/test/multilayer@{image.digest}"
    assert await pull(images, ref) == image.config.digest
    got = (await status(images, ref)).image
    assert got is not None
    assert got.repo_tags == []
    assert got.repo_digests == [ref]
    for chain in chain_ids(image.diff_ids):
        assert await snapshot_kind(ctd, chain) == snapshots_v1.Kind.COMMITTED
    # Pulling it again writes nothing and gives the same answer.
    assert await pull(images, ref) == image.config.digest


async def test_multiarch_index_picks_the_host_platform(
    images: cri.ImageServiceStub, catalog: ServedCatalog, ctd: ContainerdClient
) -> None:
    for tag in ("1", "docker"):
        image, index = host_image(catalog, f"test/multiarch:{tag}")
        assert index is not None
        ref = f"{catalog.endpoint(LOCAL)}/test/multiarch:{tag}"
        assert await pull(images, ref) == image.config.digest
        got = (await status(images, ref)).image
        assert got is not None
        # Both tags hold the same host image (one id), each through its own index.
        assert f"{catalog.endpoint(LOCAL)}/test/multiarch@{index.digest}" in got.repo_digests
        assert got.size == expected_size(image, index)
        labels = await content_labels(ctd, index.digest)
        assert labels is not None
        # Every entry, in index order (the foreign one comes first), like containerd.
        count = len(index.images)
        children = [labels[f"containerd.io/gc.ref.content.m.{i}"] for i in range(count)]
        assert children == [child.digest for child in index.images]
        assert image.digest in children
        for foreign in index.images:
            if foreign is not image:  # other platforms are not downloaded
                assert await content_labels(ctd, foreign.config.digest) is None


async def test_uncompressed_docker_and_large_images(
    images: cri.ImageServiceStub, catalog: ServedCatalog, ctd: ContainerdClient
) -> None:
    for name in ("test/uncompressed:1", "test/docker-schema2:1", "test/large:1"):
        image, _ = host_image(catalog, name)
        assert await pull(images, catalog.local(name)) == image.config.digest
        assert (
            await snapshot_kind(ctd, chain_ids(image.diff_ids)[-1]) == snapshots_v1.Kind.COMMITTED
        )


async def test_pull_with_credentials(images: cri.ImageServiceStub, catalog: ServedCatalog) -> None:
    image, _ = host_image(catalog, "auth/private/busybox:latest")
    ref = catalog.local("auth/private/busybox:latest")
    good = cri.AuthConfig(username=USERNAME, password=PASSWORD)
    assert await pull(images, ref, good) == image.config.digest
    encoded = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    assert await pull(images, ref, cri.AuthConfig(auth=encoded)) == image.config.digest
    token_ref = catalog.local("token/private/busybox:latest")
    assert await pull(images, token_ref, good) == image.config.digest

    for auth in (cri.AuthConfig(username=USERNAME, password="wrong"), None):
        with pytest.raises(GRPCError) as caught:
            await pull(images, ref, auth)
        assert caught.value.status is Status.UNAUTHENTICATED
        message = caught.value.message or ""
        assert catalog.endpoint(AUTH) in message and "Traceback" not in message
        assert "wrong" not in message  # never echo a secret
    with pytest.raises(GRPCError) as caught:
        await pull(images, token_ref, cri.AuthConfig(username=USERNAME, password="nope"))
    assert caught.value.status is Status.UNAUTHENTICATED
    assert catalog.endpoint(TOKEN) in (caught.value.message or "")
    with pytest.raises(GRPCError) as caught:
        await pull(images, ref, cri.AuthConfig(auth="not base64!"))
    assert caught.value.status is Status.INVALID_ARGUMENT


async def test_bad_references_and_missing_images(
    images: cri.ImageServiceStub, catalog: ServedCatalog
) -> None:
    for bad in ("Busybox", "busybox::1", "a" * 64):
        with pytest.raises(GRPCError) as caught:
            await pull(images, bad)
        assert caught.value.status is Status.INVALID_ARGUMENT, bad
        assert "invalid image reference" in (caught.value.message or "")
    with pytest.raises(GRPCError) as caught:
        await pull(images, "")
    assert caught.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(GRPCError) as caught:
        await pull(images, f"{catalog.endpoint(LOCAL)}/test/absent:1")
    assert caught.value.status is Status.NOT_FOUND
    assert "test/absent" in (caught.value.message or "")


async def test_mirror_fallback(
    containerd: EmbeddedContainerd, catalog: ServedCatalog, ctd: ContainerdClient
) -> None:
    """A broken first mirror is skipped; the image comes from the next one."""
    image, _ = host_image(catalog, "test/entrypoint:1")
    async with (
        broken_mirror(500) as broken,
        running_shim(containerd, registry__mirrors=mirrors(catalog, broken.url)) as (_, client),
    ):
        assert await pull(client.image, "test/entrypoint:1") == image.config.digest
        assert broken.requested("manifests")  # it was tried first


async def test_stalled_registry_fails_the_pull_in_time_and_the_retry_resumes(
    containerd: EmbeddedContainerd, ctd: ContainerdClient
) -> None:
    image = im.large_image(size=2 << 20, seed=7)
    layer = image.layers[-1]
    registry = stalling_registry("test/stall", "1", image, fault_after=4096)
    async with registry, running_shim(containerd, registry__stall_timeout=1.0) as (_, client):
        ref = f"{registry.host}/test/stall:1"
        started = time.monotonic()
        with pytest.raises(GRPCError) as caught:
            await pull(client.image, ref)
        assert time.monotonic() - started < 15
        assert caught.value.status is Status.DEADLINE_EXCEEDED
        message = caught.value.message or ""
        assert "sent nothing for 1s" in message and registry.host in message
        assert "Traceback" not in message

        # What arrived is kept (under a lease that outlives the failed pull) ...
        kept = await pull_leases(ctd)
        assert len(kept) == 1 and kept[0].startswith("cri-shim-resume-")
        statuses = await ctd.content.list_statuses(content_v1.ListStatusesRequest())
        ingests = {st.ref: st.offset for st in statuses.statuses}
        assert ingests.get(f"layer-{layer.digest}") == 4096
        # ... and the next pull asks the registry only for the rest.
        registry.blob_fault = "none"
        assert await pull(client.image, ref) == image.config.digest
        ranges = [r.range for r in registry.requested("blobs") if r.path.endswith(layer.digest)]
        assert ranges[-1] == "bytes=4096-"
        assert await pull_leases(ctd) == []


async def test_concurrent_pulls_share_one_download(
    containerd: EmbeddedContainerd, ctd: ContainerdClient, caplog: pytest.LogCaptureFixture
) -> None:
    image = im.large_image(size=1 << 20, seed=11)
    layer = image.layers[-1]  # the big random one; the base is busybox
    # Slow enough (about a second) that every request arrives while the first runs.
    registry = FakeRegistry(
        blob_fault="trickle", trickle_bytes=layer.size // 5 + 1, trickle_interval=0.2
    )
    registry.add("test/shared", "1", image)
    async with registry, running_shim(containerd) as (shim, client):
        ref = f"{registry.host}/test/shared:1"
        assert shim.images is not None
        shim.images.puller.progress_interval = 0.2
        caplog.set_level(logging.INFO, logger="cri_shim.images")
        refs = await asyncio.gather(*(pull(client.image, ref) for _ in range(5)))
        assert set(refs) == {image.config.digest}
        # One resolve: the other four joined the running pull instead of starting their own.
        assert len(registry.requested("manifests")) == 1
        gets = [r.path for r in registry.requested("blobs") if r.method == "GET"]
        assert len([p for p in gets if p.endswith(layer.digest)]) == 1
        # The busybox base layer: once, or not at all when its chain was unpacked before.
        assert len([p for p in gets if p.endswith(image.layers[0].digest)]) <= 1

        # Progress: periodic lines while bytes trickle in, and one per layer.
        progress = [r for r in caplog.records if r.getMessage() == "image pull progress"]
        assert progress
        fields = progress[-1].cri_fields  # type: ignore[attr-defined]
        assert fields["ref"] == ref and 0 < fields["bytes_done"] <= fields["bytes_total"]
        assert {"layers_done", "layers_total"} <= set(fields)
        assert [r for r in caplog.records if r.getMessage() == "layer downloaded"]

        # Present now: another pull fetches no layer (resolving still reads the config).
        def layer_gets() -> int:
            layers = {blob.digest for blob in image.layers}
            return len([r for r in registry.requested("blobs") if r.path.split("/")[-1] in layers])

        before = layer_gets()
        assert await pull(client.image, ref) == image.config.digest
        assert layer_gets() == before
        assert not shim.images._flights


async def test_two_shims_pulling_the_same_image_at_once(
    containerd: EmbeddedContainerd, ctd: ContainerdClient
) -> None:
    """Two runtimes on one containerd namespace (or the shim next to containerd's own
    puller) meet on the same ingest refs and chain ids: one waits for the other's
    lock, commits that lose the race are fine, and both end with the same image."""
    image = im.large_image(size=1 << 20, seed=13)
    layer = image.layers[-1]
    registry = FakeRegistry(
        blob_fault="trickle", trickle_bytes=layer.size // 4 + 1, trickle_interval=0.2
    )
    registry.add("test/race", "1", image)
    async with (
        registry,
        running_shim(containerd) as (_, first),
        running_shim(containerd) as (_, second),
    ):
        ref = f"{registry.host}/test/race:1"
        refs = await asyncio.gather(pull(first.image, ref), pull(second.image, ref))
        assert list(refs) == [image.config.digest] * 2
        for client in (first, second):
            got = (await status(client.image, ref)).image
            assert got is not None and got.id == image.config.digest
    chain = chain_ids(image.diff_ids)[-1]
    assert await snapshot_kind(ctd, chain) == snapshots_v1.Kind.COMMITTED
    listing = ctd.snapshots.list(snapshots_v1.ListSnapshotsRequest(snapshotter="overlayfs"))
    names = [info.name async for part in listing for info in part.info]
    assert not [n for n in names if n.startswith("extract-")]  # no extraction left behind
    assert await pull_leases(ctd) == []


# ------------------------------------------------------------------ list, status


async def test_users_list_and_status(images: cri.ImageServiceStub, catalog: ServedCatalog) -> None:
    expected = {
        "uid": (1234, ""),
        "name": (None, "www"),
        "uid-gid": (1000, ""),
        "name-group": (None, "www"),
    }
    ids = {}
    for tag, (uid, username) in expected.items():
        ids[tag] = await pull(images, catalog.local(f"test/user:{tag}"))
        got = (await status(images, ids[tag])).image
        assert got is not None
        assert (got.uid.value if got.uid is not None else None) == uid, tag
        assert got.username == username, tag

    listed = await images.list_images(cri.ListImagesRequest())
    by_id = {image.id: image for image in listed.images}
    assert set(ids.values()) <= set(by_id)
    assert by_id[ids["uid"]].repo_tags == [catalog.local("test/user:uid")]

    only = await images.list_images(
        cri.ListImagesRequest(filter=cri.ImageFilter(image=spec(catalog.local("test/user:name"))))
    )
    assert [i.id for i in only.images] == [ids["name"]]
    by_short_id = await images.list_images(
        cri.ListImagesRequest(filter=cri.ImageFilter(image=spec(ids["uid"][7:19])))
    )
    assert [i.id for i in by_short_id.images] == [ids["uid"]]


async def test_status_lookups_and_verbose_info(
    images: cri.ImageServiceStub, catalog: ServedCatalog
) -> None:
    image, _ = host_image(catalog, "library/busybox:latest")
    image_id = await pull(images, "docker.io/library/busybox:latest")
    digest = catalog.digest("library/busybox:latest")
    for name in (
        "busybox",
        "busybox:latest",
        "docker.io/library/busybox",
        f"busybox@{digest}",
        image_id,
        image_id[7:],
        image_id[7:19],
    ):
        got = (await status(images, name)).image
        assert got is not None and got.id == image_id, name

    absent = await status(images, "docker.io/library/absent:1")
    assert absent.image is None and absent.info == {}

    verbose = await status(images, "busybox", verbose=True)
    info = json.loads(verbose.info["info"])
    assert info["imageSpec"] == image.config_json
    # The OCI image spec's ChainID, computed here: sha256 of "<parent> <diff id>".
    chain = image.diff_ids[0]
    for diff_id in image.diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    assert info["chainID"] == chain
    assert set(info) == {"chainID", "imageSpec"}  # exactly what containerd reports
    assert (await status(images, "busybox")).info == {}


async def test_sandbox_image_is_pinned(
    served: tuple[Shim, CriClient], catalog: ServedCatalog, ctd: ContainerdClient
) -> None:
    shim, client = served
    image, _ = host_image(catalog, "pause:3.9")
    assert await pull(client.image, SANDBOX_IMAGE) == image.config.digest
    got = (await status(client.image, SANDBOX_IMAGE)).image
    assert got is not None and got.pinned
    found = await records(ctd)
    assert found[image.config.digest].labels.get("io.cri-containerd.pinned") == "pinned"
    assert found[SANDBOX_IMAGE].labels.get("io.cri-containerd.pinned") == "pinned"

    # ensure_image: what the sandbox code calls; local images are not pulled again.
    assert shim.images is not None
    record = await shim.images.ensure_image(SANDBOX_IMAGE, pinned=True)
    assert record.id == image.config.digest
    assert record.chain_id == chain_ids(image.diff_ids)[-1]
    assert record.config["rootfs"]["diff_ids"] == list(image.diff_ids)
    # Pinning an image that is already there labels all its records.
    httpd = await shim.images.ensure_image(catalog.local("test/httpd:1"))
    assert not httpd.pinned
    pinned = await shim.images.ensure_image(catalog.local("test/httpd:1"), pinned=True)
    assert pinned.pinned
    found = await records(ctd)
    assert all(
        found[name].labels.get("io.cri-containerd.pinned") == "pinned" for name in pinned.references
    )


# ------------------------------------------------------------------ remove, fs info, restart


async def test_remove_image_removes_every_name_and_is_idempotent(
    images: cri.ImageServiceStub, catalog: ServedCatalog, ctd: ContainerdClient
) -> None:
    image, _ = host_image(catalog, "test/entrypoint:1")
    ref = "docker.io/test/entrypoint:1"
    image_id = await pull(images, ref)
    by_digest = f"docker.io/test/entrypoint@{catalog.digest('test/entrypoint:1')}"
    assert await pull(images, by_digest) == image_id
    assert image_id in await records(ctd)

    await images.remove_image(cri.RemoveImageRequest(image=spec("test/entrypoint:1")))
    found = await records(ctd)
    assert not {image_id, ref, by_digest} & set(found)
    assert (await status(images, image_id)).image is None
    listed = await images.list_images(cri.ListImagesRequest())
    assert image_id not in {i.id for i in listed.images}
    # containerd collected what only this image used.
    assert await content_labels(ctd, image.config.digest) is None
    assert await snapshot_kind(ctd, chain_ids(image.diff_ids)[-1]) is None

    for again in ("test/entrypoint:1", image_id):
        await images.remove_image(cri.RemoveImageRequest(image=spec(again)))
    with pytest.raises(GRPCError) as caught:
        await images.remove_image(cri.RemoveImageRequest(image=spec("")))
    assert caught.value.status is Status.INVALID_ARGUMENT

    # By id, with a short prefix, too.
    image_id = await pull(images, ref)
    await images.remove_image(cri.RemoveImageRequest(image=spec(image_id[7:19])))
    assert (await status(images, ref)).image is None


async def test_image_fs_info(images: cri.ImageServiceStub, containerd: EmbeddedContainerd) -> None:
    await pull(images, "busybox")
    reply = await images.image_fs_info(cri.ImageFsInfoRequest())
    assert len(reply.image_filesystems) == 1
    fs = reply.image_filesystems[0]
    assert fs.fs_id is not None and fs.fs_id.mountpoint.endswith(
        "io.containerd.snapshotter.v1.overlayfs"
    )
    assert fs.fs_id.mountpoint.startswith(str(containerd.base))
    assert fs.used_bytes is not None and fs.used_bytes.value > 100_000
    assert fs.inodes_used is not None and fs.inodes_used.value > 10
    assert abs(fs.timestamp - time.time_ns()) < 60 * 10**9
    assert reply.container_filesystems == reply.image_filesystems


async def test_images_survive_a_shim_restart(
    images: cri.ImageServiceStub, containerd: EmbeddedContainerd
) -> None:
    image_id = await pull(images, "busybox")
    before = (await status(images, image_id)).image
    async with running_shim(containerd) as (_, client):
        after = (await status(client.image, "busybox")).image
        assert after == before
        listed = await client.image.list_images(cri.ListImagesRequest())
        assert image_id in {i.id for i in listed.images}


async def test_reload_sees_changes_made_behind_the_shims_back(
    served: tuple[Shim, CriClient], ctd: ContainerdClient
) -> None:
    shim, client = served
    image_id = await pull(client.image, "busybox")
    names = [n for n in (await records(ctd)) if n.startswith("docker.io/library/busybox")]
    for name in names:
        await ctd.images.delete(images_v1.DeleteImageRequest(name=name))
    assert shim.images is not None
    await shim.images.reload()
    assert (await status(client.image, "busybox")).image is None
    got = (await status(client.image, image_id)).image
    assert got is not None  # the id record (and other registries' names) remain
    assert not [n for n in [*got.repo_tags, *got.repo_digests] if "library/busybox" in n]
    await pull(client.image, "busybox")


async def test_images_created_outside_the_cri_are_adopted(
    served: tuple[Shim, CriClient], ctd: ContainerdClient
) -> None:
    """`ctr -n k8s.io images import` leaves records without the CRI label; like
    containerd's CRI plugin, the shim labels them and adds the id record."""
    shim, client = served
    image_id = await pull(client.image, "busybox")
    target = (await records(ctd))["docker.io/library/busybox:latest"].target
    name = "example.com/imported/busybox:v1"
    await ctd.images.create(
        images_v1.CreateImageRequest(image=images_v1.Image(name=name, target=target))
    )
    assert shim.images is not None
    await shim.images.reload()
    got = (await status(client.image, name)).image
    assert got is not None and got.id == image_id and name in got.repo_tags
    assert (await records(ctd))[name].labels.get("io.cri-containerd.image") == "managed"
    await client.image.remove_image(cri.RemoveImageRequest(image=spec(name)))
    assert name not in await records(ctd)


async def test_own_record_writes_are_not_read_back_but_other_clients_writes_are(
    served: tuple[Shim, CriClient],
    ctd: ContainerdClient,
    catalog: ServedCatalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """containerd echoes every record the shim writes as an event; reading those
    back cost a dozen round trips just as a pull returns (critest's ImageStatus
    right after PullImage took 3x longer). The shim's own writes are not read back;
    another client's change to the same name, right after, still is."""
    shim, client = served
    manager = shim.images
    assert manager is not None
    read_back: list[str] = []
    original_get = manager.records.get

    async def counting_get(name: str) -> images_v1.Image | None:
        read_back.append(name)
        return await original_get(name)

    monkeypatch.setattr(manager.records, "get", counting_get)
    tag = "docker.io/library/busybox:latest"
    await client.image.remove_image(cri.RemoveImageRequest(image=spec("busybox")))
    image_id = await pull(client.image, "busybox")
    # Each of the pull's record writes is announced until its event arrives.
    assert await wait_for(lambda: _async(len(manager.echoes) == 0), timeout=10)
    assert read_back == []
    pulled = (await status(client.image, "busybox")).image
    assert pulled is not None and pulled.id == image_id

    other = await pull(client.image, f"{catalog.endpoint(LOCAL)}/test/multilayer:1")
    other_target = (await records(ctd))[f"{catalog.endpoint(LOCAL)}/test/multilayer:1"].target
    await ctd.images.update(
        images_v1.UpdateImageRequest(
            image=images_v1.Image(name=tag, target=other_target),
            update_mask=FieldMask(paths=["target"]),
        )
    )

    async def retagged() -> bool:
        got = (await status(client.image, "busybox")).image
        return got is not None and got.id == other

    assert await wait_for(retagged, timeout=10), "another client's retag was not followed"
    assert tag in read_back
    await client.image.remove_image(cri.RemoveImageRequest(image=spec("busybox")))
    assert await pull(client.image, "busybox") == image_id


async def _async(value: bool) -> bool:
    return value


async def test_writable_layer_usage_measured_here_is_containerds(
    served: tuple[Shim, CriClient], ctd: ContainerdClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shim measures an active snapshot's upper directory itself instead of a
    Snapshots.Usage round trip per container per stats round; the figures must be
    containerd's own: hard links once, sparse files by allocated blocks, symlinks
    not followed, directories counted, with a parent (overlay) and without (bind)."""
    shim, client = served
    assert shim.images is not None
    image_id = await pull(client.image, "busybox")
    record = shim.images.store.get(image_id)
    assert record is not None
    usage = shim.images.usage
    snapshots = Snapshots(ctd, "overlayfs")

    async def no_round_trip(key: str) -> tuple[int, int] | None:
        raise AssertionError(f"Snapshots.Usage asked for {key}")

    for parent in (record.chain_id, ""):
        key = f"du-{random.getrandbits(32):08x}"
        # Held by a lease: containerd's GC collects a snapshot nothing references.
        async with Leases(ctd).held("du-test-", datetime.timedelta(minutes=5)) as lease:
            upper = upper_directory(await snapshots.prepare(key, parent, lease=lease))
            assert upper is not None
            root = Path(upper)
            (root / "dir" / "deeper").mkdir(parents=True)
            (root / "dir" / "data").write_bytes(os.urandom(100_000))
            os.link(root / "dir" / "data", root / "hardlink")
            with (root / "sparse").open("wb") as sparse:
                sparse.truncate(50 * 1024 * 1024)
                sparse.write(b"x")
            (root / "dir" / "deeper" / "empty").touch()
            os.symlink("/etc/passwd", root / "link")
            expected = await snapshots.usage(key)
            assert disk_usage(upper) == expected
            monkeypatch.setattr(usage, "_usage", no_round_trip)
            assert await usage.of(key) == expected
            monkeypatch.undo()


async def content_digests(ctd: ContainerdClient) -> set[str]:
    """Every committed blob in the tests' namespace."""
    found: set[str] = set()
    async for reply in ctd.content.list(content_v1.ListContentRequest()):
        found |= {info.digest for info in reply.info}
    return found


async def test_corrupt_layer_fails_the_pull_with_data_loss_and_leaves_nothing(
    containerd: EmbeddedContainerd, ctd: ContainerdClient
) -> None:
    """A registry that flips one byte of a layer: the shim's own pull path (the
    commit containerd verifies) refuses it with DATA_LOSS, keeps no image record,
    committed blob, ingest or lease, and a retry against a healthy registry works."""
    # One incompressible layer: the corrupt one is the only download, so no
    # healthy partial download is cut off (those are kept for resuming).
    data = random.Random(29).randbytes(256 << 10)
    image = im.build_image([im.layer([im.file("blob", data)])])
    layer = image.layers[-1]
    registry = FakeRegistry(blob_fault="corrupt", fault_after=layer.size // 2)
    registry.add("test/corrupt", "1", image)
    async with registry, running_shim(containerd) as (_, client):
        ref = f"{registry.host}/test/corrupt:1"
        content_before = await content_digests(ctd)
        leases_before = {
            lease.id for lease in (await ctd.leases.list(leases_v1.ListRequest())).leases
        }
        with pytest.raises(GRPCError) as caught:
            await pull(client.image, ref)
        assert caught.value.status is Status.DATA_LOSS, caught.value
        message = caught.value.message or ""
        assert layer.digest in message and "does not match its digest" in message, message
        assert "Traceback" not in message
        # The corrupt layer was really sent to the shim (not refused before download).
        assert [r for r in registry.requested("blobs") if r.path.endswith(layer.digest)]

        assert not [name for name in await records(ctd) if "test/corrupt" in name]
        leases = {lease.id for lease in (await ctd.leases.list(leases_v1.ListRequest())).leases}
        assert leases == leases_before
        statuses = await ctd.content.list_statuses(content_v1.ListStatusesRequest())
        assert not [st.ref for st in statuses.statuses if layer.digest in st.ref]

        # The pull lease went synchronously: containerd's GC has already collected
        # what only it held (the manifest and config) when the error comes back.
        assert await content_digests(ctd) <= content_before, (
            await content_digests(ctd)
        ) - content_before
        assert layer.digest not in await content_digests(ctd)

        registry.blob_fault = "none"  # the registry heals: the retry succeeds
        assert await pull(client.image, ref) == image.config.digest
        assert layer.digest in await content_digests(ctd)
        assert await status(client.image, ref)
        await client.image.remove_image(cri.RemoveImageRequest(image=spec(ref)))
