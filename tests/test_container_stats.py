"""Stats, UpdateContainerResources and OOM kills on real containerd + runc,
plus the cgroup/metrics decoding they rest on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from grpclib import GRPCError
from grpclib.const import Status
from hypothesis import given, settings
from hypothesis import strategies as st

from cri_shim.container.cgroups import (
    CgroupSample,
    expand_slice,
    oom_kills,
    read_net_dev,
    read_sample,
    relative_path,
)
from cri_shim.container.stats import (
    CGROUPS_V1_METRICS,
    CGROUPS_V2_METRICS,
    CpuRates,
    memory_usage,
    sample_from_metric,
    sample_from_v1,
    sample_from_v2,
    sum_samples,
)
from cri_shim.gen.containerd.types import Metric
from cri_shim.gen.google.protobuf import Any as AnyMessage
from cri_shim.gen.io.containerd.cgroups import v1 as cgroups_v1
from cri_shim.gen.io.containerd.cgroups import v2 as cgroups_v2
from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import CGROUP_ROOT, cgroup_v2_unified
from cri_shim.server import Shim
from cri_shim.wire import read_fields

from .conftest import CriClient, wait_for
from .pods import make_container, pod_config, wait_exited
from .support.cgroups import LAYOUTS

MIB = 1 << 20
BUSY = ["sh", "-c", "dd if=/dev/zero of=/scratch bs=1M count=4 2>/dev/null; while :; do :; done"]

Pod = tuple[str, cri.PodSandboxConfig]


def cgroup_file(shim: Shim, container_id: str, controller: str, name: str) -> Path:
    """A file of the container's own cgroup, found through its spec's cgroupsPath."""
    assert shim.container_manager is not None
    spec = shim.container_manager.spec(container_id)
    assert spec is not None
    relative = relative_path(spec["linux"]["cgroupsPath"]).lstrip("/")
    if cgroup_v2_unified():
        return CGROUP_ROOT / relative / name
    return CGROUP_ROOT / controller / relative / name


async def container_stats(pods: CriClient, container_id: str) -> cri.ContainerStats:
    reply = await pods.runtime.container_stats(cri.ContainerStatsRequest(container_id))
    assert reply.stats is not None
    return reply.stats


async def stats_when(
    pods: CriClient,
    container_id: str,
    ready: Callable[[cri.ContainerStats], bool],
    timeout: float = 60,
) -> cri.ContainerStats:
    """The container's stats once `ready` holds for them (polled: CPU time and
    the writable layer grow as the container runs)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await container_stats(pods, container_id)
        if ready(stats):
            return stats
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.1)


def cpu_used(stats: cri.ContainerStats) -> int:
    usage = stats.cpu.usage_core_nano_seconds if stats.cpu is not None else None
    return usage.value if usage is not None else 0


def layer_used(stats: cri.ContainerStats) -> int:
    layer = stats.writable_layer
    return layer.used_bytes.value if layer is not None and layer.used_bytes is not None else 0


async def status_of(pods: CriClient, container_id: str) -> cri.ContainerStatus:
    reply = await pods.runtime.container_status(cri.ContainerStatusRequest(container_id))
    assert reply.status is not None
    return reply.status


@pytest_asyncio.fixture(loop_scope="session")
async def other_pod(pods: CriClient, tmp_path: Path) -> AsyncIterator[Pod]:
    config = pod_config("other", log_directory=str(tmp_path / "other-logs"), labels={"pod": "b"})
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    yield reply.pod_sandbox_id, config
    await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(reply.pod_sandbox_id))


# ------------------------------------------------------------- container stats


async def test_busy_container_cpu_memory_and_writable_layer(
    pods: CriClient, pod: Pod, busybox: str
) -> None:
    container = await make_container(
        pods, pod, busybox, BUSY, name="busy", labels={"app": "busy"}, annotations={"a": "1"}
    )
    # Once it has run a while and written its 4 MiB file; then a later sample.
    first = await stats_when(
        pods, container, lambda s: cpu_used(s) > 0 and layer_used(s) >= 4 * MIB
    )
    second = await stats_when(
        pods,
        container,
        lambda s: (
            cpu_used(s) > cpu_used(first)
            and s.cpu is not None
            and first.cpu is not None
            and s.cpu.timestamp > first.cpu.timestamp
            and s.cpu.usage_nano_cores is not None
            and s.cpu.usage_nano_cores.value > 0  # a rate needs samples some time apart
        ),
    )

    assert second.attributes is not None
    assert second.attributes.id == container
    assert second.attributes.metadata is not None and second.attributes.metadata.name == "busy"
    assert second.attributes.labels == {"app": "busy"}
    assert second.attributes.annotations == {"a": "1"}
    assert first.cpu is not None and second.cpu is not None
    assert first.cpu.usage_core_nano_seconds is not None
    assert second.cpu.usage_core_nano_seconds is not None
    assert second.cpu.usage_core_nano_seconds.value > first.cpu.usage_core_nano_seconds.value
    assert second.cpu.timestamp > first.cpu.timestamp > 0
    assert second.cpu.usage_nano_cores is not None
    # A rate (a loaded machine may give the spinner little): above zero, and one
    # process cannot use more than one core, whatever formula gives the number.
    assert 0 < second.cpu.usage_nano_cores.value <= 1_000_000_000 * 1.05
    memory = second.memory
    assert memory is not None and memory.working_set_bytes is not None
    assert memory.usage_bytes is not None and memory.rss_bytes is not None
    assert 0 < memory.working_set_bytes.value <= memory.usage_bytes.value
    assert memory.page_faults is not None and memory.page_faults.value > 0
    assert memory.available_bytes is None  # no limit, nothing to be available against
    layer = second.writable_layer
    assert layer is not None and layer.used_bytes is not None and layer.fs_id is not None
    assert layer.used_bytes.value >= 4 * MIB
    assert layer.inodes_used is not None and layer.inodes_used.value >= 1
    assert layer.fs_id.mountpoint.endswith("io.containerd.snapshotter.v1.overlayfs")


async def test_memory_limit_gives_available_bytes(pods: CriClient, pod: Pod, busybox: str) -> None:
    resources = cri.LinuxContainerResources(memory_limit_in_bytes=64 * MIB)
    container = await make_container(
        pods,
        pod,
        busybox,
        ["sleep", "3600"],
        name="limited",
        linux=cri.LinuxContainerConfig(resources=resources),
    )
    memory = (await container_stats(pods, container)).memory
    assert memory is not None and memory.available_bytes is not None
    assert memory.working_set_bytes is not None
    assert memory.available_bytes.value + memory.working_set_bytes.value == 64 * MIB


async def test_created_container_has_no_stats(pods: CriClient, pod: Pod, busybox: str) -> None:
    """No task, no metrics: containerd's CRI fails the call with these words."""
    container = await make_container(pods, pod, busybox, ["true"], name="idle", start=False)
    with pytest.raises(GRPCError) as caught:
        await container_stats(pods, container)
    assert caught.value.status is Status.UNKNOWN
    assert caught.value.message == "unexpected metrics response: []"
    listed = await pods.runtime.list_container_stats(
        cri.ListContainerStatsRequest(cri.ContainerStatsFilter(id=container))
    )
    assert listed.stats == []  # containerd lists running containers only


async def test_list_container_stats_filters(
    pods: CriClient, pod: Pod, other_pod: Pod, busybox: str
) -> None:
    sleep = ["sleep", "3600"]
    a = await make_container(pods, pod, busybox, sleep, name="a", labels={"tier": "web"})
    b = await make_container(pods, pod, busybox, sleep, name="b", labels={"tier": "db"})
    c = await make_container(pods, other_pod, busybox, sleep, name="c", labels={"tier": "web"})
    done = await make_container(pods, pod, busybox, ["true"], name="done")
    await wait_exited(pods, done)

    async def ids(**wanted: object) -> set[str]:
        reply = await pods.runtime.list_container_stats(
            cri.ListContainerStatsRequest(cri.ContainerStatsFilter(**wanted))  # type: ignore[arg-type]
        )
        assert all(s.cpu is not None and s.memory is not None for s in reply.stats)
        return {s.attributes.id for s in reply.stats if s.attributes is not None}

    everything = await ids()
    assert {a, b, c} <= everything and done not in everything
    assert await ids(id=a) == {a}
    assert await ids(id=a[:12]) == {a}
    assert await ids(pod_sandbox_id=pod[0]) == {a, b}
    assert await ids(pod_sandbox_id=other_pod[0][:12]) == {c}
    assert await ids(label_selector={"tier": "web"}) >= {a, c}
    assert b not in await ids(label_selector={"tier": "web"})
    assert await ids(pod_sandbox_id=pod[0], label_selector={"tier": "web"}) == {a}
    assert await ids(id="f" * 64) == set()
    assert await ids(pod_sandbox_id="f" * 64) == set()


# ------------------------------------------------------------------- pod stats


async def test_pod_stats_with_network_traffic(
    pods: CriClient, pod_shim: Shim, pod: Pod, busybox: str
) -> None:
    container = await make_container(pods, pod, busybox, BUSY, name="pinger")
    gateway = pod_shim.test_subnet_prefix + "1"  # type: ignore[attr-defined]
    ping = await pods.runtime.exec_sync(
        cri.ExecSyncRequest(container, cmd=["ping", "-c", "3", "-i", "0.2", gateway], timeout=10)
    )
    assert ping.exit_code == 0, ping.stdout + ping.stderr

    async def rate_known() -> bool:
        # The CPU rate needs two samples some time apart.
        reply = await pods.runtime.pod_sandbox_stats(cri.PodSandboxStatsRequest(pod[0]))
        linux = reply.stats.linux if reply.stats is not None else None
        cpu = linux.cpu if linux is not None else None
        return bool(cpu and cpu.usage_nano_cores and cpu.usage_nano_cores.value > 0)

    assert await wait_for(rate_known, timeout=60)
    reply = await pods.runtime.pod_sandbox_stats(cri.PodSandboxStatsRequest(pod[0]))
    stats = reply.stats
    assert stats is not None and stats.attributes is not None and stats.linux is not None
    assert stats.attributes.id == pod[0]
    assert stats.attributes.metadata is not None
    assert stats.attributes.metadata.name == pod[1].metadata.name  # type: ignore[union-attr]
    linux = stats.linux
    network = linux.network
    assert network is not None and network.default_interface is not None
    eth0 = network.default_interface
    assert eth0.name == "eth0"
    assert eth0.rx_bytes is not None and eth0.tx_bytes is not None
    assert eth0.rx_bytes.value >= 3 * 64 and eth0.tx_bytes.value >= 3 * 64
    assert eth0.rx_errors is not None and eth0.rx_errors.value == 0
    assert all(i.name != "lo" for i in network.interfaces)
    assert linux.cpu is not None and linux.cpu.usage_core_nano_seconds is not None
    assert linux.cpu.usage_nano_cores is not None and linux.cpu.usage_nano_cores.value > 0
    assert linux.memory is not None and linux.memory.working_set_bytes is not None
    assert linux.memory.working_set_bytes.value > 0
    assert linux.process is not None and linux.process.process_count is not None
    assert linux.process.process_count.value >= 1
    assert [c.attributes.id for c in linux.containers if c.attributes] == [container]

    listed = await pods.runtime.list_pod_sandbox_stats(
        cri.ListPodSandboxStatsRequest(cri.PodSandboxStatsFilter(id=pod[0][:12]))
    )
    assert [s.attributes.id for s in listed.stats if s.attributes] == [pod[0]]
    everything = await pods.runtime.list_pod_sandbox_stats(cri.ListPodSandboxStatsRequest())
    assert pod[0] in {s.attributes.id for s in everything.stats if s.attributes}


async def test_list_pod_stats_label_filter_and_not_ready(
    pods: CriClient, pod: Pod, other_pod: Pod
) -> None:
    by_label = await pods.runtime.list_pod_sandbox_stats(
        cri.ListPodSandboxStatsRequest(cri.PodSandboxStatsFilter(label_selector={"pod": "b"}))
    )
    assert [s.attributes.id for s in by_label.stats if s.attributes] == [other_pod[0]]
    await pods.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(other_pod[0]))
    everything = await pods.runtime.list_pod_sandbox_stats(cri.ListPodSandboxStatsRequest())
    assert other_pod[0] not in {s.attributes.id for s in everything.stats if s.attributes}
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.pod_sandbox_stats(cri.PodSandboxStatsRequest(other_pod[0]))
    assert caught.value.status is Status.UNAVAILABLE


async def test_pod_stats_read_the_pod_cgroup(pods: CriClient, tmp_path: Path, busybox: str) -> None:
    parent = f"/crishim-stats-{random.randrange(1 << 30)}"
    config = pod_config(
        "cgroup",
        log_directory=str(tmp_path / "logs"),
        linux=cri.LinuxPodSandboxConfig(cgroup_parent=parent),
    )
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    try:
        pod = (reply.pod_sandbox_id, config)
        await make_container(pods, pod, busybox, BUSY, name="spin")

        async def spun() -> bool:
            reply = await pods.runtime.pod_sandbox_stats(cri.PodSandboxStatsRequest(pod[0]))
            linux = reply.stats.linux if reply.stats is not None else None
            cpu = linux.cpu if linux is not None else None
            used = cpu.usage_core_nano_seconds if cpu is not None else None
            return used is not None and used.value > 0

        assert await wait_for(spun, timeout=60)
        stats = await pods.runtime.pod_sandbox_stats(cri.PodSandboxStatsRequest(pod[0]))
        linux = stats.stats.linux if stats.stats is not None else None
        assert linux is not None and linux.cpu is not None and linux.memory is not None
        pod_cgroup = read_sample(parent, time.time_ns())
        assert pod_cgroup is not None and pod_cgroup.cpu_ns is not None
        reported = linux.cpu.usage_core_nano_seconds
        assert reported is not None
        # Read from the pod cgroup a moment ago: at most what the cgroup says now.
        assert 0 < reported.value <= pod_cgroup.cpu_ns
        assert len(linux.containers) == 1
    finally:
        await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(reply.pod_sandbox_id))
        # runc makes the parent in every hierarchy and removes only the pod's own cgroup.
        hierarchies = [CGROUP_ROOT, *(d for d in CGROUP_ROOT.iterdir() if d.is_dir())]
        for hierarchy in hierarchies:
            with contextlib.suppress(OSError):
                (hierarchy / parent.lstrip("/")).rmdir()


# ------------------------------------------------------- UpdateContainerResources


def memory_limit(shim: Shim, container_id: str, layout: str) -> int | None:
    """The container's memory limit as its cgroup file says (None: no limit)."""
    name = "memory.limit_in_bytes" if layout == "v1" else "memory.max"
    text = cgroup_file(shim, container_id, "memory", name).read_text().strip()
    return None if text == "max" else int(text)


def cpu_files(shim: Shim, container_id: str, layout: str) -> tuple[int, int, int]:
    """(quota, period, shares) from the cgroup; on v2 shares as runc wrote them
    into cpu.weight (weight = 1 + (shares - 2) * 9999 / 262142)."""
    if layout == "v1":
        return (
            int(cgroup_file(shim, container_id, "cpu", "cpu.cfs_quota_us").read_text()),
            int(cgroup_file(shim, container_id, "cpu", "cpu.cfs_period_us").read_text()),
            int(cgroup_file(shim, container_id, "cpu", "cpu.shares").read_text()),
        )
    quota, period = cgroup_file(shim, container_id, "cpu", "cpu.max").read_text().split()
    weight = int(cgroup_file(shim, container_id, "cpu", "cpu.weight").read_text())
    return (-1 if quota == "max" else int(quota), int(period), weight)


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_update_resources_of_a_running_container(
    pods: CriClient, pod_shim: Shim, pod: Pod, busybox: str, layout: str
) -> None:
    resources = cri.LinuxContainerResources(memory_limit_in_bytes=64 * MIB, cpu_shares=512)
    container = await make_container(
        pods,
        pod,
        busybox,
        ["sleep", "3600"],
        name="resized",
        linux=cri.LinuxContainerConfig(resources=resources),
    )
    assert memory_limit(pod_shim, container, layout) == 64 * MIB
    await pods.runtime.update_container_resources(
        cri.UpdateContainerResourcesRequest(
            container,
            linux=cri.LinuxContainerResources(
                memory_limit_in_bytes=96 * MIB, cpu_period=100_000, cpu_quota=50_000
            ),
        )
    )
    assert memory_limit(pod_shim, container, layout) == 96 * MIB
    # Shares were not named by the update: kept (512, on v2 as weight 20).
    shares = 512 if layout == "v1" else 20
    assert cpu_files(pod_shim, container, layout) == (50_000, 100_000, shares)
    # Inside, the container's own cgroup (its cgroup namespace on v2) shows the limit.
    own = (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes"
        if layout == "v1"
        else "/sys/fs/cgroup/memory.max"
    )
    inside = await pods.runtime.exec_sync(
        cri.ExecSyncRequest(container, cmd=["cat", own], timeout=10)
    )
    assert inside.stdout.strip() == str(96 * MIB).encode()
    status = await status_of(pods, container)
    linux = status.resources.linux if status.resources is not None else None
    assert linux is not None
    assert (linux.memory_limit_in_bytes, linux.cpu_quota, linux.cpu_period, linux.cpu_shares) == (
        96 * MIB,
        50_000,
        100_000,
        512,
    )
    # The stored spec is the source of truth: a restarted shim reads it back.
    assert pod_shim.container_manager is not None
    record = await pod_shim.container_manager.ops.get_container(container)
    assert record is not None and b'"limit": 100663296' in record.spec.value  # type: ignore[union-attr]


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_update_resources_before_start_lands_at_start(
    pods: CriClient, pod_shim: Shim, pod: Pod, busybox: str, layout: str
) -> None:
    container = await make_container(
        pods, pod, busybox, ["sleep", "3600"], name="later", start=False
    )
    await pods.runtime.update_container_resources(
        cri.UpdateContainerResourcesRequest(
            container, linux=cri.LinuxContainerResources(memory_limit_in_bytes=48 * MIB)
        )
    )
    status = await status_of(pods, container)
    assert status.resources is not None and status.resources.linux is not None
    assert status.resources.linux.memory_limit_in_bytes == 48 * MIB
    await pods.runtime.start_container(cri.StartContainerRequest(container))
    assert memory_limit(pod_shim, container, layout) == 48 * MIB


async def test_refused_update_keeps_the_old_spec(
    pods: CriClient, pod_shim: Shim, pod: Pod, busybox: str
) -> None:
    container = await make_container(pods, pod, busybox, ["sleep", "3600"], name="refused")
    with pytest.raises(GRPCError) as kernel:
        # A CFS quota under the kernel's 1 ms minimum: runc (the kernel) refuses it.
        await pods.runtime.update_container_resources(
            cri.UpdateContainerResourcesRequest(
                container, linux=cri.LinuxContainerResources(cpu_quota=500, cpu_period=100_000)
            )
        )
    assert kernel.value.status is Status.INVALID_ARGUMENT, kernel.value.message
    assert "cpu.cfs_quota_us" in (kernel.value.message or "")
    with pytest.raises(GRPCError) as refused:
        # A cpuset naming a CPU this machine lacks: refused before runc is asked.
        await pods.runtime.update_container_resources(
            cri.UpdateContainerResourcesRequest(
                container, linux=cri.LinuxContainerResources(cpuset_cpus="4095")
            )
        )
    assert refused.value.status is Status.INVALID_ARGUMENT
    assert "cpu 4095 is not online" in (refused.value.message or "")
    status = await status_of(pods, container)
    linux = status.resources.linux if status.resources is not None else None
    assert linux is None or (linux.cpuset_cpus == "" and linux.cpu_quota == 0)
    assert pod_shim.container_manager is not None
    spec = await pod_shim.container_manager.load_spec(container)
    cpu = spec["linux"]["resources"].get("cpu", {})
    assert "cpus" not in cpu and "quota" not in cpu


# ------------------------------------------------------------------------- OOM


async def test_oom_killed_container(pods: CriClient, pod: Pod, busybox: str) -> None:
    resources = cri.LinuxContainerResources(memory_limit_in_bytes=24 * MIB)
    container = await make_container(
        pods,
        pod,
        busybox,
        ["sh", "-c", "head -c 200m /dev/zero | tail"],
        name="hog",
        linux=cri.LinuxContainerConfig(resources=resources),
    )
    status = await wait_exited(pods, container, timeout=30)
    assert status.state == cri.ContainerState.CONTAINER_EXITED
    assert (status.reason, status.exit_code) == ("OOMKilled", 137)


async def test_oom_kill_found_in_the_cgroup_without_the_event(
    pods: CriClient, pod_shim: Shim, pod: Pod, busybox: str
) -> None:
    """The exit is handled before any TaskOOM event: the cgroup's own OOM
    counter, read before the task is deleted, still names the kill."""
    assert pod_shim.events is not None and pod_shim.container_manager is not None
    handlers = pod_shim.events.oom_handlers
    handlers.remove(pod_shim.container_manager.on_oom)
    try:
        resources = cri.LinuxContainerResources(memory_limit_in_bytes=24 * MIB)
        container = await make_container(
            pods,
            pod,
            busybox,
            ["sh", "-c", "head -c 200m /dev/zero | tail"],
            name="quiet-hog",
            linux=cri.LinuxContainerConfig(resources=resources),
        )
        status = await wait_exited(pods, container, timeout=30)
    finally:
        handlers.append(pod_shim.container_manager.on_oom)
    assert (status.reason, status.exit_code) == ("OOMKilled", 137)


async def test_oom_event_after_the_exit_still_counts(
    pods: CriClient, pod_shim: Shim, pod: Pod, busybox: str
) -> None:
    container = await make_container(pods, pod, busybox, ["sh", "-c", "exit 1"], name="late")
    status = await wait_exited(pods, container)
    assert status.reason == "Error"
    assert pod_shim.container_manager is not None
    await pod_shim.container_manager.on_oom(container)  # the TaskOOM event, arriving late
    status = await status_of(pods, container)
    assert (status.reason, status.exit_code) == ("OOMKilled", 1)


# ---------------------------------------------------------------- bad requests


async def test_bad_requests(pods: CriClient, pod: Pod) -> None:
    calls = [
        (pods.runtime.container_stats, cri.ContainerStatsRequest(""), Status.INVALID_ARGUMENT),
        (pods.runtime.container_stats, cri.ContainerStatsRequest("f" * 64), Status.NOT_FOUND),
        (pods.runtime.pod_sandbox_stats, cri.PodSandboxStatsRequest(""), Status.INVALID_ARGUMENT),
        (pods.runtime.pod_sandbox_stats, cri.PodSandboxStatsRequest("f" * 64), Status.NOT_FOUND),
        (
            pods.runtime.update_container_resources,
            cri.UpdateContainerResourcesRequest(""),
            Status.INVALID_ARGUMENT,
        ),
        (
            pods.runtime.update_container_resources,
            cri.UpdateContainerResourcesRequest("f" * 64, linux=cri.LinuxContainerResources()),
            Status.NOT_FOUND,
        ),
    ]
    for method, request, expected in calls:
        with pytest.raises(GRPCError) as caught:
            await method(request)  # type: ignore[operator]
        assert caught.value.status is expected, (request, caught.value)


async def test_negative_resources_are_refused(pods: CriClient, pod: Pod, busybox: str) -> None:
    container = await make_container(pods, pod, busybox, ["sleep", "3600"], name="neg")
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.update_container_resources(
            cri.UpdateContainerResourcesRequest(
                container, linux=cri.LinuxContainerResources(cpu_shares=-2)
            )
        )
    assert caught.value.status is Status.INVALID_ARGUMENT


# ------------------------------------------------------------------ decoding


def test_slices_and_cgroup_paths() -> None:
    assert expand_slice("kubepods-burstable-pod1.slice") == (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"
    )
    assert expand_slice("-.slice") == "/"
    assert relative_path("kubepods-pod1.slice:cri-containerd:abc") == (
        "/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope"
    )
    assert relative_path("system.slice") == "/system.slice"
    assert relative_path("/kubepods/burstable/pod1") == "/kubepods/burstable/pod1"
    assert relative_path("/kubepods.slice/kubepods-x.slice") == "/kubepods.slice/kubepods-x.slice"


def test_read_sample_v1_and_v2(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    for controller, files in {
        "cpuacct": {"cpuacct.usage": "123456"},
        "memory": {
            "memory.usage_in_bytes": "1000",
            "memory.limit_in_bytes": str(9223372036854771712),
            "memory.stat": "total_inactive_file 300\ntotal_rss 500\ntotal_pgfault 7\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        },
        "pids": {"pids.current": "3"},
    }.items():
        directory = v1 / controller / "pod"
        directory.mkdir(parents=True)
        for name, text in files.items():
            (directory / name).write_text(text + "\n")
    sample = read_sample("/pod", 5, root=v1)
    assert sample == CgroupSample(
        timestamp_ns=5,
        cpu_ns=123456,
        memory_usage=1000,
        inactive_file=300,
        rss=500,
        page_faults=7,
        pids=3,
    )
    assert oom_kills("/pod", root=v1) == 2
    assert read_sample("/missing", 5, root=v1) is None

    v2 = tmp_path / "v2"
    (v2 / "pod").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    for name, text in {
        "cpu.stat": "usage_usec 10\nuser_usec 5\n",
        "memory.current": "2000",
        "memory.max": "4096",
        "memory.stat": "anon 100\ninactive_file 2500\npgfault 1\npgmajfault 0\n",
        "memory.swap.current": "0",
        "memory.swap.max": "max",
        "memory.events": "oom 1\noom_kill 1\n",
        "pids.current": "1",
    }.items():
        (v2 / "pod" / name).write_text(text + "\n")
    sample2 = read_sample("pod", 9, root=v2)
    assert sample2 is not None
    assert (sample2.cpu_ns, sample2.memory_limit, sample2.swap_limit) == (10_000, 4096, None)
    usage = memory_usage(sample2)
    assert usage is not None and usage.working_set_bytes is not None
    assert usage.working_set_bytes.value == 0  # inactive file above usage: never negative
    assert usage.available_bytes is not None and usage.available_bytes.value == 4096
    assert oom_kills("pod", root=v2) == 1


def test_net_dev(tmp_path: Path) -> None:
    (tmp_path / "42" / "net").mkdir(parents=True)
    (tmp_path / "42" / "net" / "dev").write_text(
        "Inter-|   Receive                            |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes ...\n"
        "    lo:     100       1    0    0    0     0          0         0      100"
        "       1    0    0    0     0       0          0\n"
        "  eth0:    5000      20    1    0    0     0          0         0     3000"
        "      10    2    0    0     0       0          0\n"
    )
    counters = {c.name: c for c in read_net_dev(42, proc=tmp_path)}
    eth0 = counters["eth0"]
    assert (eth0.rx_bytes, eth0.rx_errors, eth0.tx_bytes, eth0.tx_errors) == (5000, 1, 3000, 2)
    assert read_net_dev(43, proc=tmp_path) == []


def test_cpu_rates_and_sums() -> None:
    second = 1_000_000_000
    rates = CpuRates(min_window_ns=second // 2)
    assert rates.nano_cores("c", 1 * second, 0) == 0  # first sample: no rate yet
    assert rates.nano_cores("c", 1 * second + 1000, 10) == 0  # too close, nothing before it
    assert rates.nano_cores("c", 2 * second, 500_000_000) == 500_000_000
    # 10 ms later: measured from the sample before, over 1.01 s, and not kept.
    assert rates.nano_cores("c", 2 * second + 10_000_000, 510_000_000) == 504_950_495
    assert rates.nano_cores("c", 2 * second, 900_000_000) == 504_950_495  # no time passed
    assert rates.nano_cores("c", 3 * second, 1_500_000_000) == 1_000_000_000
    assert rates.nano_cores("c", 4 * second, 100) == 0  # counter went down
    rates.keep_only(set())
    assert rates.nano_cores("c", 5 * second, 200) == 0
    total = sum_samples(
        [CgroupSample(1, cpu_ns=5, memory_usage=10, pids=1), CgroupSample(1, cpu_ns=7)], 3
    )
    assert (total.cpu_ns, total.memory_usage, total.pids, total.timestamp_ns) == (12, 10, 1, 3)


def test_v2_metrics_decode_by_type_url() -> None:
    payload = cgroups_v2.Metrics(
        cpu=cgroups_v2.CpuStat(usage_usec=3),
        memory=cgroups_v2.MemoryStat(usage=50, inactive_file=10, anon=20, usage_limit=1 << 63),
        pids=cgroups_v2.PidsStat(current=2),
    )
    metric = Metric(id="x", data=AnyMessage(type_url=CGROUPS_V2_METRICS, value=bytes(payload)))
    sample = sample_from_metric(metric)
    assert sample is not None
    assert (sample.cpu_ns, sample.memory_usage, sample.rss, sample.pids) == (3000, 50, 20, 2)
    assert sample.memory_limit is None  # "max" as the kernel reports it
    unknown = Metric(id="x", data=AnyMessage(type_url="example.com/Other", value=b""))
    assert sample_from_metric(unknown) is None


def test_samples_read_only_the_fields_they_need() -> None:
    """A v1 payload's blkio and hugetlb are skipped unparsed; the sample is the one a
    whole decode gives, and a malformed payload still fails as a whole decode does."""
    payload = cgroups_v1.Metrics(
        hugetlb=[cgroups_v1.HugetlbStat(usage=5, max=6, pagesize="2MB")],
        pids=cgroups_v1.PidsStat(current=3, limit=9),
        cpu=cgroups_v1.CpuStat(usage=cgroups_v1.CpuUsage(total=123, per_cpu=[1, 2])),
        memory=cgroups_v1.MemoryStat(
            total_rss=77,
            total_inactive_file=5,
            total_pg_fault=8,
            usage=cgroups_v1.MemoryEntry(usage=1000, limit=4096),
        ),
        blkio=cgroups_v1.BlkIoStat(
            io_service_bytes_recursive=[
                cgroups_v1.BlkIoEntry(op="Read", device="sda", major=8, value=i) for i in range(40)
            ]
        ),
    )
    data = bytes(payload)
    top = read_fields(data, frozenset({2, 3, 4}))
    assert set(top) == {2, 3, 4}
    assert cgroups_v1.PidsStat.parse(top[2]) == payload.pids  # type: ignore[arg-type]
    metric = Metric(id="x", data=AnyMessage(type_url=CGROUPS_V1_METRICS, value=data))
    sample = sample_from_metric(metric)
    assert sample is not None
    assert (sample.cpu_ns, sample.memory_usage, sample.rss, sample.pids) == (123, 1000, 77, 3)
    assert (sample.page_faults, sample.memory_limit) == (8, 4096)
    with pytest.raises(ValueError):
        read_fields(data[:-3], frozenset({2}))
    truncated = Metric(id="x", data=AnyMessage(type_url=CGROUPS_V1_METRICS, value=data[:-3]))
    with pytest.raises(Exception):  # noqa: B017 - whatever betterproto2 raises on it
        sample_from_metric(truncated)


_u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
_v1_payloads = st.builds(
    cgroups_v1.Metrics,
    pids=st.none() | st.builds(cgroups_v1.PidsStat, current=_u64, limit=_u64),
    cpu=st.none()
    | st.builds(
        cgroups_v1.CpuStat,
        usage=st.none()
        | st.builds(cgroups_v1.CpuUsage, total=_u64, per_cpu=st.lists(_u64, max_size=3)),
    ),
    memory=st.none()
    | st.builds(
        cgroups_v1.MemoryStat,
        cache=_u64,
        total_rss=_u64,
        total_pg_fault=_u64,
        total_pg_maj_fault=_u64,
        total_inactive_file=_u64,
        usage=st.none() | st.builds(cgroups_v1.MemoryEntry, limit=_u64, usage=_u64, max=_u64),
        swap=st.none() | st.builds(cgroups_v1.MemoryEntry, limit=_u64, usage=_u64),
    ),
    hugetlb=st.lists(st.builds(cgroups_v1.HugetlbStat, usage=_u64, pagesize=st.text()), max_size=2),
)
_v2_payloads = st.builds(
    cgroups_v2.Metrics,
    pids=st.none() | st.builds(cgroups_v2.PidsStat, current=_u64, limit=_u64),
    cpu=st.none() | st.builds(cgroups_v2.CpuStat, usage_usec=_u64, user_usec=_u64),
    memory=st.none()
    | st.builds(
        cgroups_v2.MemoryStat,
        anon=_u64,
        file=_u64,
        inactive_file=_u64,
        pgfault=_u64,
        pgmajfault=_u64,
        usage=_u64,
        usage_limit=_u64,
        swap_usage=_u64,
        swap_limit=_u64,
    ),
)


@settings(max_examples=300, deadline=None)
@given(_v1_payloads, _v2_payloads)
def test_wire_samples_equal_whole_decodes(v1: cgroups_v1.Metrics, v2: cgroups_v2.Metrics) -> None:
    """Reading the wire form gives the sample betterproto2's whole decode gives."""
    for payload, type_url, whole in (
        (v1, CGROUPS_V1_METRICS, sample_from_v1),
        (v2, CGROUPS_V2_METRICS, sample_from_v2),
    ):
        metric = Metric(id="x", data=AnyMessage(type_url=type_url, value=bytes(payload)))
        expected = whole(type(payload).parse(bytes(payload)), 5)  # type: ignore[arg-type]
        got = sample_from_metric(metric)
        assert got is not None
        assert dataclasses.replace(got, timestamp_ns=5) == expected


# A cgroup2 hierarchy: the host's own when /sys/fs/cgroup is unified, else the
# hybrid layout's /sys/fs/cgroup/unified (no controllers there, but cpu.stat).
V2_ROOT = CGROUP_ROOT if cgroup_v2_unified() else CGROUP_ROOT / "unified"


@pytest.mark.skipif(not cgroup_v2_unified(V2_ROOT), reason="this host has no cgroup2 hierarchy")
async def test_cgroup_v2_reader_on_a_real_hierarchy() -> None:
    """The v2 reader against the kernel's own files: a spinning process in a fresh
    cgroup2 group; its CPU time as the kernel's cpu.stat counts it (usage_usec),
    and only what the hierarchy's controllers offer (None, never 0, for the rest)."""
    group = V2_ROOT / f"crishim-v2-{os.getpid()}-{random.randrange(1 << 30)}"
    group.mkdir()
    spinner = await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
    try:
        (group / "cgroup.procs").write_text(str(spinner.pid))

        def kernel_usage_ns() -> int:
            for line in (group / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) * 1000
            raise AssertionError("no usage_usec in cpu.stat")

        async def spun() -> bool:
            return kernel_usage_ns() >= 50_000_000  # 50 ms of CPU, however loaded

        assert await wait_for(spun, timeout=60)
        before = kernel_usage_ns()
        sample = read_sample(f"/{group.name}", time.time_ns(), root=V2_ROOT)
        after = kernel_usage_ns()
        assert sample is not None and sample.cpu_ns is not None
        assert before <= sample.cpu_ns <= after
        controllers = (V2_ROOT / "cgroup.controllers").read_text().split()
        if "memory" not in controllers:
            assert sample.memory_usage is None and sample.memory_limit is None
        if "pids" in controllers:
            assert sample.pids is not None and sample.pids >= 1
        else:
            assert sample.pids is None
        assert read_sample("/crishim-v2-absent", time.time_ns(), root=V2_ROOT) is None
    finally:
        spinner.kill()
        await spinner.wait()

        async def emptied() -> bool:
            return (group / "cgroup.procs").read_text().strip() == ""

        await wait_for(emptied, timeout=10)
        group.rmdir()
