"""ListMetricDescriptors, ListPodSandboxMetrics and StreamPodSandboxMetrics on
real containerd + runc + CNI, plus the /proc and cgroup readers they rest on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cri_shim.container.cgroups import (
    count_processes,
    process_cgroups,
    read_container_files,
    read_net_dev,
    weight_to_shares,
)
from cri_shim.container.metrics import (
    BASE_LABELS,
    FAMILIES,
    MetricsBuilder,
    container_labels,
    container_metrics_bytes,
    pod_labels,
    pod_metrics_bytes,
)
from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import cgroup_v2_unified
from cri_shim.server import Shim

from .conftest import CriClient
from .pods import make_container

MIB = 1 << 20
# Burns CPU and holds a listening socket and a 4 MiB file in its writable layer.
BUSY = [
    "sh",
    "-c",
    "dd if=/dev/zero of=/scratch bs=1M count=4 2>/dev/null; nc -l -p 8080 & while :; do :; done",
]
WAIT_SECONDS = 120.0

Pod = tuple[str, cri.PodSandboxConfig]
Values = dict[tuple[str, tuple[str, ...]], int]


async def pod_metrics(pods: CriClient, pod_id: str) -> cri.PodSandboxMetrics:
    reply = await pods.runtime.list_pod_sandbox_metrics(cri.ListPodSandboxMetricsRequest())
    found = [m for m in reply.pod_metrics if m.pod_sandbox_id == pod_id]
    assert len(found) == 1, [m.pod_sandbox_id for m in reply.pod_metrics]
    return found[0]


def values(metrics: list[cri.Metric]) -> Values:
    """(name, extra label values) -> value; the base labels are checked separately."""
    found: Values = {}
    for metric in metrics:
        assert metric.value is not None
        key = (metric.name, tuple(metric.label_values[len(BASE_LABELS) :]))
        assert key not in found, f"{key} twice"
        found[key] = metric.value.value
    return found


async def wait_for(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def container_values(metrics: cri.PodSandboxMetrics, container_id: str) -> Values:
    found = [c for c in metrics.container_metrics if c.container_id == container_id]
    assert len(found) == 1
    return values(found[0].metrics)


async def test_descriptors_match_what_is_produced(pods: CriClient, pod: Pod, busybox: str) -> None:
    reply = await pods.runtime.list_metric_descriptors(cri.ListMetricDescriptorsRequest())
    descriptors = {d.name: d for d in reply.descriptors}
    assert len(descriptors) == len(reply.descriptors) == len(FAMILIES)
    for descriptor in reply.descriptors:
        assert descriptor.help
        assert descriptor.label_keys[: len(BASE_LABELS)] == list(BASE_LABELS)
    resources = cri.LinuxContainerResources(cpu_period=100_000, cpu_quota=50_000)
    container = await make_container(
        pods,
        pod,
        busybox,
        BUSY,
        name="described",
        linux=cri.LinuxContainerConfig(resources=resources),
    )
    metrics = await pod_metrics(pods, pod[0])
    produced = [*metrics.metrics, *(m for c in metrics.container_metrics for m in c.metrics)]
    for metric in produced:
        descriptor = descriptors[metric.name]
        assert len(metric.label_values) == len(descriptor.label_keys), metric.name
        # cAdvisor's kinds: counters end in _total, but for one gauge and one counter
        counter = metric.name.endswith("_total") != (
            metric.name in ("container_fs_inodes_total", "container_memory_failcnt")
        )
        kind = cri.MetricType.COUNTER if counter else cri.MetricType.GAUGE
        assert metric.metric_type == kind, metric.name
        assert metric.timestamp > 0
    names = {m.name for m in produced}
    # Block I/O counters need a disk that accounts per cgroup: the rest must all be there.
    optional = {
        "container_blkio_device_usage_total",
        "container_fs_reads_bytes_total",
        "container_fs_reads_total",
        "container_fs_writes_bytes_total",
        "container_fs_writes_total",
    }
    assert set(descriptors) - optional <= names
    assert container in {c.container_id for c in metrics.container_metrics}


async def test_running_container_cpu_memory_processes_and_layer(
    pods: CriClient, pod: Pod, busybox: str
) -> None:
    resources = cri.LinuxContainerResources(
        memory_limit_in_bytes=64 * MIB, cpu_period=100_000, cpu_quota=50_000, cpu_shares=512
    )
    container = await make_container(
        pods, pod, busybox, BUSY, name="burner", linux=cri.LinuxContainerConfig(resources=resources)
    )
    first = container_values(await pod_metrics(pods, pod[0]), container)
    cpu = ("container_cpu_usage_seconds_total", ())

    async def burned_two_seconds() -> bool:
        now = container_values(await pod_metrics(pods, pod[0]), container)
        return now[cpu] >= first[cpu] + 2

    # Half a CPU's quota: two CPU-seconds take at least four seconds of wall time.
    await wait_for(burned_two_seconds, "the CPU counter to grow by 2 s")

    async def listening() -> bool:
        now = container_values(await pod_metrics(pods, pod[0]), container)
        return now[("container_sockets", ())] >= 1 and now[("container_processes", ())] >= 2

    await wait_for(listening, "nc's socket")
    metrics = await pod_metrics(pods, pod[0])
    found = next(c for c in metrics.container_metrics if c.container_id == container)
    meta = pod[1].metadata
    assert meta is not None
    for metric in found.metrics:
        assert metric.label_values[:6] == [
            "burner",
            container,
            busybox,
            container,
            meta.namespace,
            meta.name,
        ]
    now = values(found.metrics)
    assert now[cpu] >= 2
    assert (
        now[("container_cpu_user_seconds_total", ())]
        + now[("container_cpu_system_seconds_total", ())]
        <= now[cpu] + 1
    )
    # The quota holds it to half a CPU: periods elapse and some are throttled.
    assert now[("container_cpu_cfs_periods_total", ())] > 0
    assert now[("container_cpu_cfs_throttled_periods_total", ())] > 0
    assert now[("container_spec_cpu_quota", ())] == 50_000
    assert now[("container_spec_cpu_period", ())] == 100_000
    assert now[("container_spec_cpu_shares", ())] == 512
    assert now[("container_spec_memory_limit_bytes", ())] == 64 * MIB
    usage = now[("container_memory_usage_bytes", ())]
    working_set = now[("container_memory_working_set_bytes", ())]
    assert 0 < working_set <= usage <= 64 * MIB
    assert now[("container_memory_rss", ())] > 0
    peak = now[("container_memory_max_usage_bytes", ())]
    # v2 kernels before 5.19 have no memory.peak: containerd reports 0 there
    assert peak >= usage or (cgroup_v2_unified() and peak == 0)
    assert now[("container_memory_failures_total", ("pgfault", "hierarchy"))] > 0
    assert now[("container_oom_events_total", ())] == 0
    # sh and nc, each with stdin/stdout/stderr at least
    assert now[("container_threads", ())] >= now[("container_processes", ())] >= 2
    assert now[("container_file_descriptors", ())] >= 6
    layer = ("container_fs_usage_bytes",)
    usage_keys = [k for k in now if k[0] == layer[0]]
    assert len(usage_keys) == 1 and now[usage_keys[0]] >= 4 * MIB
    device = usage_keys[0][1]
    total = now[("container_fs_inodes_total", device)]
    assert 0 < now[("container_fs_inodes_free", device)] < total
    assert now[("container_fs_limit_bytes", device)] > now[usage_keys[0]]
    status = await pods.runtime.container_status(cri.ContainerStatusRequest(container))
    assert status.status is not None
    assert now[("container_start_time_seconds", ())] == status.status.started_at // 1_000_000_000
    assert abs(now[("container_last_seen", ())] - time.time()) < 60


async def test_pod_network_counters_grow_with_traffic(
    pods: CriClient, pod_shim: Shim, pod: Pod, busybox: str
) -> None:
    container = await make_container(pods, pod, busybox, ["sleep", "3600"], name="pinger")
    before = values((await pod_metrics(pods, pod[0])).metrics)
    meta = pod[1].metadata
    assert meta is not None
    gateway = pod_shim.test_subnet_prefix + "1"  # type: ignore[attr-defined]
    ping = await pods.runtime.exec_sync(
        cri.ExecSyncRequest(
            container, cmd=["ping", "-c", "5", "-s", "1000", "-i", "0.2", gateway], timeout=20
        )
    )
    assert ping.exit_code == 0, ping.stdout + ping.stderr
    metrics = await pod_metrics(pods, pod[0])
    for metric in metrics.metrics:
        assert metric.label_values == ["", pod[0], "", pod[0], meta.namespace, meta.name, "eth0"]
    after = values(metrics.metrics)
    eth0 = ("eth0",)
    sent = ("container_network_transmit_bytes_total", eth0)
    received = ("container_network_receive_bytes_total", eth0)
    assert after[sent] - before.get(sent, 0) >= 5 * 1000
    assert after[received] - before.get(received, 0) >= 5 * 1000
    tx_packets = ("container_network_transmit_packets_total", eth0)
    assert after[tx_packets] - before.get(tx_packets, 0) >= 5
    assert after[("container_network_receive_errors_total", eth0)] == 0
    assert not any(key[1] == ("lo",) for key in after)


async def test_stream_answers_the_same_pods(pods: CriClient, pod: Pod, busybox: str) -> None:
    container = await make_container(pods, pod, busybox, ["sleep", "3600"], name="streamed")
    streamed = [
        m
        async for batch in pods.runtime.stream_pod_sandbox_metrics(
            cri.StreamPodSandboxMetricsRequest()
        )
        for m in batch.pod_sandbox_metrics
    ]
    listed = await pods.runtime.list_pod_sandbox_metrics(cri.ListPodSandboxMetricsRequest())
    assert sorted(m.pod_sandbox_id for m in streamed) == sorted(
        m.pod_sandbox_id for m in listed.pod_metrics
    )
    ours = [m for m in streamed if m.pod_sandbox_id == pod[0]]
    assert [c.container_id for c in ours[0].container_metrics] == [container]
    # Figures move between calls; which metrics there are does not.
    assert sorted(values(ours[0].container_metrics[0].metrics)) == sorted(
        container_values(await pod_metrics(pods, pod[0]), container)
    )


# ------------------------------------------------------------------- readers


def test_net_dev_packets_and_drops(tmp_path: Path) -> None:
    (tmp_path / "42" / "net").mkdir(parents=True)
    (tmp_path / "42" / "net" / "dev").write_text(
        "Inter-|   Receive                            |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes ...\n"
        "  eth0:    5000      20    1    3    0     0          0         0     3000"
        "      10    2    4    0     0       0          0\n"
    )
    (eth0,) = read_net_dev(42, proc=tmp_path)
    assert (eth0.rx_packets, eth0.rx_dropped, eth0.tx_packets, eth0.tx_dropped) == (20, 3, 10, 4)


def test_container_files_v1_tree(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "7" / "task" / "7").mkdir(parents=True)
    (proc / "7" / "task" / "8").mkdir()
    (proc / "7" / "fd").mkdir()
    (proc / "7" / "fd" / "0").symlink_to("/dev/null")
    (proc / "7" / "fd" / "3").symlink_to("socket:[1234]")
    (proc / "7" / "cgroup").write_text(
        "4:cpu,cpuacct:/pods/c1\n3:memory:/pods/c1\n2:pids:/pods/c1\n0::/\n"
    )
    for controller, files in {
        "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1", "cpu.shares": "2"},
        "memory": {
            "memory.limit_in_bytes": "9223372036854771712",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        },
        "pids": {"pids.max": "max", "cgroup.procs": "7\n99\n"},  # 99 has exited
    }.items():
        directory = root / controller / "pods" / "c1"
        directory.mkdir(parents=True)
        for name, text in files.items():
            (directory / name).write_text(text)
    assert process_cgroups(7, proc)["cpuacct"] == "/pods/c1"
    container_files = read_container_files(7, root=root, proc=proc)
    assert container_files is not None
    assert container_files.processes == count_processes([7], proc)
    assert (container_files.processes.processes, container_files.processes.threads) == (1, 2)
    assert (container_files.processes.file_descriptors, container_files.processes.sockets) == (2, 1)
    settings = container_files.settings
    assert (settings.cpu_period, settings.cpu_quota, settings.cpu_shares) == (100000, 0, 2)
    assert (settings.memory_limit, settings.swap_limit, settings.threads_max) == (0, 0, 0)
    assert settings.oom_kills == 2
    assert read_container_files(8, root=root, proc=proc) is None


def test_weight_to_shares_inverts_runc() -> None:
    # runc: weight = 1 + ((shares - 2) * 9999) / 262142
    for shares in (2, 1024, 262144):
        weight = 1 + ((shares - 2) * 9999) // 262142
        assert abs(weight_to_shares(weight) - shares) <= 27


def test_hand_encoding_matches_betterproto() -> None:
    labels = container_labels("c1", "app", "img:1", "ns", "pod")
    built = MetricsBuilder(labels, 1_700_000_000_123)
    built.add("container_cpu_usage_seconds_total", 7)
    built.add("container_memory_rss", 0)  # a zero value: an empty UInt64Value, still present
    built.add("container_fs_usage_bytes", 1 << 40, "/var/lib")
    pod = MetricsBuilder(pod_labels("p1", "ns", "pod"), 5)
    pod.add("container_network_receive_bytes_total", 300, "eth0")
    encoded = pod_metrics_bytes("p1", pod, [container_metrics_bytes("c1", built)])

    def metric(name: str, kind: cri.MetricType, value: int, *extra: str) -> cri.Metric:
        return cri.Metric(
            name=name,
            timestamp=1_700_000_000_123,
            metric_type=kind,
            label_values=[*labels, *extra],
            value=cri.UInt64Value(value=value),
        )

    expected = cri.PodSandboxMetrics(
        pod_sandbox_id="p1",
        metrics=[
            cri.Metric(
                name="container_network_receive_bytes_total",
                timestamp=5,
                metric_type=cri.MetricType.COUNTER,
                label_values=["", "p1", "", "p1", "ns", "pod", "eth0"],
                value=cri.UInt64Value(value=300),
            )
        ],
        container_metrics=[
            cri.ContainerMetrics(
                container_id="c1",
                metrics=[
                    metric("container_cpu_usage_seconds_total", cri.MetricType.COUNTER, 7),
                    metric("container_memory_rss", cri.MetricType.GAUGE, 0),
                    metric("container_fs_usage_bytes", cri.MetricType.GAUGE, 1 << 40, "/var/lib"),
                ],
            )
        ],
    )
    assert encoded == bytes(expected)
    assert cri.PodSandboxMetrics().parse(encoded) == expected
    with pytest.raises(ValueError, match="takes labels"):
        built.add("container_fs_usage_bytes", 1)
