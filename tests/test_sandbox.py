"""Pod sandboxes end to end: real containerd, real CNI plugins, pause image
pulled from the project's local registry through the shim's own ImageService."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.runtime import v1 as cri
from cri_shim.network.netns import remove_pod_netns
from cri_shim.server import Shim

from .conftest import CriClient, make_settings, short_tempdir
from .pods import CNI_BIN, pod_config, write_conflist
from .support.catalog import ServedCatalog
from .support.ports import free_port


async def status_of(
    client: CriClient, sandbox_id: str, verbose: bool = False
) -> cri.PodSandboxStatusResponse:
    return await client.runtime.pod_sandbox_status(
        cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose)
    )


async def run_in_netns(netns: str, *cmd: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net={netns}",
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()
    return out.decode()


async def listen_in_netns(netns: str, port: int) -> asyncio.subprocess.Process:
    """A one-shot TCP server inside the pod's network namespace."""
    script = (
        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        f"s.bind(('0.0.0.0',{port}));s.listen();print('ready',flush=True);"
        "c,_=s.accept();c.sendall(b'hello from pod');c.close()"
    )
    process = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={netns}", "python3", "-c", script, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    assert (await asyncio.wait_for(process.stdout.readline(), 10)).strip() == b"ready"
    return process


async def read_from(host: str, port: int) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_pod_gets_an_ip_reachable_from_the_host(pod_shim: Shim, pods: CriClient) -> None:
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=pod_config("net")))
    status = (await status_of(pods, reply.pod_sandbox_id, verbose=True)).status
    assert status is not None and status.network is not None
    assert status.state == cri.PodSandboxState.SANDBOX_READY
    assert status.network.ip.startswith(pod_shim.test_subnet_prefix)  # type: ignore[attr-defined]
    info = json.loads((await status_of(pods, reply.pod_sandbox_id, verbose=True)).info["info"])
    listener = await listen_in_netns(info["sandboxMetadata"]["Metadata"]["NetNSPath"], 8080)
    assert await read_from(status.network.ip, 8080) == b"hello from pod"
    await listener.wait()


async def test_host_port_mapping_reaches_the_pod(pod_shim: Shim, pods: CriClient) -> None:
    host_port = free_port()
    config = pod_config(
        "ports",
        port_mappings=[
            cri.PortMapping(protocol=cri.Protocol.TCP, container_port=80, host_port=host_port)
        ],
    )
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    verbose = await status_of(pods, reply.pod_sandbox_id, verbose=True)
    assert verbose.status is not None and verbose.status.network is not None
    gateway = verbose.status.network.ip.rsplit(".", 1)[0] + ".1"
    listener = await listen_in_netns(
        json.loads(verbose.info["info"])["sandboxMetadata"]["Metadata"]["NetNSPath"], 80
    )
    assert await read_from(gateway, host_port) == b"hello from pod"
    await listener.wait()


async def test_host_network_pod_shares_the_host_namespace(pods: CriClient) -> None:
    options = cri.NamespaceOption(network=cri.NamespaceMode.NODE)
    config = pod_config(
        "hostnet",
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=options)
        ),
    )
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    info = json.loads((await status_of(pods, reply.pod_sandbox_id, verbose=True)).info["info"])
    assert os.readlink(f"/proc/{info['pid']}/ns/net") == os.readlink("/proc/self/ns/net")
    status = (await status_of(pods, reply.pod_sandbox_id)).status
    assert status is not None and status.linux is not None
    assert status.linux.namespaces is not None and status.linux.namespaces.options is not None
    assert status.linux.namespaces.options.network == cri.NamespaceMode.NODE


async def test_dns_config_and_sysctls_are_applied(pod_shim: Shim, pods: CriClient) -> None:
    config = pod_config(
        "dns",
        dns_config=cri.DnsConfig(
            servers=["10.0.0.10"], searches=["svc.cluster.local"], options=["ndots:5"]
        ),
        linux=cri.LinuxPodSandboxConfig(sysctls={"net.ipv4.ip_unprivileged_port_start": "79"}),
    )
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    resolv = pod_shim.settings.state_path / "sandboxes" / reply.pod_sandbox_id / "resolv.conf"
    assert resolv.read_text() == "search svc.cluster.local\nnameserver 10.0.0.10\noptions ndots:5\n"
    info = json.loads((await status_of(pods, reply.pod_sandbox_id, verbose=True)).info["info"])
    value = await run_in_netns(
        info["sandboxMetadata"]["Metadata"]["NetNSPath"],
        "cat",
        "/proc/sys/net/ipv4/ip_unprivileged_port_start",
    )
    assert value.strip() == "79"


async def test_pod_without_hostname_gets_the_node_name_in_etc_hostname(
    pod_shim: Shim, pods: CriClient
) -> None:
    """containerd's CRI writes the node's hostname when the pod config names none."""
    named = await pods.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod_config("named", hostname="web-0"))
    )
    unnamed = await pods.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod_config("unnamed"))
    )
    root = pod_shim.settings.state_path / "sandboxes"
    assert (root / named.pod_sandbox_id / "hostname").read_text() == "web-0\n"
    assert (root / unnamed.pod_sandbox_id / "hostname").read_text() == f"{socket.gethostname()}\n"


async def test_stop_and_remove_are_idempotent(pod_shim: Shim, pods: CriClient) -> None:
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=pod_config("twice")))
    sandbox_id = reply.pod_sandbox_id
    info = json.loads((await status_of(pods, sandbox_id, verbose=True)).info["info"])
    for _ in range(2):
        await pods.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(sandbox_id))
    status = (await status_of(pods, sandbox_id)).status
    assert status is not None and status.state == cri.PodSandboxState.SANDBOX_NOTREADY
    assert not Path(info["sandboxMetadata"]["Metadata"]["NetNSPath"]).exists()
    for _ in range(2):
        await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(sandbox_id))
    with pytest.raises(GRPCError) as caught:
        await status_of(pods, sandbox_id)
    assert caught.value.status is Status.NOT_FOUND
    await pods.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest("0" * 64))
    await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest("0" * 64))


async def test_list_filters(pods: CriClient) -> None:
    a = await pods.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod_config("list-a", labels={"app": "a"}))
    )
    b = await pods.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod_config("list-b", labels={"app": "b"}))
    )
    await pods.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(b.pod_sandbox_id))

    async def ids(filter_: cri.PodSandboxFilter | None) -> set[str]:
        listed = await pods.runtime.list_pod_sandbox(cri.ListPodSandboxRequest(filter=filter_))
        return {item.id for item in listed.items}

    assert {a.pod_sandbox_id, b.pod_sandbox_id} <= await ids(None)
    assert await ids(cri.PodSandboxFilter(label_selector={"app": "a"})) == {a.pod_sandbox_id}
    assert await ids(cri.PodSandboxFilter(id=b.pod_sandbox_id[:12])) == {b.pod_sandbox_id}
    ready = await ids(
        cri.PodSandboxFilter(state=cri.PodSandboxStateValue(cri.PodSandboxState.SANDBOX_READY))
    )
    assert a.pod_sandbox_id in ready and b.pod_sandbox_id not in ready


async def test_invalid_requests_get_clear_errors(pods: CriClient) -> None:
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=cri.PodSandboxConfig()))
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert "metadata" in (caught.value.message or "")
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.run_pod_sandbox(
            cri.RunPodSandboxRequest(config=pod_config("handler"), runtime_handler="kata")
        )
    assert caught.value.status is Status.NOT_FOUND
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(""))
    assert caught.value.status is Status.INVALID_ARGUMENT


async def test_sandboxes_survive_a_shim_restart(
    containerd: EmbeddedContainerd, pod_images: ServedCatalog
) -> None:
    """A shim of its own is stopped and another started on the same containerd
    namespace and state dir (never two at once): it rebuilds its view of the pods
    from containerd, and a pod whose netns vanished meanwhile is kept, not ready."""
    base = short_tempdir("crishim-restart-")
    octet = random.randrange(10, 250)  # as the pod_shim fixture: a private subnet
    bridge = f"crirs{octet}-{os.getpid() % 1000}"
    write_conflist(base / "cni", f"10.237.{octet}.0/24", bridge, base / "ipam")
    settings = make_settings(
        base,
        containerd.address,
        registry__config_path=str(pod_images.write_hosts_dir(base / "certs.d")),
        cni__bin_dirs=(CNI_BIN,),
        cni__netns_dir=str(base / "netns"),
        containerd__namespace=f"crishim-restart-{os.getpid()}",
    )
    first = Shim(settings)
    await first.start()
    client = CriClient.connect(first.socket_path)
    try:
        pod_id = (
            await client.runtime.run_pod_sandbox(
                cri.RunPodSandboxRequest(config=pod_config("restart"))
            )
        ).pod_sandbox_id
        before = (await status_of(client, pod_id)).status
        assert before is not None and before.network is not None and before.network.ip
        lost = (
            await client.runtime.run_pod_sandbox(
                cri.RunPodSandboxRequest(config=pod_config("lostns"))
            )
        ).pod_sandbox_id
        lost_sandbox = first.sandboxes.by_id.find(lost)
        assert lost_sandbox is not None and lost_sandbox.netns_path
    finally:
        client.close()
        await first.stop()
    assert not first.socket_path.exists()  # the first shim is gone
    # While no shim watches, the lost pod's network namespace vanishes.
    await remove_pod_netns(lost_sandbox.netns_path)

    second = Shim(settings)
    await second.start()
    client = CriClient.connect(second.socket_path)
    try:
        after = (await status_of(client, pod_id)).status
        lost_status = (await status_of(client, lost)).status
        assert lost_status is not None
        assert lost_status.state == cri.PodSandboxState.SANDBOX_NOTREADY
        assert after is not None and after.network is not None
        assert after.state == cri.PodSandboxState.SANDBOX_READY
        assert after.network.ip == before.network.ip
        assert after.created_at == before.created_at
        for sandbox_id in (pod_id, lost):
            await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(sandbox_id))
    finally:
        client.close()
        await second.stop()
        subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)


async def test_broken_network_config_fails_clearly_and_leaves_nothing(
    containerd: EmbeddedContainerd, pod_shim: Shim
) -> None:
    base = short_tempdir("crishim-badnet-")
    (base / "cni").mkdir()
    (base / "cni" / "10-bad.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "broken",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "crishimbad0",
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": "10.999.0.0/24"}]],
                            "dataDir": str(base / "ipam"),
                        },
                    }
                ],
            }
        )
    )
    settings = make_settings(
        base,
        containerd.address,
        cni__conf_dir=str(base / "cni"),
        cni__bin_dirs=(CNI_BIN,),
        cni__netns_dir=str(base / "netns"),
        registry__config_path=pod_shim.settings.registry.config_path,
        containerd__namespace="crishim-badnet",
    )
    shim = Shim(settings)
    await shim.start()
    client = CriClient.connect(shim.socket_path)

    def leftovers() -> dict[str, list[str]]:
        def names(path: Path) -> list[str]:
            return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

        return {
            "netns pins": names(base / "netns"),
            "ip allocations": names(base / "ipam" / "broken"),
            "sandbox dirs": names(settings.state_path / "sandboxes"),
        }

    async def containerd_objects() -> tuple[int, int]:
        assert shim.sandbox_manager is not None
        ops = shim.sandbox_manager.ops
        containers = await ops.list_containers()
        from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1

        snapshots = [
            info
            async for reply in ops.client.snapshots.list(
                snapshots_v1.ListSnapshotsRequest(snapshotter="overlayfs")
            )
            for info in reply.info
            if info.kind != 3  # committed image layers stay
        ]
        return len(containers), len(snapshots)

    try:
        before, before_objects = leftovers(), await containerd_objects()
        with pytest.raises(GRPCError) as caught:
            await client.runtime.run_pod_sandbox(
                cri.RunPodSandboxRequest(config=pod_config("badnet"))
            )
        assert caught.value.status is Status.UNKNOWN
        message = caught.value.message or ""
        assert message.startswith("failed to set up pod network: ")
        assert "10.999.0.0/24" in message and "bridge" in message
        assert "Traceback" not in message
        assert leftovers() == before
        assert await containerd_objects() == before_objects
        listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
        assert listed.items == []
    finally:
        client.close()
        await shim.stop()
        subprocess.run(["ip", "link", "delete", "crishimbad0"], check=False, capture_output=True)


async def test_port_mappings_are_validated(pods: CriClient) -> None:
    """Found by the fuzzer: an unknown protocol number used to crash RunPodSandbox."""
    bad = [
        cri.PortMapping(protocol=30, container_port=80, host_port=8080),  # type: ignore[arg-type]
        cri.PortMapping(protocol=cri.Protocol.TCP, container_port=70000, host_port=8080),
        cri.PortMapping(protocol=cri.Protocol.UDP, container_port=53, host_port=-1),
    ]
    for mapping in bad:
        with pytest.raises(GRPCError) as caught:
            await pods.runtime.run_pod_sandbox(
                cri.RunPodSandboxRequest(config=pod_config("ports-bad", port_mappings=[mapping]))
            )
        assert caught.value.status is Status.INVALID_ARGUMENT
        assert "port_mappings[0]" in (caught.value.message or "")
