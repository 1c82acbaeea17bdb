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
from typing import Any

import pytest
import pytest_asyncio

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.containerd.runtime import RuntimeOps, TaskStatus
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.gen.containerd.services.tasks import v1 as tasks_v1
from cri_shim.gen.runtime import v1 as cri
from cri_shim.settings import RuntimeSettings

from .conftest import CriClient, ShimProcess, short_tempdir, start_shim_process, wait_for
from .pods import CNI_BIN, pod_config, wait_exited, write_conflist, write_shim_config
from .support.catalog import ServedCatalog
from .support.containerd_matrix import ContainerdPeer
from .support.reaper import reap

# Starts a containerd of its own.
pytestmark = pytest.mark.containerd

PODS = 20
NAMESPACE = "crishim-recovery"
# Numbered lines until /ctl/stop appears; then how many it wrote goes to a
# host file (/ctl is a host directory), the count the log must hold exactly.
LOGGER = (
    "i=0; while [ ! -e /ctl/stop ]; do echo line $i; i=$((i+1)); sleep 0.05; done;"
    " echo $i > /ctl/written"
)
NUMBERED = re.compile(rb"^\S+ stdout F line (\d+)$")
# What removing every pod must leave behind its containerd and the shim.
NOTHING_LEFT = {"tasks": 0, "containers": 0, "snapshots": 0, "netns": 0, "mounts": 0, "fds": 0}


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


@pytest_asyncio.fixture(loop_scope="session")
async def node(pod_images: ServedCatalog, containerd_peer: ContainerdPeer) -> AsyncIterator[Node]:
    base = short_tempdir("crishim-rec-")
    daemon = EmbeddedContainerd(base / "containerd", binary=containerd_peer.binary(), restart=False)
    await daemon.start()
    octet = random.randrange(10, 250)
    bridge = f"crirec{octet}"
    write_conflist(base / "cni", f"10.234.{octet}.0/24", bridge, base / "ipam")
    hosts_dir = pod_images.write_hosts_dir(base / "certs.d")
    config = write_shim_config(
        base,
        hosts_dir,
        daemon.address,
        containerd_extra=f'namespace = "{NAMESPACE}"\nhealth_interval = 0.2\n',
    )
    yield Node(base, daemon, config, base / "cri.sock", hosts_dir, bridge)
    await daemon.stop()
    await asyncio.to_thread(reap, base)  # what a failed run left running
    subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)


async def runtime_ready(client: CriClient) -> bool:
    try:
        reply = await client.runtime.status(cri.StatusRequest(), timeout=2)
    except (TimeoutError, OSError):
        return False
    assert reply.status is not None
    return {c.type: c.status for c in reply.status.conditions}["RuntimeReady"]


def control_dir(node: Node, index: int) -> Path:
    """A host directory pod `index`'s containers see as /ctl: the test's switches
    (files it creates) and what the containers report back."""
    path = node.base / "ctl" / str(index)
    path.mkdir(parents=True, exist_ok=True)
    return path


async def start_container(
    client: CriClient,
    pod_id: str,
    config: cri.PodSandboxConfig,
    image: str,
    name: str,
    script: str,
    control: Path | None = None,
) -> str:
    mounts = [cri.Mount(container_path="/ctl", host_path=str(control))] if control else []
    reply = await client.runtime.create_container(
        cri.CreateContainerRequest(
            pod_sandbox_id=pod_id,
            config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name=name),
                image=cri.ImageSpec(image=image),
                command=["sh", "-c", script],
                log_path=f"{name}.log",
                mounts=mounts,
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
    logger = await start_container(
        client, pod_id, config, image, "logger", LOGGER, control_dir(node, index)
    )
    return pod_id, logger


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


async def exit_status(client: CriClient, container_id: str) -> tuple[int, str] | None:
    """(exit code, reason) of an exited container, None while it is not exited."""
    status = (
        await client.runtime.container_status(cri.ContainerStatusRequest(container_id))
    ).status
    assert status is not None
    if status.state != cri.ContainerState.CONTAINER_EXITED:
        return None
    return status.exit_code, status.reason


async def exit_code(client: CriClient, container_id: str) -> int | None:
    status = (
        await client.runtime.container_status(cri.ContainerStatusRequest(container_id))
    ).status
    assert status is not None
    if status.state != cri.ContainerState.CONTAINER_EXITED:
        return None
    return status.exit_code


async def container_pid(client: CriClient, container_id: str) -> int:
    """The container's process id, from ContainerStatus' verbose info."""
    reply = await client.runtime.container_status(
        cri.ContainerStatusRequest(container_id, verbose=True)
    )
    pid = json.loads(reply.info["info"])["pid"]
    assert isinstance(pid, int) and pid > 0, reply.info
    return pid


async def processes_gone(pids: list[int]) -> bool:
    """True once none of `pids` exists (exited and reaped by its runc shim)."""
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


def numbered_lines(path: Path) -> list[int]:
    if not path.exists():
        return []
    numbers = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        match = NUMBERED.match(line)
        assert match, (path, line)
        numbers.append(int(match.group(1)))
    return numbers


def open_files(shim_pid: int, node: Node) -> list[str]:
    """The shim's open files in the state and log dirs (named when a test fails)."""
    prefixes = (str(node.base / "state"), str(node.base / "logs"))
    found = []
    for fd in os.listdir(f"/proc/{shim_pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{shim_pid}/fd/{fd}")
            if target.startswith(prefixes):
                found.append(target)
    return found


async def leftovers(node: Node, shim_pid: int) -> dict[str, int]:
    """What removing every pod must leave at zero (fds: the shim's own, into
    the state or log dirs: FIFOs, spools, log files)."""
    client = ContainerdClient(node.daemon.address, NAMESPACE)
    try:
        tasks = await client.tasks.list(tasks_v1.ListTasksRequest())
        containers = await client.containers.list(containers_v1.ListContainersRequest())
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
    fds = len(open_files(shim_pid, node))
    return {
        "tasks": len(tasks.tasks),
        "containers": len(containers.containers),
        "snapshots": active,
        "netns": pins,
        "mounts": mounts,
        "fds": fds,
    }


class Churn:
    """kubelet-like traffic on a connection of its own while the shim is
    killed: pods run (with a container) and removed, ExecSync in the loggers.
    Calls the kill cuts off are remembered, to be settled after the restart."""

    def __init__(self, node: Node, image: str, loggers: list[str]) -> None:
        self.node, self.image, self.loggers = node, image, loggers
        self.client = CriClient.connect(node.socket)
        self.stop = asyncio.Event()
        self.done: dict[str, str] = {}  # pod name -> id, run and container started
        self.cut_runs: set[str] = set()  # names whose run or container start failed
        self.cut_removals: dict[str, str] = {}
        self.removed: set[str] = set()
        self.execs = 0
        self.cut_execs = 0
        self.counter = 0
        self.configs: dict[str, cri.PodSandboxConfig] = {}

    def config(self, name: str) -> cri.PodSandboxConfig:
        """One config per pod name (uid included), as kubelet retries with."""
        if name not in self.configs:
            self.configs[name] = pod_config(name, log_directory=str(self.node.base / "logs" / name))
        return self.configs[name]

    async def creator(self) -> None:
        while not self.stop.is_set():
            name = f"churn-{self.counter}"
            self.counter += 1
            try:
                config = self.config(name)
                reply = await self.client.runtime.run_pod_sandbox(
                    cri.RunPodSandboxRequest(config=config), timeout=30
                )
                await start_container(
                    self.client, reply.pod_sandbox_id, config, self.image, "app", "sleep 3600"
                )
                self.done[name] = reply.pod_sandbox_id
            except Exception:
                self.cut_runs.add(name)
                return

    async def remover(self) -> None:
        while not self.stop.is_set():
            ready = [n for n in self.done if n not in self.removed and n not in self.cut_removals]
            if len(ready) < 2:
                await asyncio.sleep(0.05)
                continue
            name = ready[0]
            try:
                await self.client.runtime.remove_pod_sandbox(
                    cri.RemovePodSandboxRequest(self.done[name]), timeout=30
                )
                self.removed.add(name)
            except Exception:
                self.cut_removals[name] = self.done[name]
                return

    async def execer(self) -> None:
        while not self.stop.is_set():
            container_id = self.loggers[self.execs % len(self.loggers)]
            try:
                reply = await self.client.runtime.exec_sync(
                    cri.ExecSyncRequest(container_id, cmd=["echo", "ok"], timeout=10), timeout=30
                )
            except Exception:
                self.cut_execs += 1
                return
            assert (reply.stdout, reply.exit_code) == (b"ok\n", 0)
            self.execs += 1

    async def busy(self) -> bool:
        """True once the churn has done some of everything the kill should cut into."""
        return len(self.done) >= 3 and len(self.removed) >= 1 and self.execs >= 4

    def start(self) -> asyncio.Future[tuple[None, None, None, None]]:
        return asyncio.gather(self.creator(), self.remover(), self.execer(), self.execer())


async def containerd_view(node: Node) -> tuple[set[str], set[str]]:
    """(all containers, containers with a running task) in the shim's namespace."""
    client = ContainerdClient(node.daemon.address, NAMESPACE)
    try:
        containers = await client.containers.list(containers_v1.ListContainersRequest())
        tasks = await client.tasks.list(tasks_v1.ListTasksRequest())
    finally:
        client.close()
    # UNKNOWN is a runc shim too busy to answer in 2 s; the shim counts it as running.
    alive = (TaskStatus.RUNNING, TaskStatus.UNKNOWN)
    running = {t.id for t in tasks.tasks if t.status in alive}
    return {c.id for c in containers.containers}, running


async def assert_consistent(client: CriClient, node: Node) -> tuple[int, int]:
    """Every pod and container the shim lists agrees with containerd."""
    known, running = await containerd_view(node)
    pods = (await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())).items
    for pod in pods:
        assert pod.id in known, pod.id
        ready = pod.state == cri.PodSandboxState.SANDBOX_READY
        assert ready == (pod.id in running), (pod.id, pod.state)
        if ready:
            status = (
                await client.runtime.pod_sandbox_status(cri.PodSandboxStatusRequest(pod.id))
            ).status
            assert status is not None and status.network is not None and status.network.ip
    containers = (await client.runtime.list_containers(cri.ListContainersRequest())).containers
    for container in containers:
        assert container.id in known, container.id
        state = container.state
        assert (state == cri.ContainerState.CONTAINER_RUNNING) == (container.id in running), (
            container.id,
            state,
        )
    return len(pods), len(containers)


async def settle(client: CriClient, churn: Churn) -> tuple[set[str], dict[str, int]]:
    """Finish what the kill cut off, as kubelet's retries would: removals are
    redone, a cut run is found fully there or fully gone (or a not-ready pod,
    which is removed), then run again; every churn pod left ends with one
    ready sandbox and one running container. Returns their ids and what the
    cut runs were found as."""
    pods = (await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())).items
    by_name: dict[str, list[cri.PodSandbox]] = {}
    for pod in pods:
        assert pod.metadata is not None
        if pod.metadata.name.startswith("churn-"):
            by_name.setdefault(pod.metadata.name, []).append(pod)
    assert all(len(items) == 1 for items in by_name.values()), by_name
    for name, pod_id in churn.cut_removals.items():
        await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))
        churn.removed.add(name)
    found = {"ready": 0, "not ready": 0, "gone": 0}
    for name in churn.cut_runs:
        items = by_name.get(name, [])
        if not items:
            found["gone"] += 1
        elif items[0].state == cri.PodSandboxState.SANDBOX_READY:
            found["ready"] += 1
        else:
            found["not ready"] += 1
            await client.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(items[0].id))
            await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(items[0].id))
    ids = set()
    for name in (set(churn.done) | churn.cut_runs) - churn.removed:
        config = churn.config(name)
        pod_id = (
            await client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
        ).pod_sandbox_id
        listed = await client.runtime.list_containers(
            cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id))
        )
        running = [c for c in listed.containers if c.state == cri.ContainerState.CONTAINER_RUNNING]
        for container in listed.containers:
            if container not in running:  # a create or start the kill cut off
                await client.runtime.remove_container(cri.RemoveContainerRequest(container.id))
        if not running:
            await start_container(client, pod_id, config, churn.image, "app", "sleep 3600")
        ids.add(pod_id)
    return ids, found


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
        # Containers that exit while the shim is down, with codes of their own:
        # each waits for /ctl/quit, which the test creates only after the kill.
        quitters = {
            await start_container(
                client,
                pod_id,
                configs[pod_id],
                image,
                "quitter",
                f"echo hello; while [ ! -e /ctl/quit ]; do sleep 0.05; done; exit {10 + i}",
                control_dir(node, i),
            ): 10 + i
            for i, pod_id in enumerate(pod_ids[:5])
        }
        quitter_pids = [await container_pid(client, c) for c in quitters]
        loggers = [c for _, c in started]
        logs = [node.base / "logs" / str(index) / "logger.log" for index in range(PODS)]
        assert await wait_for(lambda: lines_grew(logs, [0] * PODS, 3), timeout=30)
        before = await snapshot(client)
        # What crictl inspect / inspectp show survives the restart unchanged.
        logger_pod, logger = started[0]
        inspected = await verbose_infos(client, logger_pod, logger)
        assert inspected[0]["runtimeSpec"] and inspected[0]["cniResult"]
        assert inspected[0]["image"] == RuntimeSettings().sandbox_image

        # 1. the shim dies mid-churn (runs, creates, execs, removals in flight)
        # and comes back on the same config.
        churn = Churn(node, image, loggers)
        churning = churn.start()
        assert await wait_for(lambda: churn.busy(), timeout=60), "no churn before the kill"
        client.close()
        shim.process.send_signal(signal.SIGKILL)
        await shim.process.wait()
        churn.stop.set()
        await churning
        churn.client.close()
        # The quitters exit now, with no shim to see it; loggers write on into their FIFOs.
        assert await processes_gone(quitter_pids) is False
        for index in range(5):
            (control_dir(node, index) / "quit").touch()
        assert await wait_for(lambda: processes_gone(quitter_pids), timeout=30)
        at_restart = [len(numbered_lines(log)) for log in logs]
        shim = await node.start_shim()
        client = CriClient.connect(node.socket)
        # The copiers are re-attached: lines written after the restart arrive.
        assert await wait_for(lambda: lines_grew(logs, at_restart, 3), timeout=30), (
            "no log lines after the shim restart"
        )
        after = await snapshot(client)
        assert {pod_id: after[0][pod_id] for pod_id in before[0]} == before[0]
        assert await verbose_infos(client, logger_pod, logger) == inspected
        for container_id, state in before[1].items():
            if container_id in quitters:
                code = await exit_code(client, container_id)
                assert code == quitters[container_id], (container_id, code, shim.log_text()[-4000:])
            else:
                assert after[1][container_id] == state == cri.ContainerState.CONTAINER_RUNNING
        listed_pods, listed_containers = await assert_consistent(client, node)
        churn_ids, cut_found = await settle(client, churn)
        await assert_consistent(client, node)

        # 2. containerd dies (the shims and their tasks live on) and comes back.
        # containerd 1.6 keeps the exited tasks and their codes; 2.x deletes a task
        # whose process exited while it was down ("cleaning leaked shim process"),
        # so the code is lost and, as containerd 2.x's own CRI does, the container
        # ends with 255 and reason Unknown.
        lost = node.daemon.major >= 2
        late = {
            await start_container(
                client,
                pod_id,
                configs[pod_id],
                image,
                "late",
                "while [ ! -e /ctl/late ]; do sleep 0.05; done; exit 42",
                control_dir(node, index),
            ): (255, "Unknown") if lost else (42, "Error")
            for index, pod_id in enumerate(pod_ids[5:8], start=5)
        }
        late_pids = [await container_pid(client, c) for c in late]
        node.daemon.kill()
        assert await wait_for(lambda: _negate(runtime_ready(client)), timeout=10)
        # The late containers exit while containerd is down.
        for index in range(5, 8):
            (control_dir(node, index) / "late").touch()
        assert await wait_for(lambda: processes_gone(late_pids), timeout=30)
        at_restart = [len(numbered_lines(log)) for log in logs]
        await node.daemon.start()
        assert await wait_for(lambda: runtime_ready(client), timeout=20)
        assert await wait_for(lambda: lines_grew(logs, at_restart, 3), timeout=30), (
            "no log lines after the containerd restart"
        )

        async def late_exits_seen() -> bool:
            return [await exit_status(client, container_id) for container_id in late] == list(
                late.values()
            )

        assert await wait_for(late_exits_seen, timeout=15)
        listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
        assert {p.id for p in listed.items} == set(pod_ids) | churn_ids, (
            [
                (p.id, p.metadata, p.state)
                for p in listed.items
                if p.id not in churn_ids | set(pod_ids)
            ],
            churn.done,
            churn.cut_runs,
            churn.cut_removals,
            churn.removed,
        )
        extra_id, _ = await run_pod(client, node, image, PODS)

        # Every line the loggers wrote is in their logs exactly once, in order,
        # across both outages: the loggers end themselves and report their count.
        for index in range(PODS):
            (control_dir(node, index) / "stop").touch()
        for container_id in loggers:
            assert (await wait_exited(client, container_id, timeout=60)).exit_code == 0
        lines = 0
        for index in range(PODS):
            written = int((control_dir(node, index) / "written").read_text())
            numbers = numbered_lines(logs[index])
            assert numbers == list(range(written)), (
                f"pod {index}: {written} lines written, the log holds {len(numbers)}"
                f" (lost or repeated: {sorted(set(range(written)) ^ set(numbers))[:20]})"
            )
            assert written > at_restart[index] >= 3
            lines += written
        # What a process wrote before the shim died is kept. (What it writes after,
        # and then exits before the restart, is lost: the runc shim closes both FIFO
        # ends on exit and the kernel frees the pipe, as under containerd's CRI.)
        for index in range(5):
            assert (
                (node.base / "logs" / str(index) / "quitter.log")
                .read_bytes()
                .endswith(b" stdout F hello\n")
            )

        await assert_consistent(client, node)
        for pod_id in [*pod_ids, *churn_ids, extra_id]:
            await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))

        # A removed container's output copier closes its FIFO and log once the
        # drain ends, which may be just after RemovePodSandbox returns; a leak
        # never gets there.
        async def nothing_left() -> bool:
            return await leftovers(node, shim.process.pid) == NOTHING_LEFT

        await wait_for(nothing_left, timeout=15)
        left = await leftovers(node, shim.process.pid)
        print(
            f"recovery: {listed_pods} pods / {listed_containers} containers listed after the"
            f" shim kill, all consistent with containerd; churn: {len(churn.done)} runs done,"
            f" {len(churn.removed)} removed, {churn.execs} execs ({churn.cut_execs} cut),"
            f" cut runs found {cut_found}; {lines} log lines of {len(loggers)} loggers"
            f" each once; leftovers {left}"
        )
        assert left == NOTHING_LEFT, open_files(shim.process.pid, node)
    finally:
        client.close()
        await stop_shim(shim)


async def verbose_infos(
    client: CriClient, pod_id: str, container_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The verbose `info` of a pod and one of its containers, parsed."""
    pod = await client.runtime.pod_sandbox_status(cri.PodSandboxStatusRequest(pod_id, True))
    ctr = await client.runtime.container_status(cri.ContainerStatusRequest(container_id, True))
    return json.loads(pod.info["info"]), json.loads(ctr.info["info"])


async def lines_grew(logs: list[Path], before: list[int], by: int) -> bool:
    """True once every log holds at least `by` more numbered lines than `before`."""
    return all(
        len(numbered_lines(log)) >= count + by for log, count in zip(logs, before, strict=True)
    )


async def stop_shim(shim: ShimProcess) -> None:
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
    if os.path.exists("{block}"):  # hold the ADD (bridge + host-local are done)
        with open("{blocked}", "w") as marker:
            marker.write(str(os.getpid()))
        with open("{block}") as seconds:
            time.sleep(float(seconds.read() or 300))
    print(json.dumps(conf["prevResult"]))
"""


def ip_allocations(data_dir: Path) -> set[str]:
    """host-local's reservations: one file per IP, named after it."""
    if not data_dir.exists():
        return set()
    return {n for n in os.listdir(data_dir) if re.fullmatch(r"[0-9.]+", n)}


def slow_network(node: Node) -> tuple[Path, Path]:
    """The node's network: bridge + host-local, then a plugin that holds its
    ADD while the returned `block` file exists (seconds in it, else 300) and
    writes its pid to `blocked` when it does."""
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
    return block, blocked


async def test_run_cut_off_by_a_kill_leaves_no_network(
    node: Node, pod_images: ServedCatalog
) -> None:
    """SIGKILL the shim while RunPodSandbox's CNI ADD is half done (IP taken,
    netns pinned, no pause container yet): the restarted shim releases them
    before serving, leaves a live pod's alone, and the retried run succeeds."""
    block, blocked = slow_network(node)
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
        assert left == NOTHING_LEFT, open_files(shim.process.pid, node)
    finally:
        client.close()
        await stop_shim(shim)


async def _exists(path: Path) -> bool:
    return path.exists()


async def test_sigterm_lets_a_run_whose_caller_gave_up_finish(
    node: Node, pod_images: ServedCatalog
) -> None:
    """kubelet gives up on a RunPodSandbox (its timeout) and SIGTERM follows:
    the shielded run finishes before the shim exits, so the pod is whole."""
    block, blocked = slow_network(node)
    shim = await node.start_shim()
    client = CriClient.connect(node.socket)
    try:
        block.write_text("3")
        config = pod_config("late", log_directory=str(node.base / "logs" / "late"))
        call = asyncio.create_task(
            client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
        )
        assert await wait_for(lambda: _exists(blocked), timeout=60)
        call.cancel()  # the caller is gone; no call is in flight any more
        with contextlib.suppress(asyncio.CancelledError):
            await call
        shim.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(shim.process.wait(), 60) == 0
        exit_log = shim.log_text()
        block.unlink()

        shim = await node.start_shim()
        client.close()
        client = CriClient.connect(node.socket)
        listed = (await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())).items
        assert [(p.metadata.name if p.metadata else "", p.state) for p in listed] == [
            ("late", cri.PodSandboxState.SANDBOX_READY)
        ]
        await assert_consistent(client, node)
        assert "waiting for creates in flight before exit" in exit_log
        assert "creates still running at shutdown" not in exit_log
        await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(listed[0].id))
        left = await leftovers(node, shim.process.pid)
        assert left == NOTHING_LEFT, open_files(shim.process.pid, node)
    finally:
        client.close()
        if shim.process.returncode is None:
            shim.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(shim.process.wait(), 30)
            except TimeoutError:
                shim.process.kill()
