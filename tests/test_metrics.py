"""/metrics, /healthz and /livez as Prometheus and kubelet's probes see them."""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.runtime import v1 as cri
from cri_shim.metrics import Metrics
from cri_shim.server import Shim
from cri_shim.settings import SettingsError

from .conftest import CriClient, make_settings, short_tempdir, wait_for
from .pods import pod_config
from .support.catalog import LOCAL, ServedCatalog
from .support.containerd_matrix import ContainerdPeer
from .support.images import build_image, file, layer


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by name and label set."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def scrape(shim: Shim) -> str:
    assert shim.metrics_port is not None
    status, text = await get(shim.metrics_port, "/metrics")
    assert status == 200
    return text


async def test_rpc_latency_and_errors_follow_calls(shim: Shim, client: CriClient) -> None:
    before = await scrape(shim)
    for _ in range(3):
        await client.runtime.version(cri.VersionRequest())
    await client.runtime.status(cri.StatusRequest())
    bad = cri.UpdateRuntimeConfigRequest(
        runtime_config=cri.RuntimeConfig(network_config=cri.NetworkConfig(pod_cidr="not-a-cidr"))
    )
    with pytest.raises(Exception, match="not a valid CIDR"):
        await client.runtime.update_runtime_config(bad)
    after = await scrape(shim)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("cri_shim_rpc_duration_seconds_count", rpc="Version", code="OK") == 3
    assert delta("cri_shim_rpc_duration_seconds_count", rpc="Status", code="OK") == 1
    assert delta("cri_shim_rpc_duration_seconds_sum", rpc="Version", code="OK") > 0
    assert delta("cri_shim_rpc_duration_seconds_bucket", rpc="Version", code="OK", le="+Inf") == 3
    assert (
        delta("cri_shim_rpc_errors_total", rpc="UpdateRuntimeConfig", code="INVALID_ARGUMENT") == 1
    )
    assert delta("cri_shim_rpc_errors_total", rpc="Version", code="OK") == 0
    assert value(after, "cri_shim_containerd_up") == 1
    assert value(after, "cri_shim_build_info", version="0.1.0") == 1


async def test_health_endpoints_on_a_healthy_shim(shim: Shim) -> None:
    assert shim.metrics_port is not None and shim.metrics_port > 0
    assert await get(shim.metrics_port, "/healthz") == (200, '{"status": "ok"}')
    assert await get(shim.metrics_port, "/livez") == (200, '{"status": "ok"}')


@pytest_asyncio.fixture(loop_scope="session")
async def fragile(
    containerd_peer: ContainerdPeer,
) -> AsyncIterator[tuple[EmbeddedContainerd, Shim]]:
    """A containerd of this test's own, so stopping it disturbs no other test."""
    base = short_tempdir("crishim-hz-")
    daemon = EmbeddedContainerd(base / "containerd", binary=containerd_peer.binary(), restart=False)
    await daemon.start()
    shim = Shim(make_settings(base, daemon.address))
    await shim.start()
    yield daemon, shim
    await shim.stop()
    await daemon.stop()


@pytest.mark.containerd  # starts a containerd of its own
async def test_healthz_is_503_while_containerd_is_down(
    fragile: tuple[EmbeddedContainerd, Shim],
) -> None:
    daemon, shim = fragile
    port = shim.metrics_port
    assert port is not None
    assert (await get(port, "/healthz"))[0] == 200

    daemon.kill()

    async def unhealthy() -> bool:
        return (await get(port, "/healthz"))[0] == 503

    assert await wait_for(unhealthy, timeout=5)
    status, body = await get(port, "/healthz")
    assert status == 503
    assert f"containerd is not serving at {daemon.address}" in body
    # The process itself is fine: liveness must not restart it for containerd's sake.
    assert (await get(port, "/livez"))[0] == 200
    assert value(await scrape(shim), "cri_shim_containerd_up") == 0

    await daemon.start()

    async def healthy() -> bool:
        return (await get(port, "/healthz"))[0] == 200

    assert await wait_for(healthy, timeout=10)


async def test_livez_fails_when_the_cri_socket_is_removed(
    fragile: tuple[EmbeddedContainerd, Shim],
) -> None:
    _, shim = fragile
    assert shim.metrics_port is not None
    shim.socket_path.unlink()
    status, body = await get(shim.metrics_port, "/livez")
    assert status == 503
    assert f"CRI socket {shim.socket_path} is gone" in body


async def test_metrics_can_be_disabled(containerd: EmbeddedContainerd) -> None:
    base = short_tempdir("crishim-nometrics-")
    shim = Shim(make_settings(base, containerd.address, metrics__enabled=False))
    await shim.start()
    try:
        assert shim.metrics_port is None and shim.metrics_server is None
    finally:
        await shim.stop()


async def test_a_busy_metrics_port_is_one_clear_error(containerd: EmbeddedContainerd) -> None:
    base = short_tempdir("crishim-busy-")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    shim = Shim(make_settings(base, containerd.address, metrics__port=port))
    try:
        with pytest.raises(SettingsError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await shim.start()
    finally:
        await shim.stop()
        holder.close()
    assert not shim.socket_path.exists()


def test_state_gauges_are_read_from_providers_at_scrape_time() -> None:
    metrics = Metrics()
    sandboxes = {"SANDBOX_READY": 2, "SANDBOX_NOTREADY": 1}
    metrics.register_state_provider("sandbox", lambda: sandboxes)
    metrics.register_state_provider("container", lambda: {"CONTAINER_RUNNING": 4})
    text = metrics.render().decode()
    assert value(text, "cri_shim_pod_sandboxes", state="SANDBOX_READY") == 2
    assert value(text, "cri_shim_containers", state="CONTAINER_RUNNING") == 4
    sandboxes["SANDBOX_READY"] = 5
    assert value(metrics.render().decode(), "cri_shim_pod_sandboxes", state="SANDBOX_READY") == 5
    with pytest.raises(ValueError, match="unknown state kind 'pod'"):
        metrics.register_state_provider("pod", dict)


def test_a_failing_provider_leaves_the_rest_of_the_scrape_intact() -> None:
    metrics = Metrics()

    def broken() -> dict[str, int]:
        raise RuntimeError("store not loaded")

    metrics.register_state_provider("sandbox", broken)
    metrics.register_state_provider("container", lambda: {"CONTAINER_EXITED": 1})
    text = metrics.render().decode()
    assert "cri_shim_pod_sandboxes" not in text
    assert value(text, "cri_shim_containers", state="CONTAINER_EXITED") == 1


def test_pull_observations_by_registry() -> None:
    metrics = Metrics()
    metrics.observe_pull("registry.example:5000/team/app:1", 1000, 2.0)
    metrics.observe_pull("busybox:latest", 0, 0.2)  # all layers were present
    text = metrics.render().decode()
    assert value(text, "cri_shim_image_pull_bytes_total", registry="registry.example:5000") == 1000
    assert value(text, "cri_shim_image_pull_bytes_total", registry="docker.io") == 0
    assert value(text, "cri_shim_image_pull_duration_seconds_count", registry="docker.io") == 1


async def test_real_pull_and_pod_gauges_show_in_metrics(
    pod_shim: Shim, pods: CriClient, pod_images: ServedCatalog
) -> None:
    """A pull through the ImageService and a running pod both reach /metrics.

    The pulled image is pushed here with a layer of random bytes, so its pull
    fetches a layer whatever earlier tests left in the content store (the pause
    and busybox images share layers)."""
    registry = pod_images.endpoint(LOCAL)
    tag = secrets.token_hex(6)
    fresh = build_image([layer([file("/random", secrets.token_bytes(4096))])])
    await pod_images.registries[LOCAL].push("test/metrics-pull", tag, fresh)
    ref = f"{registry}/test/metrics-pull:{tag}"
    scraped = await scrape(pod_shim)
    before = value(scraped, "cri_shim_image_pull_duration_seconds_count", registry=registry)
    bytes_before = value(scraped, "cri_shim_image_pull_bytes_total", registry=registry)
    await pods.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=ref)))
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=pod_config("gauge")))
    text = await scrape(pod_shim)
    assert (
        value(text, "cri_shim_image_pull_duration_seconds_count", registry=registry) == before + 1
    )
    assert value(text, "cri_shim_image_pull_bytes_total", registry=registry) > bytes_before
    assert value(text, "cri_shim_pod_sandboxes", state="ready") >= 1
    await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(reply.pod_sandbox_id))
    await pods.image.remove_image(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)))
