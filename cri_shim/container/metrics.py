"""cAdvisor-style metrics for ListMetricDescriptors and ListPodSandboxMetrics,
the input of kubelet's PodAndContainerStatsFromCRI (its /metrics/cadvisor).

Every family listed in DESCRIPTORS is produced from real readings:

- cpu, memory, block I/O, pids: containerd's Tasks.Metrics of each running
  container (one call for all of them), cgroup v1 or v2 payload;
- limits (container_spec_*), OOM kills, processes, threads, descriptors and
  sockets: the files of the container's cgroup and /proc, found from the
  container's init pid (one thread hop per container);
- filesystem: the snapshotter's usage of the writable layer and statvfs of
  the snapshotter's root;
- network: the pod's network namespace counters, per interface, loopback
  aside, as pod-level metrics.

Values are integers (the CRI field is a UInt64Value); *_seconds_total
counters are whole seconds, as containerd's CRI plugin answers them.
Families cAdvisor has but the runtime cannot read here (hugetlb, pressure,
ulimits) are not listed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from cri_shim.container.cgroups import ContainerFiles, InterfaceCounters
from cri_shim.gen.io.containerd.cgroups import v1 as cgroups_v1
from cri_shim.gen.io.containerd.cgroups import v2 as cgroups_v2
from cri_shim.gen.runtime import v1 as cri
from cri_shim.store.encoded import message_field, varint

COUNTER = cri.MetricType.COUNTER
GAUGE = cri.MetricType.GAUGE

# cAdvisor's labels on kubelet's /metrics/cadvisor, so dashboards keep working.
BASE_LABELS = ("container", "id", "image", "name", "namespace", "pod")
NANOS_PER_SECOND = 1_000_000_000
MICROS_PER_SECOND = 1_000_000


@dataclass(frozen=True)
class Family:
    help: str
    kind: cri.MetricType
    extra_labels: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    "container_blkio_device_usage_total": Family(
        "Blkio device bytes usage", COUNTER, ("device", "major", "minor", "operation")
    ),
    "container_cpu_cfs_periods_total": Family(
        "Number of elapsed enforcement period intervals.", COUNTER
    ),
    "container_cpu_cfs_throttled_periods_total": Family(
        "Number of throttled period intervals.", COUNTER
    ),
    "container_cpu_cfs_throttled_seconds_total": Family(
        "Total time duration the container has been throttled.", COUNTER
    ),
    "container_cpu_system_seconds_total": Family(
        "Cumulative system cpu time consumed in seconds.", COUNTER
    ),
    "container_cpu_usage_seconds_total": Family(
        "Cumulative cpu time consumed in seconds.", COUNTER
    ),
    "container_cpu_user_seconds_total": Family(
        "Cumulative user cpu time consumed in seconds.", COUNTER
    ),
    "container_file_descriptors": Family(
        "Number of open file descriptors for the container.", GAUGE
    ),
    "container_fs_inodes_free": Family("Number of available Inodes", GAUGE, ("device",)),
    "container_fs_inodes_total": Family("Number of Inodes", GAUGE, ("device",)),
    "container_fs_limit_bytes": Family(
        "Number of bytes that can be consumed by the container on this filesystem.",
        GAUGE,
        ("device",),
    ),
    "container_fs_reads_bytes_total": Family(
        "Cumulative count of bytes read", COUNTER, ("device",)
    ),
    "container_fs_reads_total": Family("Cumulative count of reads completed", COUNTER, ("device",)),
    "container_fs_usage_bytes": Family(
        "Number of bytes that are consumed by the container on this filesystem.",
        GAUGE,
        ("device",),
    ),
    "container_fs_writes_bytes_total": Family(
        "Cumulative count of bytes written", COUNTER, ("device",)
    ),
    "container_fs_writes_total": Family(
        "Cumulative count of writes completed", COUNTER, ("device",)
    ),
    "container_last_seen": Family("Last time a container was seen by the exporter", GAUGE),
    "container_memory_cache": Family("Number of bytes of page cache memory.", GAUGE),
    "container_memory_failcnt": Family("Number of memory usage hits limits", COUNTER),
    "container_memory_failures_total": Family(
        "Cumulative count of memory allocation failures.", COUNTER, ("failure_type", "scope")
    ),
    "container_memory_kernel_usage": Family("Size of kernel memory allocated in bytes.", GAUGE),
    "container_memory_mapped_file": Family("Size of memory mapped files in bytes.", GAUGE),
    "container_memory_max_usage_bytes": Family("Maximum memory usage recorded in bytes", GAUGE),
    "container_memory_rss": Family("Size of RSS in bytes.", GAUGE),
    "container_memory_swap": Family("Container swap usage in bytes.", GAUGE),
    "container_memory_usage_bytes": Family(
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
        GAUGE,
    ),
    "container_memory_working_set_bytes": Family("Current working set in bytes.", GAUGE),
    "container_network_receive_bytes_total": Family(
        "Cumulative count of bytes received", COUNTER, ("interface",)
    ),
    "container_network_receive_errors_total": Family(
        "Cumulative count of errors encountered while receiving", COUNTER, ("interface",)
    ),
    "container_network_receive_packets_dropped_total": Family(
        "Cumulative count of packets dropped while receiving", COUNTER, ("interface",)
    ),
    "container_network_receive_packets_total": Family(
        "Cumulative count of packets received", COUNTER, ("interface",)
    ),
    "container_network_transmit_bytes_total": Family(
        "Cumulative count of bytes transmitted", COUNTER, ("interface",)
    ),
    "container_network_transmit_errors_total": Family(
        "Cumulative count of errors encountered while transmitting", COUNTER, ("interface",)
    ),
    "container_network_transmit_packets_dropped_total": Family(
        "Cumulative count of packets dropped while transmitting", COUNTER, ("interface",)
    ),
    "container_network_transmit_packets_total": Family(
        "Cumulative count of packets transmitted", COUNTER, ("interface",)
    ),
    "container_oom_events_total": Family(
        "Count of out of memory events observed for the container", COUNTER
    ),
    "container_processes": Family("Number of processes running inside the container.", GAUGE),
    "container_sockets": Family("Number of open sockets for the container.", GAUGE),
    "container_spec_cpu_period": Family("CPU period of the container.", GAUGE),
    "container_spec_cpu_quota": Family("CPU quota of the container.", GAUGE),
    "container_spec_cpu_shares": Family("CPU share of the container.", GAUGE),
    "container_spec_memory_limit_bytes": Family("Memory limit for the container.", GAUGE),
    "container_spec_memory_swap_limit_bytes": Family("Memory swap limit for the container.", GAUGE),
    "container_start_time_seconds": Family(
        "Start time of the container since unix epoch in seconds.", GAUGE
    ),
    "container_threads": Family("Number of threads running inside the container", GAUGE),
    "container_threads_max": Family(
        "Maximum number of threads allowed inside the container, infinity if value is zero",
        GAUGE,
    ),
}


def descriptors() -> list[cri.MetricDescriptor]:
    return [
        cri.MetricDescriptor(
            name=name, help=family.help, label_keys=[*BASE_LABELS, *family.extra_labels]
        )
        for name, family in FAMILIES.items()
    ]


def _string_field(number: int, text: str) -> bytes:
    return message_field(number, text.encode())


# Metric's fields: 1 name, 2 timestamp, 3 metric_type, 4 label_values, 5 value.
_NAME_FIELDS = {name: _string_field(1, name) for name in FAMILIES}
_GAUGE_FIELD = varint(3 << 3) + varint(int(GAUGE))  # COUNTER is proto3's default: omitted


class MetricsBuilder:
    """Encodes metrics that share one subject's base labels and timestamp
    straight to their wire form: kubelet polls these, and betterproto2 spends
    ~40 µs encoding each of the ~50 metrics of a container."""

    def __init__(self, base_labels: list[str], timestamp_ns: int) -> None:
        self._prefix = varint(2 << 3) + varint(max(0, timestamp_ns))
        self._labels = b"".join(_string_field(4, label) for label in base_labels)
        self.encoded: list[bytes] = []

    def add(self, name: str, value: int, *extra_labels: str) -> None:
        family = FAMILIES[name]
        if len(extra_labels) != len(family.extra_labels):
            raise ValueError(f"metric {name} takes labels {family.extra_labels}")
        amount = max(0, value)
        value_field = message_field(5, varint(1 << 3) + varint(amount) if amount else b"")
        self.encoded.append(
            b"".join(
                (
                    _NAME_FIELDS[name],
                    self._prefix,
                    _GAUGE_FIELD if family.kind is GAUGE else b"",
                    self._labels,
                    *(_string_field(4, label) for label in extra_labels),
                    value_field,
                )
            )
        )


def container_metrics_bytes(container_id: str, metrics: MetricsBuilder) -> bytes:
    """A ContainerMetrics message: 1 container_id, 2 metrics."""
    return _string_field(1, container_id) + b"".join(
        message_field(2, metric) for metric in metrics.encoded
    )


def pod_metrics_bytes(sandbox_id: str, metrics: MetricsBuilder, containers: list[bytes]) -> bytes:
    """A PodSandboxMetrics message: 1 pod_sandbox_id, 2 metrics, 3 container_metrics."""
    return (
        _string_field(1, sandbox_id)
        + b"".join(message_field(2, metric) for metric in metrics.encoded)
        + b"".join(message_field(3, container) for container in containers)
    )


def container_labels(
    container_id: str, name: str, image: str, namespace: str, pod: str
) -> list[str]:
    """Values in BASE_LABELS order."""
    return [name, container_id, image, container_id, namespace, pod]


def pod_labels(sandbox_id: str, namespace: str, pod: str) -> list[str]:
    """Pod-level metrics (network) carry no container and no image, as cAdvisor's pod cgroup."""
    return ["", sandbox_id, "", sandbox_id, namespace, pod]


# ------------------------------------------------------------ cgroup payloads


def add_v1(out: MetricsBuilder, metrics: cgroups_v1.Metrics) -> None:
    cpu = metrics.cpu
    if cpu is not None and cpu.usage is not None:
        out.add("container_cpu_usage_seconds_total", cpu.usage.total // NANOS_PER_SECOND)
        out.add("container_cpu_user_seconds_total", cpu.usage.user // NANOS_PER_SECOND)
        out.add("container_cpu_system_seconds_total", cpu.usage.kernel // NANOS_PER_SECOND)
    if cpu is not None and cpu.throttling is not None:
        throttling = cpu.throttling
        out.add("container_cpu_cfs_periods_total", throttling.periods)
        out.add("container_cpu_cfs_throttled_periods_total", throttling.throttled_periods)
        out.add(
            "container_cpu_cfs_throttled_seconds_total",
            throttling.throttled_time // NANOS_PER_SECOND,
        )
    memory = metrics.memory
    if memory is not None:
        usage = memory.usage
        used = usage.usage if usage is not None else 0
        out.add("container_memory_usage_bytes", used)
        out.add(
            "container_memory_working_set_bytes",
            used - memory.total_inactive_file if memory.total_inactive_file < used else 0,
        )
        out.add("container_memory_max_usage_bytes", usage.max if usage is not None else 0)
        out.add("container_memory_failcnt", usage.failcnt if usage is not None else 0)
        out.add("container_memory_cache", memory.total_cache)
        out.add("container_memory_rss", memory.total_rss)
        out.add("container_memory_mapped_file", memory.total_mapped_file)
        out.add(
            "container_memory_kernel_usage", memory.kernel.usage if memory.kernel is not None else 0
        )
        # memory.memsw counts memory plus swap
        swap = memory.swap.usage - used if memory.swap is not None else 0
        out.add("container_memory_swap", swap)
        for kind, container_scope, hierarchy in (
            ("pgfault", memory.pg_fault, memory.total_pg_fault),
            ("pgmajfault", memory.pg_maj_fault, memory.total_pg_maj_fault),
        ):
            out.add("container_memory_failures_total", container_scope, kind, "container")
            out.add("container_memory_failures_total", hierarchy, kind, "hierarchy")
    blkio = metrics.blkio
    if blkio is not None:
        for entry in blkio.io_service_bytes_recursive:
            device = entry.device or f"{entry.major}:{entry.minor}"
            out.add(
                "container_blkio_device_usage_total",
                entry.value,
                device,
                str(entry.major),
                str(entry.minor),
                entry.op,
            )
            if entry.op.lower() == "read":
                out.add("container_fs_reads_bytes_total", entry.value, device)
            elif entry.op.lower() == "write":
                out.add("container_fs_writes_bytes_total", entry.value, device)
        for entry in blkio.io_serviced_recursive:
            device = entry.device or f"{entry.major}:{entry.minor}"
            if entry.op.lower() == "read":
                out.add("container_fs_reads_total", entry.value, device)
            elif entry.op.lower() == "write":
                out.add("container_fs_writes_total", entry.value, device)


def add_v2(out: MetricsBuilder, metrics: cgroups_v2.Metrics) -> None:
    cpu = metrics.cpu
    if cpu is not None:
        out.add("container_cpu_usage_seconds_total", cpu.usage_usec // MICROS_PER_SECOND)
        out.add("container_cpu_user_seconds_total", cpu.user_usec // MICROS_PER_SECOND)
        out.add("container_cpu_system_seconds_total", cpu.system_usec // MICROS_PER_SECOND)
        out.add("container_cpu_cfs_periods_total", cpu.nr_periods)
        out.add("container_cpu_cfs_throttled_periods_total", cpu.nr_throttled)
        out.add(
            "container_cpu_cfs_throttled_seconds_total", cpu.throttled_usec // MICROS_PER_SECOND
        )
    memory = metrics.memory
    if memory is not None:
        used = memory.usage
        out.add("container_memory_usage_bytes", used)
        out.add(
            "container_memory_working_set_bytes",
            used - memory.inactive_file if memory.inactive_file < used else 0,
        )
        out.add("container_memory_max_usage_bytes", memory.max_usage)
        events = metrics.memory_events
        out.add("container_memory_failcnt", events.max if events is not None else 0)
        out.add("container_memory_cache", memory.file)
        out.add("container_memory_rss", memory.anon)
        out.add("container_memory_mapped_file", memory.file_mapped)
        out.add("container_memory_kernel_usage", memory.kernel_stack + memory.slab)
        out.add("container_memory_swap", memory.swap_usage)
        for kind, count in (("pgfault", memory.pgfault), ("pgmajfault", memory.pgmajfault)):
            # v2 has no separate non-hierarchical counter (cAdvisor reports it twice too)
            out.add("container_memory_failures_total", count, kind, "container")
            out.add("container_memory_failures_total", count, kind, "hierarchy")
    io = metrics.io
    if io is not None:
        for entry in io.usage:
            device = f"{entry.major}:{entry.minor}"
            major, minor = str(entry.major), str(entry.minor)
            out.add(
                "container_blkio_device_usage_total", entry.rbytes, device, major, minor, "Read"
            )
            out.add(
                "container_blkio_device_usage_total", entry.wbytes, device, major, minor, "Write"
            )
            out.add("container_fs_reads_bytes_total", entry.rbytes, device)
            out.add("container_fs_writes_bytes_total", entry.wbytes, device)
            out.add("container_fs_reads_total", entry.rios, device)
            out.add("container_fs_writes_total", entry.wios, device)


def add_files(out: MetricsBuilder, files: ContainerFiles) -> None:
    processes, settings = files.processes, files.settings
    out.add("container_processes", processes.processes)
    out.add("container_threads", processes.threads)
    out.add("container_file_descriptors", processes.file_descriptors)
    out.add("container_sockets", processes.sockets)
    out.add("container_threads_max", settings.threads_max)
    out.add("container_oom_events_total", settings.oom_kills)
    out.add("container_spec_cpu_period", settings.cpu_period)
    out.add("container_spec_cpu_shares", settings.cpu_shares)
    out.add("container_spec_memory_limit_bytes", settings.memory_limit)
    out.add("container_spec_memory_swap_limit_bytes", settings.swap_limit)
    if settings.cpu_quota:
        out.add("container_spec_cpu_quota", settings.cpu_quota)  # cAdvisor: only with a quota


@dataclass(frozen=True)
class FilesystemInfo:
    mountpoint: str
    capacity_bytes: int
    inodes_total: int
    inodes_free: int


def filesystem_info(mountpoint: str) -> FilesystemInfo | None:
    """statvfs of the snapshotter's root (blocking: call through a thread)."""
    try:
        stat = os.statvfs(mountpoint)
    except OSError:
        return None
    return FilesystemInfo(mountpoint, stat.f_blocks * stat.f_frsize, stat.f_files, stat.f_ffree)


def add_filesystem(out: MetricsBuilder, filesystem: FilesystemInfo, used_bytes: int | None) -> None:
    device = filesystem.mountpoint
    out.add("container_fs_limit_bytes", filesystem.capacity_bytes, device)
    out.add("container_fs_inodes_total", filesystem.inodes_total, device)
    out.add("container_fs_inodes_free", filesystem.inodes_free, device)
    if used_bytes is not None:
        out.add("container_fs_usage_bytes", used_bytes, device)


def add_times(out: MetricsBuilder, started_at_ns: int) -> None:
    out.add("container_last_seen", time.time_ns() // NANOS_PER_SECOND)
    if started_at_ns:
        out.add("container_start_time_seconds", started_at_ns // NANOS_PER_SECOND)


def add_network(out: MetricsBuilder, interfaces: list[InterfaceCounters]) -> None:
    for counters in interfaces:
        if counters.name == "lo":
            continue  # cAdvisor leaves loopback out too
        name = counters.name
        out.add("container_network_receive_bytes_total", counters.rx_bytes, name)
        out.add("container_network_receive_packets_total", counters.rx_packets, name)
        out.add("container_network_receive_packets_dropped_total", counters.rx_dropped, name)
        out.add("container_network_receive_errors_total", counters.rx_errors, name)
        out.add("container_network_transmit_bytes_total", counters.tx_bytes, name)
        out.add("container_network_transmit_packets_total", counters.tx_packets, name)
        out.add("container_network_transmit_packets_dropped_total", counters.tx_dropped, name)
        out.add("container_network_transmit_errors_total", counters.tx_errors, name)
