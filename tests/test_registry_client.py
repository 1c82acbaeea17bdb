"""The registry client against Debian's real docker-registry (open, basic auth, token
auth) and against fault-injecting fakes for what a real registry never does on cue:
broken mirrors, stalls, trickles, truncation, corruption, lying digests."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import random
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from cri_shim.registry import (
    Credentials,
    Descriptor,
    DigestMismatchError,
    DigestVerifier,
    ImageNotFoundError,
    Platform,
    PlatformNotFoundError,
    PullStalledError,
    RegistryAuthError,
    RegistryClient,
    RegistryUnavailableError,
    ResolvedImage,
    UnsupportedManifestError,
    host_platform,
    parse_reference,
)
from cri_shim.registry import platforms as plat
from cri_shim.registry.auth import parse_challenges
from cri_shim.registry.types import DOCKER_SCHEMA1_SIGNED_MANIFEST
from cri_shim.settings import (
    RegistryAuthSettings,
    RegistryHostSettings,
    RegistryMirrorSettings,
    RegistrySettings,
    RegistryTlsSettings,
)
from tests.support import images as im
from tests.support.registry import FakeRegistry, Registry, broken_mirror, free_port
from tests.support.tools import require_tool

HOST = host_platform()


@pytest.fixture
def registry_installed() -> None:
    require_tool("docker-registry", "docker-registry")


# docker-registry missing fails these tests (deploy/setup-dev.sh installs it).
needs_registry = pytest.mark.usefixtures("registry_installed")


# ------------------------------------------------------------------ fixtures


@dataclass(frozen=True)
class Images:
    busybox: im.Image
    docker: im.Image
    multiarch: im.ImageIndex
    multiarch_docker: im.ImageIndex
    noisy: im.Image  # small, incompressible layer: for trickling


@pytest.fixture(scope="module")
def images() -> Images:
    noise = random.Random(7).randbytes(4096)
    return Images(
        busybox=im.busybox_image(),
        docker=im.multilayer_image(media="docker"),
        multiarch=im.multiarch_index(),
        multiarch_docker=im.multiarch_index(media="docker"),
        noisy=im.build_image([im.layer([im.file("noise", noise)])]),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def open_registry(images: Images) -> AsyncIterator[Registry]:
    require_tool("docker-registry", "docker-registry")
    async with Registry(name="open") as reg:
        await reg.push("test/busybox", "1", images.busybox)
        await reg.push("test/docker", "1", images.docker)
        await reg.push("test/multiarch", "oci", images.multiarch)
        await reg.push("test/multiarch", "docker", images.multiarch_docker)
        yield reg


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def basic_registry(images: Images) -> AsyncIterator[Registry]:
    require_tool("docker-registry", "docker-registry")
    async with Registry(auth="basic", name="basic") as reg:
        await reg.push("private/busybox", "latest", images.busybox)
        yield reg


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def token_registry(images: Images) -> AsyncIterator[Registry]:
    require_tool("docker-registry", "docker-registry")
    async with Registry(auth="token", name="token") as reg:
        await reg.push("private/busybox", "latest", images.busybox)
        yield reg


MakeClient = Callable[..., RegistryClient]


@pytest_asyncio.fixture(loop_scope="session")
async def make_client() -> AsyncIterator[MakeClient]:
    """`make_client(**RegistrySettings fields)`; clients are closed after the test."""
    clients: list[RegistryClient] = []

    def make(**fields: Any) -> RegistryClient:
        client = RegistryClient(RegistrySettings(**fields))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING, logger="cri_shim.registry")
    yield caplog


def fallbacks(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        getattr(r, "cri_fields", {})
        for r in caplog.records
        if r.getMessage() == "registry endpoint failed, trying the next one"
    ]


def mirrors(domain: str, *urls: str) -> dict[str, RegistryMirrorSettings]:
    return {domain: RegistryMirrorSettings(endpoint=urls)}


async def read_blob(
    client: RegistryClient,
    image: ResolvedImage,
    descriptor: Descriptor,
    credentials: Credentials | None = None,
    *,
    offset: int = 0,
) -> bytes:
    parts = [c async for c in client.blob_stream(image, descriptor, credentials, offset=offset)]
    return b"".join(parts)


async def pull_all(
    client: RegistryClient, image: ResolvedImage, credentials: Credentials | None = None
) -> list[bytes]:
    """Every layer, digest-verified the way the containerd side does it."""
    layers = []
    for layer in image.layers:
        verifier = DigestVerifier.for_descriptor(layer)
        async for chunk in client.blob_stream(image, layer, credentials):
            verifier.update(chunk)
        verifier.verify(layer)
        layers.append(await read_blob(client, image, layer, credentials))
    return layers


def check_single(resolved: ResolvedImage, image: im.Image) -> None:
    assert resolved.index is None and resolved.index_bytes is None
    assert resolved.manifest.digest == image.digest
    assert resolved.manifest.media_type == image.media_type
    assert resolved.manifest.size == image.manifest.size
    assert resolved.manifest_bytes == image.manifest.data
    assert resolved.target == resolved.manifest
    assert resolved.config.digest == image.config.digest
    assert resolved.config_bytes == image.config.data
    assert [(d.digest, d.size, d.media_type) for d in resolved.layers] == [
        (b.digest, b.size, b.media_type) for b in image.layers
    ]
    assert resolved.manifest.platform is not None
    assert resolved.manifest.platform.architecture == image.platform.architecture


# ------------------------------------------------------------------ resolve


@needs_registry
async def test_resolve_oci_by_tag(
    open_registry: Registry, images: Images, make_client: MakeClient
) -> None:
    client = make_client()
    ref = parse_reference(f"{open_registry.host}/test/busybox:1")
    resolved = await client.resolve(ref)
    check_single(resolved, images.busybox)
    assert resolved.reference == ref
    assert resolved.name == f"{open_registry.host}/test/busybox:1"
    assert resolved.endpoint == f"http://{open_registry.host}/v2"
    assert resolved.repo_digest == f"{open_registry.host}/test/busybox@{images.busybox.digest}"
    assert await pull_all(client, resolved) == [b.data for b in images.busybox.layers]


@needs_registry
async def test_resolve_docker_schema2_by_tag_and_by_digest(
    open_registry: Registry, images: Images, make_client: MakeClient
) -> None:
    client = make_client()
    img = images.docker
    repo = f"{open_registry.host}/test/docker"
    for text in (f"{repo}:1", f"{repo}@{img.digest}", f"{repo}:1@{img.digest}"):
        resolved = await client.resolve(parse_reference(text))
        check_single(resolved, img)
        assert resolved.manifest.media_type == im.DOCKER_MANIFEST
        assert resolved.config.media_type == im.DOCKER_CONFIG
        assert resolved.name == text
    assert await pull_all(client, resolved) == [b.data for b in img.layers]


@needs_registry
@pytest.mark.parametrize("tag", ["oci", "docker"])
async def test_index_picks_this_hosts_platform(
    open_registry: Registry, images: Images, make_client: MakeClient, tag: str
) -> None:
    index = images.multiarch if tag == "oci" else images.multiarch_docker
    host_image = index.for_platform(im.Platform.host())
    assert index.images[0] is not host_image  # a first-entry puller would get it wrong
    resolved = await make_client().resolve(
        parse_reference(f"{open_registry.host}/test/multiarch:{tag}")
    )
    assert resolved.index is not None
    assert resolved.index.digest == index.digest
    assert resolved.index.media_type == index.media_type
    assert resolved.index_bytes == index.manifest.data
    assert resolved.target == resolved.index
    assert resolved.manifest.digest == host_image.digest
    assert resolved.manifest.platform is not None
    assert resolved.manifest.platform.architecture == HOST.architecture
    assert resolved.config_bytes == host_image.config.data
    assert [d.digest for d in resolved.layers] == [b.digest for b in host_image.layers]
    assert resolved.repo_digest.endswith(f"/test/multiarch@{index.digest}")


@needs_registry
async def test_index_for_another_platform_and_none_matching(
    open_registry: Registry, images: Images, make_client: MakeClient
) -> None:
    client = make_client()
    ref = parse_reference(f"{open_registry.host}/test/multiarch:oci")
    for want in (Platform("linux", "s390x"), Platform("linux", "arm64")):
        if plat.normalize(want) == plat.normalize(HOST):
            continue
        resolved = await client.resolve(ref, platform=want)
        assert resolved.manifest.platform is not None
        assert plat.normalize(resolved.manifest.platform).architecture == want.architecture
        expected = next(
            i for i in images.multiarch.images if i.platform.architecture == want.architecture
        )
        assert resolved.manifest.digest == expected.digest
    with pytest.raises(PlatformNotFoundError) as caught:
        await client.resolve(ref, platform=Platform("linux", "riscv64", ""))
    message = str(caught.value)
    assert "has no image for platform linux/riscv64" in message
    assert "linux/s390x" in message and str(im.Platform.host()) in message
    assert isinstance(caught.value, ImageNotFoundError)


@needs_registry
async def test_missing_images_are_not_found(
    open_registry: Registry, images: Images, make_client: MakeClient
) -> None:
    client = make_client()
    host = open_registry.host
    for text in (
        f"{host}/test/nope:1",
        f"{host}/test/busybox:nope",
        f"{host}/test/busybox@{images.docker.digest}",
    ):
        with pytest.raises(ImageNotFoundError) as caught:
            await client.resolve(parse_reference(text))
        assert text in str(caught.value) and host in str(caught.value)
        assert caught.value.host == host


@needs_registry
async def test_blob_ranges(
    open_registry: Registry, images: Images, make_client: MakeClient
) -> None:
    client = make_client()
    resolved = await client.resolve(parse_reference(f"{open_registry.host}/test/docker:1"))
    layer, data = resolved.layers[0], images.docker.layers[0].data
    assert await read_blob(client, resolved, layer, offset=100) == data[100:]
    assert await read_blob(client, resolved, layer, offset=layer.size) == b""
    with pytest.raises(ValueError):
        await read_blob(client, resolved, layer, offset=layer.size + 1)


# ------------------------------------------------------------------ auth


@needs_registry
async def test_basic_auth(
    basic_registry: Registry, images: Images, make_client: MakeClient
) -> None:
    reg = basic_registry
    ref = parse_reference(f"{reg.host}/private/busybox")
    raw = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
    good = Credentials.from_auth_field(raw)
    assert good == Credentials(reg.username, reg.password)
    client = make_client()
    resolved = await client.resolve(ref, good)
    check_single(resolved, images.busybox)
    assert await pull_all(client, resolved, good) == [b.data for b in images.busybox.layers]

    with pytest.raises(RegistryAuthError) as caught:
        await client.resolve(ref, Credentials(reg.username, "wrong"))
    assert caught.value.status_code == 401
    assert f"registry {reg.host} refused credentials for user 'cri-shim' (401)" in str(caught.value)
    assert "wrong" not in str(caught.value)

    with pytest.raises(RegistryAuthError) as caught:
        await make_client().resolve(ref)
    assert caught.value.status_code == 401
    assert f"registry {reg.host} requires authentication" in str(caught.value)


@needs_registry
async def test_static_credentials_from_config(
    basic_registry: Registry, images: Images, make_client: MakeClient
) -> None:
    reg = basic_registry
    ref = parse_reference(f"{reg.host}/private/busybox:latest")
    raw = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
    for auth in (
        RegistryAuthSettings(username=reg.username, password=reg.password),
        RegistryAuthSettings(auth=raw),
    ):
        client = make_client(configs={reg.host: RegistryHostSettings(auth=auth)})
        resolved = await client.resolve(ref)
        assert resolved.manifest.digest == images.busybox.digest
        assert len(await pull_all(client, resolved)) == 1
        # Credentials in the request win over the configured ones.
        with pytest.raises(RegistryAuthError):
            await client.resolve(ref, Credentials("someone", "else"))


@needs_registry
async def test_bearer_token_auth(
    token_registry: Registry, images: Images, make_client: MakeClient
) -> None:
    reg = token_registry
    assert reg.token_server is not None
    tokens = reg.token_server.requests
    ref = parse_reference(f"{reg.host}/private/busybox:latest")
    creds = Credentials(reg.username, reg.password)
    client = make_client()
    before = len(tokens)
    resolved = await client.resolve(ref, creds)
    check_single(resolved, images.busybox)
    await pull_all(client, resolved, creds)
    assert len(tokens) == before + 1  # one token for the whole pull
    assert tokens[-1] == {"scope": "repository:private/busybox:pull", "authed": "True"}
    await client.resolve(ref, creds)
    assert len(tokens) == before + 1  # cached until it expires

    with pytest.raises(RegistryAuthError) as caught:
        await client.resolve(ref, Credentials(reg.username, "wrong"))
    assert caught.value.status_code == 401
    assert f"registry {reg.host} refused credentials for user 'cri-shim' (401)" in str(caught.value)

    with pytest.raises(RegistryAuthError) as caught:
        await make_client().resolve(ref)
    assert f"registry {reg.host} requires authentication" in str(caught.value)


@needs_registry
async def test_registry_and_identity_tokens(
    token_registry: Registry, make_client: MakeClient
) -> None:
    reg = token_registry
    server = reg.token_server
    assert server is not None
    ref = parse_reference(f"{reg.host}/private/busybox:latest")
    now = int(time.time())
    token = server.sign(
        {
            "iss": server.issuer,
            "sub": reg.username,
            "aud": server.service,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": "registry-token-test",
            "access": [{"type": "repository", "name": "private/busybox", "actions": ["pull"]}],
        }
    )
    before = len(server.requests)
    resolved = await make_client().resolve(ref, Credentials(registry_token=token))
    assert len(server.requests) == before  # used as is, no token request
    assert len(resolved.layers) == 1
    # An identity token goes to the OAuth2 endpoint first; this token server only
    # speaks GET, so the client falls back to the basic-auth token request.
    creds = Credentials(reg.username, reg.password, identity_token="refresh-me")
    await make_client().resolve(ref, creds)
    assert server.requests[-1]["authed"] == "True"
    assert "method" not in server.requests[-1]  # the GET


@needs_registry
async def test_identity_token_is_refreshed_by_oauth2_post(
    token_registry: Registry, make_client: MakeClient
) -> None:
    """An identity token (docker login's refresh token) alone pulls: it is sent to
    the realm as an OAuth2 refresh-token POST, as containerd's docker resolver does."""
    server = token_registry.token_server
    assert server is not None
    ref = parse_reference(f"{token_registry.host}/private/busybox:latest")
    server.refresh_token = "refresh-ok"
    try:
        resolved = await make_client().resolve(ref, Credentials(identity_token="refresh-ok"))
        assert len(resolved.layers) == 1
        posted = [r for r in server.requests if r.get("method") == "POST"]
        assert posted, server.requests
        form = posted[-1]
        assert form["grant_type"] == "refresh_token"
        assert form["refresh_token"] == "refresh-ok"
        assert form["service"] == server.service
        assert form["scope"] == "repository:private/busybox:pull"
        assert form["client_id"]
        assert form["authed"] == "True"
        # A refresh token the server refuses fails the pull as an auth error.
        with pytest.raises(RegistryAuthError):
            await make_client().resolve(ref, Credentials(identity_token="revoked"))
    finally:
        server.refresh_token = ""


# ------------------------------------------------------------------ mirrors


@needs_registry
async def test_mirror_fallback_on_500_and_404(
    open_registry: Registry,
    images: Images,
    make_client: MakeClient,
    warnings: pytest.LogCaptureFixture,
) -> None:
    ref = parse_reference("docker.io/test/busybox:1")
    async with broken_mirror(500) as broken, FakeRegistry() as empty:
        client = make_client(mirrors=mirrors("docker.io", broken.url, empty.url, open_registry.url))
        resolved = await client.resolve(ref)
        check_single(resolved, images.busybox)
        assert resolved.endpoint == f"{open_registry.url}/v2"
        assert [r.path for r in broken.requested("manifests")] == ["/v2/test/busybox/manifests/1"]
        assert [r.path for r in empty.requested("manifests")] == ["/v2/test/busybox/manifests/1"]
        logged = fallbacks(warnings)
        assert [e["endpoint"] for e in logged] == [f"{broken.url}/v2", f"{empty.url}/v2"]
        assert "HTTP 500" in logged[0]["error"] and "not found" in logged[1]["error"]
        # Blobs come from the endpoint that resolved: the broken mirror is not asked again.
        assert await pull_all(client, resolved) == [b.data for b in images.busybox.layers]
        assert broken.requested("blobs") == []


async def test_every_endpoint_failing_is_one_clear_error(make_client: MakeClient) -> None:
    dead = f"127.0.0.1:{free_port()}"
    ref = parse_reference(f"{dead}/test/busybox:1")
    async with broken_mirror(503) as broken:
        client = make_client(mirrors=mirrors(dead, broken.url))
        with pytest.raises(RegistryUnavailableError) as caught:
            await client.resolve(ref)
    message = str(caught.value)
    assert "failed on all 2 endpoints" in message
    assert f"registry {broken.host} answered HTTP 503" in message
    assert f"registry {dead} unreachable" in message


async def test_all_endpoints_not_found_is_not_found(make_client: MakeClient) -> None:
    async with FakeRegistry() as first, FakeRegistry() as server:
        # The registry itself listed among its mirrors is not tried twice.
        client = make_client(mirrors=mirrors(server.host, first.url, server.url))
        with pytest.raises(ImageNotFoundError) as caught:
            await client.resolve(parse_reference(f"{server.host}/test/x:1"))
    assert "failed on all 2 endpoints" in str(caught.value)
    assert len(server.requested("manifests")) == 1


async def test_not_found_on_a_mirror_and_an_unreachable_upstream_is_not_found(
    make_client: MakeClient,
) -> None:
    """containerd's resolver ranks a 404 above a host it could not reach."""
    dead = f"127.0.0.1:{free_port()}"
    async with FakeRegistry() as mirror:
        client = make_client(mirrors=mirrors(dead, mirror.url))
        with pytest.raises(ImageNotFoundError) as caught:
            await client.resolve(parse_reference(f"{dead}/test/x:nope"))
    message = str(caught.value)
    assert "failed on all 2 endpoints" in message
    assert f"not found at {mirror.host}" in message and f"registry {dead} unreachable" in message


@needs_registry
async def test_blob_falls_back_when_a_mirror_breaks_before_the_first_byte(
    open_registry: Registry,
    images: Images,
    make_client: MakeClient,
    warnings: pytest.LogCaptureFixture,
) -> None:
    async with FakeRegistry(blob_fault="truncate", fault_after=0) as flaky:
        flaky.add("test/busybox", "1", images.busybox)
        client = make_client(mirrors=mirrors("docker.io", flaky.url, open_registry.url))
        resolved = await client.resolve(parse_reference("docker.io/test/busybox:1"))
        assert resolved.endpoint == f"{flaky.url}/v2"
        assert await pull_all(client, resolved) == [b.data for b in images.busybox.layers]
        assert flaky.requested("blobs")
        assert any(e["endpoint"] == f"{flaky.url}/v2" for e in fallbacks(warnings))


@needs_registry
async def test_hosts_toml_config_path(
    open_registry: Registry, images: Images, make_client: MakeClient, tmp_path: Path
) -> None:
    async with broken_mirror(502) as broken:
        host_dir = tmp_path / "registry.k8s.io"
        host_dir.mkdir()
        (host_dir / "hosts.toml").write_text(
            'server = "https://registry.k8s.io"\n\n'
            f'[host."{broken.url}"]\n  capabilities = ["pull", "resolve"]\n\n'
            f'[host."{open_registry.url}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        client = make_client(config_path=str(tmp_path))
        resolved = await client.resolve(parse_reference("registry.k8s.io/test/docker:1"))
        check_single(resolved, images.docker)
        assert resolved.endpoint == f"{open_registry.url}/v2"
        assert broken.requested("manifests")
        assert len(await pull_all(client, resolved)) == 3

    # `_default` serves every host without a directory of its own.
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text(f'server = "{open_registry.url}"\n')
    resolved = await client.resolve(parse_reference("example.invalid/test/busybox:1"))
    assert resolved.endpoint == f"{open_registry.url}/v2"


@needs_registry
async def test_pull_only_mirror_is_not_asked_to_resolve_tags(
    open_registry: Registry, images: Images, make_client: MakeClient, tmp_path: Path
) -> None:
    async with FakeRegistry() as pull_only:
        pull_only.add("test/busybox", "1", images.busybox)
        (tmp_path / "quay.io").mkdir()
        (tmp_path / "quay.io" / "hosts.toml").write_text(
            f'server = "{open_registry.url}"\n\n'
            f'[host."{pull_only.url}"]\n  capabilities = ["pull"]\n'
        )
        client = make_client(config_path=str(tmp_path))
        by_tag = await client.resolve(parse_reference("quay.io/test/busybox:1"))
        assert by_tag.endpoint == f"{open_registry.url}/v2"
        assert pull_only.requested("manifests") == []
        by_digest = await client.resolve(
            parse_reference(f"quay.io/test/busybox@{images.busybox.digest}")
        )
        assert by_digest.endpoint == f"{pull_only.url}/v2"
        assert by_digest.manifest == by_tag.manifest


# ------------------------------------------------------------------ faults


async def test_stall_mid_blob_aborts(images: Images, make_client: MakeClient) -> None:
    async with FakeRegistry(blob_fault="stall", fault_after=1024) as fake:
        fake.add("test/busybox", "1", images.busybox)
        client = make_client(stall_timeout=0.5)
        resolved = await client.resolve(parse_reference(f"{fake.host}/test/busybox:1"))
        received = b""
        started = time.monotonic()
        with pytest.raises(PullStalledError) as caught:
            async for chunk in client.blob_stream(resolved, resolved.layers[0]):
                received += chunk
        assert time.monotonic() - started < 5
        assert received == images.busybox.layers[0].data[:1024]
        assert "sent nothing for 0.5s" in str(caught.value)
        assert "1024 of" in str(caught.value)


@needs_registry
async def test_stall_before_the_first_byte_falls_back(
    open_registry: Registry, images: Images, make_client: MakeClient
) -> None:
    async with FakeRegistry(blob_fault="stall", fault_after=0) as stalled:
        stalled.add("test/busybox", "1", images.busybox)
        client = make_client(
            stall_timeout=0.5, mirrors=mirrors("docker.io", stalled.url, open_registry.url)
        )
        resolved = await client.resolve(parse_reference("docker.io/test/busybox:1"))
        assert resolved.endpoint == f"{stalled.url}/v2"
        assert await pull_all(client, resolved) == [b.data for b in images.busybox.layers]


async def test_slow_but_steady_transfer_is_not_aborted(
    images: Images, make_client: MakeClient
) -> None:
    img = images.noisy
    layer = img.layers[0]
    fake = FakeRegistry(blob_fault="trickle", trickle_bytes=512, trickle_interval=0.1)
    fake.add("test/noisy", "1", img)
    async with fake:
        client = make_client(stall_timeout=0.5)
        resolved = await client.resolve(parse_reference(f"{fake.host}/test/noisy:1"))
        started = time.monotonic()
        assert await pull_all(client, resolved) == [layer.data]
        # Longer than the stall timeout in total, never silent for that long.
        assert time.monotonic() - started > 0.5
        # This server ignores Range on trickled blobs: the client skips what it has.
        assert (
            await read_blob(client, resolved, resolved.layers[0], offset=1000) == layer.data[1000:]
        )


async def test_corrupt_blob_fails_verification(images: Images, make_client: MakeClient) -> None:
    async with FakeRegistry(blob_fault="corrupt", fault_after=7) as fake:
        fake.add("test/busybox", "1", images.busybox)
        client = make_client()
        resolved = await client.resolve(parse_reference(f"{fake.host}/test/busybox:1"))
        layer = resolved.layers[0]
        verifier = DigestVerifier.for_descriptor(layer)
        async for chunk in client.blob_stream(resolved, layer):
            verifier.update(chunk)
        with pytest.raises(DigestMismatchError, match="content hashes to sha256:"):
            verifier.verify(layer, host=fake.host)


async def test_manifests_are_digest_verified(images: Images, make_client: MakeClient) -> None:
    img = images.busybox
    lying = dataclasses.replace(img, manifest=im.Blob(img.manifest.media_type, img.manifest.data))
    fake_digest = "sha256:" + "f" * 64
    object.__setattr__(lying.manifest, "digest", fake_digest)
    async with FakeRegistry() as fake:
        fake.add("test/lying", "1", lying)
        client = make_client()
        for text in (f"{fake.host}/test/lying:1", f"{fake.host}/test/lying@{fake_digest}"):
            with pytest.raises(DigestMismatchError, match="does not match its digest"):
                await client.resolve(parse_reference(text))


async def test_schema1_is_refused_clearly(make_client: MakeClient) -> None:
    body = b'{"schemaVersion": 1, "name": "test/old", "tag": "1", "fsLayers": []}'
    old = im.Image(
        manifest=im.Blob(DOCKER_SCHEMA1_SIGNED_MANIFEST, body),
        config=im.Blob(im.DOCKER_CONFIG, b"{}"),
        layers=(),
        diff_ids=(),
        platform=im.Platform.host(),
    )
    async with FakeRegistry() as fake:
        fake.add("test/old", "1", old)
        with pytest.raises(UnsupportedManifestError, match="Docker schema 1 image"):
            await make_client().resolve(parse_reference(f"{fake.host}/test/old:1"))


# ------------------------------------------------------------------ TLS


class TlsFakeRegistry(FakeRegistry):
    """FakeRegistry over https with the given certificate."""

    def __init__(self, context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.context = context

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    async def start(self) -> None:
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/v2/", self._ping)
        app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = self._runner.addresses[0][1]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_registry(
    images: Images, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[TlsFakeRegistry, Path]]:
    require_tool("openssl", "openssl")
    work = tmp_path_factory.mktemp("tls")
    cert, key = work / "registry.crt", work / "registry.key"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=cri-shim-test-registry", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with TlsFakeRegistry(context) as reg:
        reg.add("test/busybox", "1", images.busybox)
        yield reg, cert


async def test_tls_custom_ca(
    tls_registry: tuple[TlsFakeRegistry, Path], make_client: MakeClient, tmp_path: Path
) -> None:
    reg, cert = tls_registry
    domain = "tls.example.invalid"
    ref = parse_reference(f"{domain}/test/busybox:1")
    dead = f"https://127.0.0.1:{free_port()}"

    # Unknown CA: refused (and the registry itself, `server`, is down).
    (tmp_path / domain).mkdir()
    hosts = tmp_path / domain / "hosts.toml"
    hosts.write_text(f'server = "{dead}"\n[host."{reg.url}"]\n')
    with pytest.raises(RegistryUnavailableError, match=r"(?i)certificate verify failed"):
        await make_client(config_path=str(tmp_path)).resolve(ref)

    # hosts.toml `ca`, relative to the host's directory.
    shutil.copy(cert, tmp_path / domain / "ca.crt")
    hosts.write_text(f'server = "{dead}"\n[host."{reg.url}"]\n  ca = "ca.crt"\n')
    resolved = await make_client(config_path=str(tmp_path)).resolve(ref)
    assert resolved.endpoint == f"{reg.url}/v2"

    # hosts.toml skip_verify.
    hosts.write_text(f'server = "{dead}"\n[host."{reg.url}"]\n  skip_verify = true\n')
    await make_client(config_path=str(tmp_path)).resolve(ref)

    # Inline style: mirrors + configs."host".tls.
    for tls in (
        RegistryTlsSettings(ca_file=str(cert)),
        RegistryTlsSettings(insecure_skip_verify=True),
    ):
        client = make_client(
            mirrors=mirrors(domain, reg.url), configs={reg.host: RegistryHostSettings(tls=tls)}
        )
        resolved = await client.resolve(ref)
        assert len(await pull_all(client, resolved)) == 1


async def test_loopback_registry_without_scheme_tries_https_first(
    tls_registry: tuple[TlsFakeRegistry, Path], images: Images, make_client: MakeClient
) -> None:
    reg, _ = tls_registry
    client = make_client()
    resolved = await client.resolve(parse_reference(f"{reg.host}/test/busybox:1"))
    assert resolved.endpoint == f"https://{reg.host}/v2"
    assert await pull_all(client, resolved) == [b.data for b in images.busybox.layers]


# ------------------------------------------------------------------ units


def test_credentials() -> None:
    raw = base64.b64encode(b"user:pa:ss").decode()
    assert Credentials.from_auth_field(raw) == Credentials("user", "pa:ss")
    for bad in ("not base64!", base64.b64encode(b"no-colon").decode()):
        with pytest.raises(ValueError):
            Credentials.from_auth_field(bad)
    assert Credentials.from_cri() is None
    assert Credentials.from_cri(username="u", password="p", auth=raw) == Credentials("u", "p")
    assert Credentials.from_cri(auth=raw) == Credentials("user", "pa:ss")
    assert Credentials.from_cri(identity_token="t") == Credentials(identity_token="t")
    shown = repr(Credentials("user", "hunter2", "idtok", "regtok"))
    assert "user" in shown and "hunter2" not in shown and "idtok" not in shown


def test_challenge_parsing() -> None:
    challenges = parse_challenges(
        [
            'Bearer realm="https://auth.example/token",service="reg",'
            'scope="repository:a/b:pull,push", Basic realm="x"',
            'basic realm="with \\"quotes\\""',
        ]
    )
    assert [c.scheme for c in challenges] == ["bearer", "basic", "basic"]
    assert dict(challenges[0].params) == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }
    assert challenges[2].params["realm"] == 'with "quotes"'


def _entry(os: str, arch: str, variant: str = "") -> Descriptor:
    return Descriptor(
        im.OCI_MANIFEST, f"sha256:{arch}{variant}", 1, platform=Platform(os, arch, variant)
    )


@pytest.mark.parametrize(
    ("host", "entries", "chosen"),
    [
        (Platform("linux", "amd64"), [("linux", "arm64", "v8"), ("linux", "amd64", "")], 1),
        (Platform("linux", "amd64"), [("linux", "386", ""), ("windows", "amd64", "")], None),
        (Platform("linux", "arm64", "v8"), [("linux", "arm64", ""), ("linux", "arm64", "v8")], 1),
        (Platform("linux", "arm64", "v8"), [("linux", "arm64", "")], 0),
        (Platform("linux", "arm64"), [("linux", "arm64", "v8")], 0),
        (Platform("linux", "arm64", "v8"), [("linux", "arm", "v6"), ("linux", "arm", "v7")], 1),
        (Platform("linux", "arm", "v7"), [("linux", "arm", "v6"), ("linux", "arm", "v8")], 0),
        (Platform("linux", "arm", "v7"), [("linux", "arm", "")], 0),
        (Platform("linux", "s390x"), [("linux", "amd64", "")], None),
    ],
)
def test_platform_selection(
    host: Platform, entries: list[tuple[str, str, str]], chosen: int | None
) -> None:
    descriptors = [_entry(*e) for e in entries]
    expected = None if chosen is None else descriptors[chosen]
    assert plat.select(descriptors, host) == expected


def test_host_platform_uses_go_names() -> None:
    assert HOST.os == "linux"
    assert HOST.architecture == im.goarch()
    assert plat.normalize(Platform("linux", "aarch64", "8")) == Platform("linux", "arm64")
    assert plat.normalize(Platform("Linux", "x86_64")) == Platform("linux", "amd64")


def test_digest_verifier() -> None:
    data = b"hello"
    desc = Descriptor("x", im.sha256_digest(data), len(data))
    verifier = DigestVerifier.for_descriptor(desc)
    verifier.update(data[:2])
    verifier.update(data[2:])
    verifier.verify(desc)
    with pytest.raises(DigestMismatchError, match="got 5 bytes, expected 6"):
        verifier.verify(dataclasses.replace(desc, size=6))
    with pytest.raises(DigestMismatchError, match="content hashes to"):
        verifier.verify(dataclasses.replace(desc, digest="sha256:" + "0" * 64))
