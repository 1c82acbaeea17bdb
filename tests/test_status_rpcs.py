"""Version, Status, RuntimeConfig, UpdateRuntimeConfig over the unix socket."""

import asyncio
import json
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Cardinality, Status

from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .conftest import CriClient, make_settings, short_tempdir, wait_for


async def test_version(client: CriClient) -> None:
    reply = await client.runtime.version(cri.VersionRequest(version="v1"))
    assert reply.version == "0.1.0"
    assert reply.runtime_name == "cri-shim"
    assert reply.runtime_api_version == "v1"


async def test_status_reports_runtime_ready_and_handlers(client: CriClient) -> None:
    reply = await client.runtime.status(cri.StatusRequest(verbose=True))
    assert reply.status is not None
    conditions = {c.type: c for c in reply.status.conditions}
    assert conditions["RuntimeReady"].status is True
    assert {h.name for h in reply.runtime_handlers} == {"", "runc"}
    info = json.loads(reply.info["containerd"])
    assert info["serving"] is True and info["version"]
    assert json.loads(reply.info["config"])["containerd"]["namespace"] == "k8s.io"


async def test_network_ready_follows_cni_config(shim: Shim, client: CriClient) -> None:
    conf_dir = Path(shim.settings.cni.conf_dir)

    async def network_ready() -> bool:
        reply = await client.runtime.status(cri.StatusRequest())
        assert reply.status is not None
        return {c.type: c.status for c in reply.status.conditions}["NetworkReady"]

    reply = await client.runtime.status(cri.StatusRequest())
    assert reply.status is not None
    network = {c.type: c for c in reply.status.conditions}["NetworkReady"]
    assert network.status is False
    assert network.reason == "NetworkPluginNotReady"
    assert str(conf_dir) in network.message

    config = conf_dir / "10-test.conflist"
    config.write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "t", "plugins": [{"type": "loopback"}]})
    )
    try:
        assert await wait_for(network_ready, timeout=5)
    finally:
        config.unlink()
    assert await wait_for(lambda: _not(network_ready), timeout=5)


async def _not(predicate: object) -> bool:
    return not await predicate()  # type: ignore[operator]


def host_cgroup_driver() -> cri.CgroupDriver:
    """What kubelet would pick here, read from the host itself: systemd only where
    systemd is PID 1's init and owns a unified (cgroup2) /sys/fs/cgroup."""
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    unified = any(m[1] == "/sys/fs/cgroup" and m[2] == "cgroup2" for m in mounts)
    if unified and Path("/run/systemd/system").is_dir():
        return cri.CgroupDriver.SYSTEMD
    return cri.CgroupDriver.CGROUPFS


async def test_runtime_config_reports_cgroup_driver(
    client: CriClient, containerd: EmbeddedContainerd
) -> None:
    reply = await client.runtime.runtime_config(cri.RuntimeConfigRequest())
    assert reply.linux is not None
    assert reply.linux.cgroup_driver == host_cgroup_driver()  # "auto" follows the host
    # A configured driver is reported as configured, whatever the host.
    for configured, expected in (
        ("systemd", cri.CgroupDriver.SYSTEMD),
        ("cgroupfs", cri.CgroupDriver.CGROUPFS),
    ):
        base = short_tempdir("crishim-cgd-")
        shim = Shim(make_settings(base, containerd.address, runtime__cgroup_driver=configured))
        await shim.start()
        other = CriClient.connect(shim.socket_path)
        try:
            answer = await other.runtime.runtime_config(cri.RuntimeConfigRequest())
            assert answer.linux is not None and answer.linux.cgroup_driver == expected
        finally:
            other.close()
            await shim.stop()


async def test_update_runtime_config_stores_pod_cidr(shim: Shim, client: CriClient) -> None:
    request = cri.UpdateRuntimeConfigRequest(
        runtime_config=cri.RuntimeConfig(network_config=cri.NetworkConfig(pod_cidr="10.88.0.0/16"))
    )
    await client.runtime.update_runtime_config(request)
    stored = json.loads((shim.settings.state_path / "pod-cidr.json").read_text())
    assert stored == ["10.88.0.0/16"]
    bad = cri.UpdateRuntimeConfigRequest(
        runtime_config=cri.RuntimeConfig(network_config=cri.NetworkConfig(pod_cidr="10.88.0/99"))
    )
    with pytest.raises(GRPCError) as caught:
        await client.runtime.update_runtime_config(bad)
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert "not a valid CIDR" in (caught.value.message or "")


async def test_unknown_method_is_a_real_unimplemented(shim: Shim) -> None:
    """Go clients (kubelet) need content-type plus grpc-status 12 to see UNIMPLEMENTED."""
    channel = Channel(path=str(shim.socket_path))
    try:
        async with channel.request(
            "/runtime.v1.RuntimeService/NoSuchCall",
            Cardinality.UNARY_UNARY,
            cri.VersionRequest,
            cri.VersionResponse,
        ) as stream:
            await stream.send_message(cri.VersionRequest(), end=True)
            with pytest.raises(GRPCError) as caught:
                async with asyncio.timeout(5):
                    await stream.recv_initial_metadata()
        assert caught.value.status is Status.UNIMPLEMENTED
    finally:
        channel.close()
