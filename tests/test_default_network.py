"""The default pod network a shim with a private containerd writes when the node has
no CNI config: out of the box, the README's first command runs pods with a network."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from cri_shim import check
from cri_shim.check import Outcome, run_checks
from cri_shim.gen.runtime import v1 as cri
from cri_shim.network import default_network
from cri_shim.network.cni_config import load_network_config
from cri_shim.settings import Settings, SettingsError, load
from tests.conftest import CriClient, ShimProcess, short_tempdir, start_shim_process
from tests.pods import CNI_BIN, make_container, pod_config
from tests.support.catalog import ServedCatalog
from tests.support.reaper import reap


def cni_settings(tmp_path: Path, **overrides: object) -> Settings:
    dotted: dict[str, object] = {
        "state_dir": str(tmp_path / "state"),
        "server.socket": str(tmp_path / "cri.sock"),
        "containerd.address": str(tmp_path / "none.sock"),
        "cni.conf_dir": str(tmp_path / "etc-cni"),
        "cni.bin_dirs": (CNI_BIN,),
    }
    dotted.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load(None, environ={}, overrides=dotted)


def test_defaults_avoid_the_usual_networks() -> None:
    cni = Settings().cni
    assert cni.default_network is True
    assert cni.default_bridge == "crishim0"
    subnet = ipaddress.ip_network(cni.default_subnet)
    for common in ("10.88.0.0/16", "10.42.0.0/16", "10.244.0.0/16", "172.17.0.0/16"):
        assert not subnet.overlaps(ipaddress.ip_network(common)), common


def test_written_into_the_state_dir_when_the_conf_dir_has_no_network(tmp_path: Path) -> None:
    settings = cni_settings(
        tmp_path, cni__default_bridge="crishimt1", cni__default_subnet="10.9.8.0/24"
    )
    conf_dir = default_network.ensure_default_network(settings.cni, settings.state_path)
    assert conf_dir == tmp_path / "state" / "cni" / "net.d"
    assert not (tmp_path / "etc-cni").exists()  # the node's conf dir is never written
    loaded = load_network_config(conf_dir, (CNI_BIN,))
    assert loaded.name == "cri-shim-default"
    assert loaded.plugin_types == ("bridge", "portmap", "loopback")
    bridge = loaded.plugins[0]
    assert bridge["bridge"] == "crishimt1"
    assert bridge["hairpinMode"] is True and "promiscMode" not in bridge
    assert bridge["capabilities"] == {"ipRanges": True}
    assert bridge["ipam"]["type"] == "host-local"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.9.8.0/24"}]]
    assert bridge["ipam"]["dataDir"] == str(tmp_path / "state" / "cni" / "networks")
    assert loaded.plugins[1]["capabilities"] == {"portMappings": True}


def test_an_existing_network_is_used_as_it_is(tmp_path: Path) -> None:
    settings = cni_settings(tmp_path)
    conf = tmp_path / "etc-cni"
    conf.mkdir()
    (conf / "10-mine.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "mine", "plugins": [{"type": "loopback"}]})
    )
    assert default_network.ensure_default_network(settings.cni, settings.state_path) is None
    assert not (tmp_path / "state").exists()


def test_switched_off_or_without_plugins_nothing_is_written(tmp_path: Path) -> None:
    off = cni_settings(tmp_path, cni__default_network=False)
    assert default_network.ensure_default_network(off.cni, off.state_path) is None
    empty = tmp_path / "no-plugins"
    empty.mkdir()
    bare = cni_settings(tmp_path, cni__bin_dirs=(str(empty),))
    assert default_network.ensure_default_network(bare.cni, bare.state_path) is None
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("cni__default_subnet", "10.9.8.1/24", "cni.default_subnet"),
        ("cni__default_subnet", "pods", "cni.default_subnet"),
        ("cni__default_bridge", "a-bridge-name-too-long", "cni.default_bridge"),
        ("cni__default_bridge", "", "cni.default_bridge"),
    ],
)
def test_bad_settings_are_refused_by_name(
    tmp_path: Path, key: str, value: str, message: str
) -> None:
    settings = cni_settings(tmp_path, **{key: value})
    with pytest.raises(SettingsError, match=message):
        default_network.ensure_default_network(settings.cni, settings.state_path)


async def test_check_warns_instead_of_failing_when_serve_would_write_it(tmp_path: Path) -> None:
    only_cni = [c for c in check.CHECKS if c.name == "cni"]
    embedded = cni_settings(tmp_path, containerd__embedded=True)
    (result,) = await run_checks(embedded, checks=only_cni)
    assert result.outcome is Outcome.WARN
    assert "writes a default network (bridge crishim0, 10.209.0.0/16)" in result.line
    production = cni_settings(tmp_path, containerd__embedded=False)
    (result,) = await run_checks(production, checks=only_cni)
    assert result.outcome is Outcome.FAIL


# --- out of the box: `cri-shim serve --state-dir ... --socket ...` runs a networked pod ---


@dataclass
class FreshShim:
    process: ShimProcess
    client: CriClient
    base: Path
    subnet: ipaddress.IPv4Network
    bridge: str


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_shim(pod_images: ServedCatalog) -> AsyncIterator[FreshShim]:
    """The README's first command on a node with no containerd running and no CNI config.
    Only what would collide with parallel runs is moved (bridge, subnet, netns pins,
    metrics port), and the pause image comes through local mirrors instead of the internet."""
    base = short_tempdir("crishim-oob-")
    octet = random.randrange(10, 250)
    subnet = ipaddress.IPv4Network(f"10.238.{octet}.0/24")
    bridge = f"crishimoob{octet}"
    hosts_dir = pod_images.write_hosts_dir(base / "certs.d")
    env = {
        "CRI_SHIM_CONTAINERD_ADDRESS": str(base / "no-containerd.sock"),
        "CRI_SHIM_CNI_CONF_DIR": str(base / "etc-cni-net.d"),  # absent, like a fresh node
        "CRI_SHIM_CNI_DEFAULT_BRIDGE": bridge,
        "CRI_SHIM_CNI_DEFAULT_SUBNET": str(subnet),
        "CRI_SHIM_CNI_NETNS_DIR": str(base / "netns"),
        "CRI_SHIM_REGISTRY_CONFIG_PATH": str(hosts_dir),
        "CRI_SHIM_METRICS_PORT": "0",
    }
    socket = base / "cri-shim.sock"
    process = await start_shim_process(
        ["--state-dir", str(base / "state"), "--socket", str(socket)],
        socket,
        base / "shim.log",
        timeout=120,
        env=env,
    )
    client = CriClient.connect(socket)
    try:
        yield FreshShim(process, client, base, subnet, bridge)
    finally:
        listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
        for item in listed.items:
            await client.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(item.id))
            await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(item.id))
        client.close()
        if process.process.returncode is None:
            process.process.send_signal(signal.SIGTERM)
            await process.process.wait()
        await asyncio.to_thread(reap, base)
        subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


async def run_pod(client: CriClient, name: str, logs: Path) -> tuple[str, cri.PodSandboxConfig]:
    config = pod_config(name, log_directory=str(logs / name))
    reply = await client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    return reply.pod_sandbox_id, config


async def pod_ip(client: CriClient, pod_id: str) -> ipaddress.IPv4Address:
    status = (await client.runtime.pod_sandbox_status(cri.PodSandboxStatusRequest(pod_id))).status
    assert status is not None and status.network is not None
    address = ipaddress.ip_address(status.network.ip)
    assert isinstance(address, ipaddress.IPv4Address)
    return address


async def wget_until(client: CriClient, container_id: str, url: str, expect: str) -> str:
    """wget from inside the container, retried while the server comes up (30 s at most).
    No `-T`: Debian's busybox 1.35 wget crashes (SIGSEGV) with it on a refused connection."""
    output = ""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline:
        reply = await client.runtime.exec_sync(
            cri.ExecSyncRequest(container_id, cmd=["wget", "-q", "-O", "-", url], timeout=15)
        )
        output = (reply.stdout or b"").decode() + (reply.stderr or b"").decode()
        if reply.exit_code == 0 and expect in output:
            return output
        await asyncio.sleep(0.2)
    raise AssertionError(f"wget {url} never returned {expect!r}; last output: {output!r}")


async def test_out_of_the_box_pods_get_a_working_network(
    fresh_shim: FreshShim, pod_images: ServedCatalog
) -> None:
    client, base = fresh_shim.client, fresh_shim.base
    log_text = fresh_shim.process.log_text()
    written = base / "state" / "cni" / "net.d" / "10-cri-shim-default.conflist"
    assert "no CNI config found; wrote a default network" in log_text, log_text
    assert f"bridge={fresh_shim.bridge}" in log_text and str(written.parent) in log_text
    assert written.is_file()
    assert not (base / "etc-cni-net.d").exists()

    status = await client.runtime.status(cri.StatusRequest(verbose=True))
    assert status.status is not None
    conditions = {c.type: c.status for c in status.status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}, status
    assert json.loads(status.info["cniconfig"])["confDir"] == str(written.parent)

    busybox = pod_images.local("library/busybox:latest")
    await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox)))
    server_pod = await run_pod(client, "web", base / "logs")
    client_pod = await run_pod(client, "client", base / "logs")
    server_ip = await pod_ip(client, server_pod[0])
    client_ip = await pod_ip(client, client_pod[0])
    assert server_ip in fresh_shim.subnet and client_ip in fresh_shim.subnet
    assert server_ip != client_ip
    await make_container(
        client,
        server_pod,
        busybox,
        [
            "sh",
            "-c",
            "mkdir -p /www && echo pod-to-pod-ok > /www/index.html"
            " && exec httpd -f -p 8080 -h /www",
        ],
    )
    fetcher = await make_container(client, client_pod, busybox, ["sleep", "3600"])

    # Another pod, across the bridge.
    await wget_until(client, fetcher, f"http://{server_ip}:8080/", "pod-to-pod-ok")

    # The host, at the bridge's gateway address (host-local's first address).
    gateway = str(next(fresh_shim.subnet.hosts()))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\nhost-gw-ok\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, gateway, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        await wget_until(client, fetcher, f"http://{gateway}:{port}/", "host-gw-ok")
    finally:
        server.close()
        await server.wait_closed()
