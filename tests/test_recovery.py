"""Nothing lost: `cri-shim serve` killed with SIGKILL mid-churn and restarted,
then its containerd killed and restarted, with pods writing numbered log lines
the whole time. Afterwards every line is in the logs exactly once and in
order, and removing the pods leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import pytest_asyncio

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.containerd.runtime import RuntimeOps
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.gen.containerd.services.tasks import v1 as tasks_v1
from cri_shim.gen.runtime import v1 as cri

from .conftest import CriClient, ShimProcess, short_tempdir, start_shim_process, wait_for
from .pods import CNI_BIN, pod_config, write_conflist
from .support.catalog import ServedCatalog

PODS = 20
NAMESPACE = "crishim-recovery"
LOGGER = "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.05; done"
NUMBERED = re.compile(rb"^\S+ stdout F line (\d+)$")


@dataclass
class Node:
    base: Path
    daemon: EmbeddedContainerd
    config: Path
    socket: Path
    hosts_dir: Path
    bridge: str

    async def start_shim(self) -> ShimProcess:
        return await start_shim_process(
            ["--config", str(self.config)], self.socket, self.base / "shim.log", timeout=60
        )


def write_config(base: Path, address: str, hosts_dir: Path) -> Path:
    config = base / "cri-shim.toml"
    config.write_text(
        f'state_dir = "{base / "state"}"\n'
        "[server]\n"
        f'socket = "{base / "cri.sock"}"\n'
        "[containerd]\n"
        f'address = "{address}"\n'
        "embedded = false\n"
        f'namespace = "{NAMESPACE}"\n'
        "health_interval = 0.2\n"
        "[cni]\n"
        f'conf_dir = "{base / "cni"}"\n'
        f'bin_dirs = ["{CNI_BIN}"]\n'
        f'netns_dir = "{base / "netns"}"\n'
        "[registry]\n"
        f'config_path = "{hosts_dir}"\n'
        "[metrics]\n"
        "port = 0\n"
    )
    return config


@pytest_asyncio.fixture(loop_scope="session")
async def node(pod_images: ServedCatalog) -> AsyncIterator[Node]:
    base = short_tempdir("crishim-rec-")
    daemon = EmbeddedContainerd(base / "containerd", restart=False)
    await daemon.start()
    octet = random.randrange(10, 250)
    bridge = f"crirec{octet}"
    write_conflist(base / "cni", f"10.234.{octet}.0/24", bridge, base / "ipam")
    hosts_dir = pod_images.write_hosts_dir(base / "certs.d")
    config = write_config(base, daemon.address, hosts_dir)
    yield Node(base, daemon, config, base / "cri.sock", hosts_dir, bridge)
    await daemon.stop()
    subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)


async def runtime_ready(client: CriClient) -> bool:
    try:
        reply = await client.runtime.status(cri.StatusRequest(), timeout=2)
    except (TimeoutError, OSError):
        return False
    assert reply.status is not None
    return {c.type: c.status for c in reply.status.conditions}["RuntimeReady"]


async def start_container(
    client: CriClient, pod_id: str, config: cri.PodSandboxConfig, image: str, name: str, script: str
) -> str:
    reply = await client.runtime.create_container(
        cri.CreateContainerRequest(
            pod_sandbox_id=pod_id,
            config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name=name),
                image=cri.ImageSpec(image=image),
                command=["sh", "-c", script],
                log_path=f"{name}.log",
            ),
            sandbox_config=config,
        )
    )
    await client.runtime.start_container(cri.StartContainerRequest(reply.container_id))
    return reply.container_id


async def run_pod(client: CriClient, node: Node, image: str, index: int) -> tuple[str, str]:
    config = pod_config(f"rec-{index}", log_directory=str(node.base / "logs" / str(index)))
    pod_id = (
        await client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    ).pod_sandbox_id
    return pod_id, await start_container(client, pod_id, config, image, "logger", LOGGER)


async def snapshot(client: CriClient) -> tuple[dict[str, tuple[int, str]], dict[str, int]]:
    pods = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
    ips = {}
    for item in pods.items:
        status = (
            await client.runtime.pod_sandbox_status(cri.PodSandboxStatusRequest(item.id))
        ).status
        assert status is not None and status.network is not None
        ips[item.id] = (int(item.state), status.network.ip)
    containers = await client.runtime.list_containers(cri.ListContainersRequest())
    return ips, {c.id: int(c.state) for c in containers.containers}


async def exit_code(client: CriClient, container_id: str) -> int | None:
    status = (
        await client.runtime.container_status(cri.ContainerStatusRequest(container_id))
    ).status
    assert status is not None
    if status.state != cri.ContainerState.CONTAINER_EXITED:
        return None
    return status.exit_code


def numbered_lines(path: Path) -> list[int]:
    numbers = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        match = NUMBERED.match(line)
        assert match, (path, line)
        numbers.append(int(match.group(1)))
    return numbers


async def leftovers(node: Node, shim_pid: int) -> dict[str, int]:
    """What removing every pod must leave at zero (fds: the shim's own, into
    the state or log dirs: FIFOs, spools, log files)."""
    client = ContainerdClient(node.daemon.address, NAMESPACE)
    try:
        tasks = await client.tasks.list(tasks_v1.ListTasksRequest())
        active = 0
        async for reply in client.snapshots.list(
            snapshots_v1.ListSnapshotsRequest(snapshotter="overlayfs")
        ):
            active += sum(1 for info in reply.info if info.kind == snapshots_v1.Kind.ACTIVE)
    finally:
        client.close()
    netns_dir = node.base / "netns"
    pins = len(os.listdir(netns_dir)) if netns_dir.exists() else 0
    state = str(node.base / "state")
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    mounts = sum(1 for line in mountinfo if f" {state}/" in line)
    fds = 0
    for fd in os.listdir(f"/proc/{shim_pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{shim_pid}/fd/{fd}")
            fds += target.startswith((state, str(node.base / "logs")))
    return {
        "tasks": len(tasks.tasks),
        "snapshots": active,
        "netns": pins,
        "mounts": mounts,
        "fds": fds,
    }


async def test_restart_and_containerd_crash_lose_nothing(
    node: Node, pod_images: ServedCatalog
) -> None:
    image = pod_images.local("library/busybox:latest")
    shim = await node.start_shim()
    client = CriClient.connect(node.socket)
    try:
        await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
        started = await asyncio.gather(*(run_pod(client, node, image, i) for i in range(PODS)))
        pod_ids = [pod_id for pod_id, _ in started]
        configs = {
            pod_id: pod_config(f"rec-{i}", log_directory=str(node.base / "logs" / str(i)))
            for i, pod_id in enumerate(pod_ids)
        }
        # Containers that exit while the shim is down, with codes of their own.
        quitters = {
            await start_container(
                client,
                pod_id,
                configs[pod_id],
                image,
                "quitter",
                f"echo hello; sleep 1.5; exit {10 + i}",
            ): 10 + i
            for i, pod_id in enumerate(pod_ids[:5])
        }
        await asyncio.sleep(1.0)
        before = await snapshot(client)

        # 1. the shim dies mid-churn and comes back on the same config.
        client.close()
        shim.process.send_signal(signal.SIGKILL)
        await shim.process.wait()
        await asyncio.sleep(2.5)  # loggers keep writing into their FIFOs; quitters exit
        shim = await node.start_shim()
        client = CriClient.connect(node.socket)
        after = await snapshot(client)
        assert after[0] == before[0]
        for container_id, state in before[1].items():
            if container_id in quitters:
                code = await exit_code(client, container_id)
                assert code == quitters[container_id], (container_id, code, shim.log_text()[-4000:])
            else:
                assert after[1][container_id] == state == cri.ContainerState.CONTAINER_RUNNING

        # 2. containerd dies (the shims and their tasks live on) and comes back.
        late = {
            await start_container(
                client, pod_id, configs[pod_id], image, "late", "sleep 1; exit 42"
            ): 42
            for pod_id in pod_ids[5:8]
        }
        node.daemon.kill()
        assert await wait_for(lambda: _negate(runtime_ready(client)), timeout=10)
        await asyncio.sleep(1.5)  # the late containers exit while containerd is down
        await node.daemon.start()
        assert await wait_for(lambda: runtime_ready(client), timeout=20)

        async def late_exits_seen() -> bool:
            codes = [await exit_code(client, container_id) for container_id in late]
            return codes == list(late.values())

        assert await wait_for(late_exits_seen, timeout=15)
        listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
        assert {p.id for p in listed.items} == set(pod_ids)
        extra_id, _ = await run_pod(client, node, image, PODS)

        # Every line exactly once, in order, across both outages.
        loggers = [c for _, c in started]
        for container_id in loggers:
            await client.runtime.stop_container(cri.StopContainerRequest(container_id, timeout=0))
        lines = 0
        for index in range(PODS):
            numbers = numbered_lines(node.base / "logs" / str(index) / "logger.log")
            assert numbers == list(range(len(numbers))), f"pod {index}: lines lost or repeated"
            assert len(numbers) > 40
            lines += len(numbers)
        # What a process wrote before the shim died is kept. (What it writes after,
        # and then exits before the restart, is lost: the runc shim closes both FIFO
        # ends on exit and the kernel frees the pipe, as under containerd's CRI.)
        for index in range(5):
            assert (
                (node.base / "logs" / str(index) / "quitter.log")
                .read_bytes()
                .endswith(b" stdout F hello\n")
            )

        for pod_id in [*pod_ids, extra_id]:
            await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))
        left = await leftovers(node, shim.process.pid)
        print(f"recovery: {PODS + 1} pods, {len(loggers)} loggers, {lines} lines once each, {left}")
        assert left == {"tasks": 0, "snapshots": 0, "netns": 0, "mounts": 0, "fds": 0}
    finally:
        client.close()
        shim.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(shim.process.wait(), 30)
        except TimeoutError:
            shim.process.kill()


async def _negate(pending: object) -> bool:
    return not await pending  # type: ignore[misc]


async def test_leases_of_a_killed_create_are_released(containerd: EmbeddedContainerd) -> None:
    """A shim killed between Snapshots.Prepare and Containers.Create leaves a
    lease holding an active snapshot; the next start releases it."""
    client = ContainerdClient(containerd.address, "crishim-leases")
    ops = RuntimeOps(client, systemd_cgroup=False)
    try:
        leased = ops.creation_lease()
        lease = await leased.__aenter__()  # never exited: the "kill"
        await ops.prepare_snapshot("half-made", "", lease=lease)

        async def active() -> list[str]:
            names = []
            async for reply in client.snapshots.list(
                snapshots_v1.ListSnapshotsRequest(snapshotter="overlayfs")
            ):
                names += [i.name for i in reply.info if i.kind == snapshots_v1.Kind.ACTIVE]
            return names

        assert "half-made" in await active()
        assert await ops.release_stale_creation_leases() == 1
        assert await wait_for(lambda: _negate(_contains(active(), "half-made")), timeout=10)
        assert await ops.release_stale_creation_leases() == 0
    finally:
        client.close()


async def _contains(pending: Awaitable[list[str]], item: str) -> bool:
    return item in await pending


SLOW_PLUGIN = """#!{python}
import json, os, sys, time
conf = json.load(sys.stdin)
command = os.environ.get("CNI_COMMAND")
if command == "VERSION":
    print(json.dumps({{"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}}))
elif command == "ADD":
    if os.path.exists("{block}"):  # hold the ADD (bridge + host-local are done) until killed
        with open("{blocked}", "w") as marker:
            marker.write(str(os.getpid()))
        time.sleep(300)
    print(json.dumps(conf["prevResult"]))
"""


def ip_allocations(data_dir: Path) -> set[str]:
    """host-local's reservations: one file per IP, named after it."""
    if not data_dir.exists():
        return set()
    return {n for n in os.listdir(data_dir) if re.fullmatch(r"[0-9.]+", n)}


async def test_run_cut_off_by_a_kill_leaves_no_network(
    node: Node, pod_images: ServedCatalog
) -> None:
    """SIGKILL the shim while RunPodSandbox's CNI ADD is half done (IP taken,
    netns pinned, no pause container yet): the restarted shim releases them
    before serving, leaves a live pod's alone, and the retried run succeeds."""
    plugins = node.base / "plugins"
    plugins.mkdir()
    block, blocked = node.base / "block", node.base / "blocked"
    slow = plugins / "slowadd"
    slow.write_text(SLOW_PLUGIN.format(python=sys.executable, block=block, blocked=blocked))
    slow.chmod(0o755)
    (node.base / "cni" / "10-test.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "crishim-cut",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": node.bridge,
                        "isGateway": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": f"10.236.{node.bridge[6:]}.0/24"}]],
                            "dataDir": str(node.base / "ipam"),
                        },
                    },
                    {"type": "slowadd"},
                ],
            }
        )
    )
    node.config.write_text(
        node.config.read_text().replace(
            f'bin_dirs = ["{CNI_BIN}"]', f'bin_dirs = ["{plugins}", "{CNI_BIN}"]'
        )
    )
    ipam = node.base / "ipam" / "crishim-cut"
    netns_dir, state = node.base / "netns", node.base / "state"
    image = pod_images.local("library/busybox:latest")
    shim = await node.start_shim()
    client = CriClient.connect(node.socket)
    cut_config = pod_config("cut", log_directory=str(node.base / "logs" / "cut"))
    try:
        await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
        kept, _ = await run_pod(client, node, image, 0)
        pins, ips = set(os.listdir(netns_dir)), ip_allocations(ipam)
        assert len(pins) == len(ips) == 1

        block.touch()
        cut = asyncio.create_task(
            client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=cut_config))
        )
        assert await wait_for(lambda: _exists(blocked), timeout=60)
        assert len(os.listdir(netns_dir)) == len(ip_allocations(ipam)) == 2
        assert len(os.listdir(state / "cni-pending")) == 1
        shim.process.send_signal(signal.SIGKILL)
        await shim.process.wait()
        client.close()
        with contextlib.suppress(Exception):
            await cut
        os.kill(int(blocked.read_text()), signal.SIGKILL)  # the plugin the kill orphaned
        block.unlink()

        shim = await node.start_shim()
        client = CriClient.connect(node.socket)
        assert set(os.listdir(netns_dir)) == pins
        assert ip_allocations(ipam) == ips
        assert os.listdir(state / "cni-pending") == []
        assert [p.name for p in (state / "cni-cache").iterdir()] == [
            f"crishim-cut-{kept}-eth0.json"
        ]
        assert len(os.listdir(state / "netns-pins")) == 1
        assert os.listdir(state / "sandboxes") == [kept]  # the cut run's shm unmounted, gone
        assert "released pod networks of unfinished runs" in shim.log_text()

        # kubelet retries the run: it succeeds, beside the untouched pod.
        retried = (
            await client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=cut_config))
        ).pod_sandbox_id
        listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
        assert {(p.id, p.state) for p in listed.items} == {
            (kept, cri.PodSandboxState.SANDBOX_READY),
            (retried, cri.PodSandboxState.SANDBOX_READY),
        }
        assert len(ip_allocations(ipam)) == 2
        for pod_id in (kept, retried):
            await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))
        assert ip_allocations(ipam) == set()
        assert os.listdir(state / "netns-pins") == []
        assert os.listdir(state / "cni-cache") == []
        left = await leftovers(node, shim.process.pid)
        assert left == {"tasks": 0, "snapshots": 0, "netns": 0, "mounts": 0, "fds": 0}
    finally:
        client.close()
        shim.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(shim.process.wait(), 30)
        except TimeoutError:
            shim.process.kill()


async def _exists(path: Path) -> bool:
    return path.exists()
