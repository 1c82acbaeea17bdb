"""Container and pod usage for the CRI stats RPCs, figured as containerd's CRI
plugin (and cAdvisor before it) figures them, so kubelet's summaries,
eviction and autoscaling inputs come out the same.

- cpu: cumulative usage from the cgroup; usage_nano_cores is the rate between
  this sample and the previous one of the same container or pod (the first
  sample answers 0, as containerd does);
- memory: working set = usage - inactive file pages; available = limit -
  working set, only when there is a limit;
- writable layer: the snapshotter's usage of the container's snapshot, on the
  snapshotter's root;
- pods: the pod cgroup (kubelet's cgroup parent) when there is one, else the
  sum over the pause and running containers; network counters of the pod's
  network namespace; the process count of its running containers.

Every running container's sample comes from one Tasks.Metrics call; the
payload is decoded by type URL (cgroup v1 or v2 metrics).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from cri_shim.container.cgroups import (
    CgroupSample,
    InterfaceCounters,
    memory_limit,
    read_container_files,
    read_net_dev,
    read_sample,
)
from cri_shim.container.metrics import (
    FilesystemInfo,
    MetricsBuilder,
    add_files,
    add_filesystem,
    add_network,
    add_times,
    add_v1,
    add_v2,
    container_labels,
    container_metrics_bytes,
    filesystem_info,
    pod_labels,
    pod_metrics_bytes,
)
from cri_shim.containerd.runtime import Runtime
from cri_shim.gen.containerd.types import Metric
from cri_shim.gen.google.protobuf import Any as AnyMessage
from cri_shim.gen.io.containerd.cgroups import v1 as cgroups_v1
from cri_shim.gen.io.containerd.cgroups import v2 as cgroups_v2
from cri_shim.gen.runtime import v1 as cri
from cri_shim.logs import log_event
from cri_shim.store.containers import Container, ContainerState, ContainerStore
from cri_shim.store.sandboxes import Sandbox, SandboxStore

log = logging.getLogger(__name__)

CGROUPS_V1_METRICS = "io.containerd.cgroups.v1.Metrics"
CGROUPS_V2_METRICS = "io.containerd.cgroups.v2.Metrics"
DEFAULT_INTERFACE = "eth0"
# Snapshots.Usage walks the writable layer: bound how many walk at once.
CONCURRENT_USAGE_CALLS = 8
POD_KEY_PREFIX = "pod/"
# How long a writable layer's usage is reused (containerd's CRI refreshes its
# snapshot usage every 10 s, stats_collect_period).
LAYER_USAGE_SECONDS = 2.0


def _u64(value: int) -> cri.UInt64Value:
    return cri.UInt64Value(value=max(0, value))


def _ns(moment: datetime.datetime | None) -> int:
    return int(moment.timestamp() * 1_000_000_000) if moment is not None else time.time_ns()


# ------------------------------------------------------------------ decoding


def sample_from_v1(metrics: cgroups_v1.Metrics, timestamp_ns: int) -> CgroupSample:
    cpu = metrics.cpu.usage if metrics.cpu is not None else None
    memory = metrics.memory
    usage = memory.usage if memory is not None else None
    return CgroupSample(
        timestamp_ns=timestamp_ns,
        cpu_ns=cpu.total if cpu is not None else None,
        memory_usage=usage.usage if usage is not None else None,
        inactive_file=memory.total_inactive_file if memory is not None else 0,
        rss=memory.total_rss if memory is not None else 0,
        page_faults=memory.total_pg_fault if memory is not None else 0,
        major_page_faults=memory.total_pg_maj_fault if memory is not None else 0,
        memory_limit=memory_limit(usage.limit) if usage is not None else None,
        pids=metrics.pids.current if metrics.pids is not None else None,
    )


def sample_from_v2(metrics: cgroups_v2.Metrics, timestamp_ns: int) -> CgroupSample:
    cpu = metrics.cpu
    memory = metrics.memory
    return CgroupSample(
        timestamp_ns=timestamp_ns,
        cpu_ns=cpu.usage_usec * 1000 if cpu is not None else None,
        memory_usage=memory.usage if memory is not None else None,
        inactive_file=memory.inactive_file if memory is not None else 0,
        rss=memory.anon if memory is not None else 0,
        page_faults=memory.pgfault if memory is not None else 0,
        major_page_faults=memory.pgmajfault if memory is not None else 0,
        memory_limit=memory_limit(memory.usage_limit) if memory is not None else None,
        swap_usage=memory.swap_usage if memory is not None else None,
        swap_limit=memory_limit(memory.swap_limit) if memory is not None else None,
        pids=metrics.pids.current if metrics.pids is not None else None,
    )


def decode_payload(metric: Metric) -> cgroups_v1.Metrics | cgroups_v2.Metrics | None:
    """One Tasks.Metrics entry's payload by its type URL; None if unknown."""
    data = metric.data
    if data is None:
        return None
    kind = data.type_url.rsplit("/", 1)[-1]
    if kind == CGROUPS_V1_METRICS:
        return cgroups_v1.Metrics.parse(data.value)
    if kind == CGROUPS_V2_METRICS:
        return cgroups_v2.Metrics.parse(data.value)
    log_event(log, "unknown task metrics type", level=logging.DEBUG, container=metric.id, type=kind)
    return None


# The top-level fields a CgroupSample reads (pids, cpu, memory) in each payload type.
_SAMPLE_FIELDS = {
    CGROUPS_V1_METRICS: frozenset({2, 3, 4}),
    CGROUPS_V2_METRICS: frozenset({1, 2, 4}),
}


def _varint_at(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def only_fields(data: bytes, wanted: frozenset[int]) -> bytes:
    """The top-level fields of a message numbered in `wanted`, as wire bytes: the
    others (blkio, hugetlb, rdma: most of a cgroup v1 payload) are skipped unparsed,
    since betterproto2 decodes in pure Python. Raises ValueError on a malformed one."""
    out = bytearray()
    i, end = 0, len(data)
    try:
        while i < end:
            start = i
            key, i = _varint_at(data, i)
            wire = key & 7
            if wire == 0:
                _, i = _varint_at(data, i)
            elif wire == 1:
                i += 8
            elif wire == 2:
                length, i = _varint_at(data, i)
                i += length
            elif wire == 5:
                i += 4
            else:
                raise ValueError(f"unsupported wire type {wire}")
            if i > end:
                raise ValueError("truncated message")
            if key >> 3 in wanted:
                out += data[start:i]
    except IndexError as err:
        raise ValueError("truncated varint") from err
    return bytes(out)


def sample_from_metric(metric: Metric) -> CgroupSample | None:
    """Decode one Tasks.Metrics entry; None if its payload is of an unknown type."""
    data = metric.data
    wanted = _SAMPLE_FIELDS.get(data.type_url.rsplit("/", 1)[-1]) if data is not None else None
    if data is not None and wanted is not None:
        try:
            slim = only_fields(data.value, wanted)
        except ValueError:
            pass  # decoded whole below, which reports what is wrong with it
        else:
            metric = Metric(
                id=metric.id,
                timestamp=metric.timestamp,
                data=AnyMessage(type_url=data.type_url, value=slim),
            )
    payload = decode_payload(metric)
    timestamp = _ns(metric.timestamp)
    if isinstance(payload, cgroups_v1.Metrics):
        return sample_from_v1(payload, timestamp)
    if isinstance(payload, cgroups_v2.Metrics):
        return sample_from_v2(payload, timestamp)
    return None


def sum_samples(samples: Iterable[CgroupSample], timestamp_ns: int) -> CgroupSample:
    """A pod without a cgroup of its own: its containers' usage added up."""
    items = list(samples)

    def total(values: Iterable[int | None]) -> int | None:
        present = [v for v in values if v is not None]
        return sum(present) if present else None

    return CgroupSample(
        timestamp_ns=timestamp_ns,
        cpu_ns=total(s.cpu_ns for s in items),
        memory_usage=total(s.memory_usage for s in items),
        inactive_file=sum(s.inactive_file for s in items),
        rss=sum(s.rss for s in items),
        page_faults=sum(s.page_faults for s in items),
        major_page_faults=sum(s.major_page_faults for s in items),
        pids=total(s.pids for s in items),
    )


# --------------------------------------------------------------- CRI figures


class CpuRates:
    """usage_nano_cores needs two samples: the previous one per container (and
    per pod) is kept here, as containerd keeps it in its stores.

    kubelet asks for pod and container stats within milliseconds of each other;
    a rate over such a sliver is mostly noise, so a sample closer than
    `min_window_ns` to the kept one is measured against the sample before it
    and not kept.
    """

    def __init__(self, min_window_ns: int = 500_000_000) -> None:
        self.min_window_ns = min_window_ns
        # key -> the kept samples, newest last (time ns, usage ns), and the last rate
        self._samples: dict[str, list[tuple[int, int]]] = {}
        self._rate: dict[str, int] = {}

    def nano_cores(self, key: str, timestamp_ns: int, usage_ns: int) -> int:
        kept = self._samples.setdefault(key, [])
        if not kept:
            kept.append((timestamp_ns, usage_ns))
            self._rate[key] = 0
            return 0  # one sample: no rate yet (containerd answers 0 too)
        if timestamp_ns - kept[-1][0] >= self.min_window_ns:
            base = kept[-1]
            kept[:] = [base, (timestamp_ns, usage_ns)]
        elif len(kept) > 1 and timestamp_ns > kept[-1][0]:
            base = kept[-2]
        else:
            return self._rate[key]  # too close (or older): the last answer stands
        then, used = base
        elapsed = timestamp_ns - then
        # A counter that went down (pod sum after a container left) restarts the rate.
        rate = (usage_ns - used) * 1_000_000_000 // elapsed if usage_ns >= used else 0
        self._rate[key] = rate
        return rate

    def keep_only(self, keys: set[str]) -> None:
        for key in [k for k in self._samples if k not in keys]:
            del self._samples[key]
            self._rate.pop(key, None)


def cpu_usage(sample: CgroupSample, rates: CpuRates, key: str) -> cri.CpuUsage | None:
    if sample.cpu_ns is None:
        return None
    return cri.CpuUsage(
        timestamp=sample.timestamp_ns,
        usage_core_nano_seconds=_u64(sample.cpu_ns),
        usage_nano_cores=_u64(rates.nano_cores(key, sample.timestamp_ns, sample.cpu_ns)),
    )


def memory_usage(sample: CgroupSample) -> cri.MemoryUsage | None:
    if sample.memory_usage is None:
        return None
    usage = sample.memory_usage
    working_set = usage - sample.inactive_file if sample.inactive_file < usage else 0
    available = None
    if sample.memory_limit is not None:
        available = _u64(sample.memory_limit - working_set)
    return cri.MemoryUsage(
        timestamp=sample.timestamp_ns,
        working_set_bytes=_u64(working_set),
        available_bytes=available,
        usage_bytes=_u64(usage),
        rss_bytes=_u64(sample.rss),
        page_faults=_u64(sample.page_faults),
        major_page_faults=_u64(sample.major_page_faults),
    )


def swap_usage(sample: CgroupSample) -> cri.SwapUsage | None:
    if sample.swap_usage is None:
        return None
    available = None
    if sample.swap_limit is not None:
        available = _u64(sample.swap_limit - sample.swap_usage)
    return cri.SwapUsage(
        timestamp=sample.timestamp_ns,
        swap_usage_bytes=_u64(sample.swap_usage),
        swap_available_bytes=available,
    )


def _interface(counters: InterfaceCounters) -> cri.NetworkInterfaceUsage:
    return cri.NetworkInterfaceUsage(
        name=counters.name,
        rx_bytes=_u64(counters.rx_bytes),
        rx_errors=_u64(counters.rx_errors),
        tx_bytes=_u64(counters.tx_bytes),
        tx_errors=_u64(counters.tx_errors),
    )


def network_usage(interfaces: list[InterfaceCounters], timestamp_ns: int) -> cri.NetworkUsage:
    """eth0 (the CNI's interface) is the default; the others, loopback aside, follow."""
    default = next((i for i in interfaces if i.name == DEFAULT_INTERFACE), None)
    return cri.NetworkUsage(
        timestamp=timestamp_ns,
        default_interface=_interface(default) if default is not None else None,
        interfaces=[_interface(i) for i in interfaces if i.name not in ("lo", DEFAULT_INTERFACE)],
    )


def container_attributes(container: Container) -> cri.ContainerAttributes:
    return cri.ContainerAttributes(
        id=container.id,
        metadata=container.metadata,
        labels=dict(container.config.labels),
        annotations=dict(container.config.annotations),
    )


def sandbox_attributes(sandbox: Sandbox) -> cri.PodSandboxAttributes:
    return cri.PodSandboxAttributes(
        id=sandbox.id,
        metadata=sandbox.metadata,
        labels=dict(sandbox.config.labels),
        annotations=dict(sandbox.config.annotations),
    )


# ----------------------------------------------------------------- collector


@dataclass
class StatsCollector:
    """Gathers samples from containerd and the pod cgroups and keeps the
    previous CPU sample of each container and pod."""

    ops: Runtime
    containers: ContainerStore
    sandboxes: SandboxStore
    snapshot_root: Callable[[], Awaitable[str]]

    def __post_init__(self) -> None:
        self.rates = CpuRates()
        self._usage_calls = asyncio.Semaphore(CONCURRENT_USAGE_CALLS)
        # Each writable layer's last usage and when it was taken (monotonic):
        # kubelet asks ListContainerStats and ListPodSandboxStats back to back and
        # each would walk every layer again.
        self._layer_usage: dict[str, tuple[float, tuple[int, int] | None]] = {}

    async def samples(self, ids: Iterable[str]) -> dict[str, CgroupSample]:
        """The current sample of each running task among `ids` (one containerd call)."""
        found: dict[str, CgroupSample] = {}
        for metric in await self.ops.task_metrics(sorted(set(ids))):
            sample = sample_from_metric(metric)
            if sample is not None:
                found[metric.id] = sample
        return found

    async def writable_layer(self, container_id: str) -> cri.FilesystemUsage:
        taken = self._layer_usage.get(container_id)
        if taken is not None and time.monotonic() - taken[0] < LAYER_USAGE_SECONDS:
            usage = taken[1]
        else:
            async with self._usage_calls:
                usage = await self.ops.snapshot_usage(container_id)
            self._layer_usage[container_id] = (time.monotonic(), usage)
        used, inodes = usage if usage is not None else (0, 0)
        return cri.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=cri.FilesystemIdentifier(mountpoint=await self.snapshot_root()),
            used_bytes=_u64(used),
            inodes_used=_u64(inodes),
        )

    async def container_stats(
        self, container: Container, sample: CgroupSample | None
    ) -> cri.ContainerStats:
        """Stats of one container; without a sample (no task) only its layer."""
        stats = cri.ContainerStats(
            attributes=container_attributes(container),
            writable_layer=await self.writable_layer(container.id),
        )
        if sample is not None:
            stats.cpu = cpu_usage(sample, self.rates, container.id)
            stats.memory = memory_usage(sample)
            stats.swap = swap_usage(sample)
        return stats

    async def list_container_stats(self, containers: list[Container]) -> list[cri.ContainerStats]:
        """Running containers only: those are the ones containerd has metrics for."""
        running = [c for c in containers if c.state is ContainerState.RUNNING]
        samples = await self.samples(c.id for c in running)
        answered = [c for c in running if c.id in samples]
        result = await asyncio.gather(*(self.container_stats(c, samples[c.id]) for c in answered))
        self._forget_gone()
        return list(result)

    async def pod_stats(
        self, sandbox: Sandbox, samples: dict[str, CgroupSample]
    ) -> cri.PodSandboxStats:
        """One pod's stats from samples of its pause and running containers."""
        now = time.time_ns()
        running = [
            c for c in self.containers.in_sandbox(sandbox.id) if c.state is ContainerState.RUNNING
        ]
        parts = [samples[c.id] for c in running if c.id in samples]
        pod_sample = await self._pod_cgroup_sample(sandbox, now)
        if pod_sample is None:
            pause = samples.get(sandbox.id)
            pod_sample = sum_samples([*parts, *([pause] if pause else [])], now)
        linux = cri.LinuxPodSandboxStats(
            cpu=cpu_usage(pod_sample, self.rates, POD_KEY_PREFIX + sandbox.id),
            memory=memory_usage(pod_sample),
            containers=list(
                await asyncio.gather(
                    *(self.container_stats(c, samples[c.id]) for c in running if c.id in samples)
                )
            ),
        )
        pids = [p.pids for p in parts if p.pids is not None]
        if pids:
            linux.process = cri.ProcessUsage(timestamp=now, process_count=_u64(sum(pids)))
        if not sandbox.host_network and sandbox.pid > 0:
            interfaces = await asyncio.to_thread(read_net_dev, sandbox.pid)
            if interfaces:
                linux.network = network_usage(interfaces, now)
        return cri.PodSandboxStats(attributes=sandbox_attributes(sandbox), linux=linux)

    async def list_pod_stats(self, sandboxes: list[Sandbox]) -> list[cri.PodSandboxStats]:
        ids = [s.id for s in sandboxes]
        for sandbox in sandboxes:
            ids += [
                c.id
                for c in self.containers.in_sandbox(sandbox.id)
                if c.state is ContainerState.RUNNING
            ]
        samples = await self.samples(ids)
        result = await asyncio.gather(*(self.pod_stats(s, samples) for s in sandboxes))
        self._forget_gone()
        return list(result)

    async def _pod_cgroup_sample(self, sandbox: Sandbox, now: int) -> CgroupSample | None:
        linux = sandbox.config.linux
        parent = linux.cgroup_parent if linux is not None else ""
        if not parent:
            return None
        return await asyncio.to_thread(read_sample, parent, now)

    # ------------------------------------------------ ListPodSandboxMetrics

    async def list_pod_metrics(self, sandboxes: list[Sandbox]) -> list[bytes]:
        """cAdvisor-style metrics of these pods and their running containers, each
        pod an encoded PodSandboxMetrics message: one
        Tasks.Metrics call, one statvfs, then per container its cgroup files and
        writable layer, per pod its network counters."""
        running = {
            s.id: [
                c
                for c in self.containers.in_sandbox(s.id)
                if c.state is ContainerState.RUNNING and c.pid > 0
            ]
            for s in sandboxes
        }
        wanted = sorted(c.id for items in running.values() for c in items)
        payloads = {m.id: decode_payload(m) for m in await self.ops.task_metrics(wanted)}
        filesystem = await asyncio.to_thread(filesystem_info, await self.snapshot_root())
        return list(
            await asyncio.gather(
                *(self._pod_metrics(s, running[s.id], payloads, filesystem) for s in sandboxes)
            )
        )

    async def _pod_metrics(
        self,
        sandbox: Sandbox,
        containers: list[Container],
        payloads: dict[str, cgroups_v1.Metrics | cgroups_v2.Metrics | None],
        filesystem: FilesystemInfo | None,
    ) -> bytes:
        meta = sandbox.metadata
        pod = MetricsBuilder(pod_labels(sandbox.id, meta.namespace, meta.name), time.time_ns())
        if not sandbox.host_network and sandbox.pid > 0:
            add_network(pod, await asyncio.to_thread(read_net_dev, sandbox.pid))
        measured = [c for c in containers if c.id in payloads]
        encoded = await asyncio.gather(
            *(self._container_metrics(sandbox, c, payloads[c.id], filesystem) for c in measured)
        )
        return pod_metrics_bytes(sandbox.id, pod, list(encoded))

    async def _container_metrics(
        self,
        sandbox: Sandbox,
        container: Container,
        payload: cgroups_v1.Metrics | cgroups_v2.Metrics | None,
        filesystem: FilesystemInfo | None,
    ) -> bytes:
        meta = sandbox.metadata
        labels = container_labels(
            container.id, container.metadata.name, container.image_ref, meta.namespace, meta.name
        )
        out = MetricsBuilder(labels, time.time_ns())
        if isinstance(payload, cgroups_v1.Metrics):
            add_v1(out, payload)
        elif isinstance(payload, cgroups_v2.Metrics):
            add_v2(out, payload)
        files = await asyncio.to_thread(read_container_files, container.pid)
        if files is not None:
            add_files(out, files)
        if filesystem is not None:
            async with self._usage_calls:
                usage = await self.ops.snapshot_usage(container.id)
            add_filesystem(out, filesystem, usage[0] if usage is not None else None)
        add_times(out, container.started_at)
        return container_metrics_bytes(container.id, out)

    def _forget_gone(self) -> None:
        """Drop the previous samples of containers and pods that no longer exist."""
        keys = {c.id for c in self.containers.by_id}
        for gone in [k for k in self._layer_usage if k not in keys]:
            del self._layer_usage[gone]
        keys |= {POD_KEY_PREFIX + s.id for s in self.sandboxes.by_id}
        self.rates.keep_only(keys)
