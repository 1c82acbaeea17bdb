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
from typing import Protocol

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
from cri_shim.gen.io.containerd.cgroups import v1 as cgroups_v1
from cri_shim.gen.io.containerd.cgroups import v2 as cgroups_v2
from cri_shim.gen.runtime import v1 as cri
from cri_shim.logs import log_event
from cri_shim.store.containers import Container, ContainerState, ContainerStore
from cri_shim.store.sandboxes import Sandbox, SandboxStore
from cri_shim.wire import read_fields

log = logging.getLogger(__name__)

CGROUPS_V1_METRICS = "io.containerd.cgroups.v1.Metrics"
CGROUPS_V2_METRICS = "io.containerd.cgroups.v2.Metrics"
DEFAULT_INTERFACE = "eth0"
POD_KEY_PREFIX = "pod/"


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


def _message(fields: dict[int, int | bytes], number: int) -> bytes | None:
    value = fields.get(number)
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise ValueError(f"field {number} is not a message")
    return value


def _number(fields: dict[int, int | bytes], number: int) -> int:
    value = fields.get(number, 0)
    if not isinstance(value, int):
        raise ValueError(f"field {number} is not a number")
    return value


_V1_TOP = frozenset({2, 3, 4})  # pids, cpu, memory
_V1_MEMORY = frozenset({19, 26, 27, 30, 33})  # total_rss, faults, inactive file, usage
_V2_TOP = frozenset({1, 2, 4})  # pids, cpu, memory
_V2_MEMORY = frozenset({1, 13, 18, 19, 32, 33, 34, 35})
_FIRST = frozenset({1})
_FIRST_TWO = frozenset({1, 2})


def _v1_sample(data: bytes, timestamp_ns: int) -> CgroupSample:
    """sample_from_v1 of the payload, read straight from its wire form."""
    top = read_fields(data, _V1_TOP)
    pids, cpu_stat, memory = _message(top, 2), _message(top, 3), _message(top, 4)
    cpu_usage = _message(read_fields(cpu_stat, _FIRST), 1) if cpu_stat is not None else None
    mem = read_fields(memory, _V1_MEMORY) if memory is not None else {}
    entry = _message(mem, 33)
    usage = read_fields(entry, _FIRST_TWO) if entry is not None else None
    return CgroupSample(
        timestamp_ns=timestamp_ns,
        cpu_ns=_number(read_fields(cpu_usage, _FIRST), 1) if cpu_usage is not None else None,
        memory_usage=_number(usage, 2) if usage is not None else None,
        inactive_file=_number(mem, 30),
        rss=_number(mem, 19),
        page_faults=_number(mem, 26),
        major_page_faults=_number(mem, 27),
        memory_limit=memory_limit(_number(usage, 1)) if usage is not None else None,
        pids=_number(read_fields(pids, _FIRST), 1) if pids is not None else None,
    )


def _v2_sample(data: bytes, timestamp_ns: int) -> CgroupSample:
    """sample_from_v2 of the payload, read straight from its wire form."""
    top = read_fields(data, _V2_TOP)
    pids, cpu_stat, memory = _message(top, 1), _message(top, 2), _message(top, 4)
    mem = read_fields(memory, _V2_MEMORY) if memory is not None else None
    return CgroupSample(
        timestamp_ns=timestamp_ns,
        cpu_ns=_number(read_fields(cpu_stat, _FIRST), 1) * 1000 if cpu_stat is not None else None,
        memory_usage=_number(mem, 32) if mem is not None else None,
        inactive_file=_number(mem, 13) if mem is not None else 0,
        rss=_number(mem, 1) if mem is not None else 0,
        page_faults=_number(mem, 18) if mem is not None else 0,
        major_page_faults=_number(mem, 19) if mem is not None else 0,
        memory_limit=memory_limit(_number(mem, 33)) if mem is not None else None,
        swap_usage=_number(mem, 34) if mem is not None else None,
        swap_limit=memory_limit(_number(mem, 35)) if mem is not None else None,
        pids=_number(read_fields(pids, _FIRST), 1) if pids is not None else None,
    )


_WIRE_SAMPLERS = {CGROUPS_V1_METRICS: _v1_sample, CGROUPS_V2_METRICS: _v2_sample}


def sample_from_metric(metric: Metric) -> CgroupSample | None:
    """Decode one Tasks.Metrics entry; None if its payload is of an unknown type.
    The figures are read from the wire form (read_fields); a payload that is not
    well formed is decoded whole by betterproto2, which says what is wrong."""
    data = metric.data
    timestamp = _ns(metric.timestamp)
    sampler = _WIRE_SAMPLERS.get(data.type_url.rsplit("/", 1)[-1]) if data is not None else None
    if data is not None and sampler is not None:
        try:
            return sampler(data.value, timestamp)
        except ValueError:
            pass
    payload = decode_payload(metric)
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


class LayerUsage(Protocol):
    async def of(self, key: str) -> tuple[int, int] | None: ...

    async def of_many(self, keys: Iterable[str]) -> dict[str, tuple[int, int] | None]: ...


@dataclass(frozen=True)
class PodFiles:
    """What a pod's stats read from files: its cgroup (kubelet's cgroup parent;
    None without one) and its network namespace's counters."""

    cgroup: CgroupSample | None
    interfaces: list[InterfaceCounters]


def read_pod_files(sandboxes: list[Sandbox], now: int) -> list[PodFiles]:
    """Blocking: for a worker thread, all pods of one stats call at once."""
    found = []
    for sandbox in sandboxes:
        linux = sandbox.config.linux
        parent = linux.cgroup_parent if linux is not None else ""
        with_network = not sandbox.host_network and sandbox.pid > 0
        found.append(
            PodFiles(
                cgroup=read_sample(parent, now) if parent else None,
                interfaces=read_net_dev(sandbox.pid) if with_network else [],
            )
        )
    return found


@dataclass
class StatsCollector:
    """Gathers samples from containerd and the pod cgroups and keeps the
    previous CPU sample of each container and pod."""

    ops: Runtime
    containers: ContainerStore
    sandboxes: SandboxStore
    snapshot_root: Callable[[], Awaitable[str]]
    # Writable layers' (bytes, inodes), keyed by container id (images/usage.py:
    # shared with ImageFsInfo, refreshed once per stats period).
    layers: LayerUsage

    def __post_init__(self) -> None:
        self.rates = CpuRates()

    async def samples(self, ids: Iterable[str]) -> dict[str, CgroupSample]:
        """The current sample of each running task among `ids` (one containerd call)."""
        found: dict[str, CgroupSample] = {}
        for metric in await self.ops.task_metrics(sorted(set(ids))):
            sample = sample_from_metric(metric)
            if sample is not None:
                found[metric.id] = sample
        return found

    async def writable_layer(self, container_id: str) -> cri.FilesystemUsage:
        usage = await self.layers.of(container_id)
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
        await self.layers.of_many(c.id for c in answered)  # all at once, then from cache
        result = await asyncio.gather(*(self.container_stats(c, samples[c.id]) for c in answered))
        self._forget_gone()
        return list(result)

    async def pod_stats(
        self, sandbox: Sandbox, samples: dict[str, CgroupSample], files: PodFiles, now: int
    ) -> cri.PodSandboxStats:
        """One pod's stats from samples of its pause and running containers and the
        files read for it (its cgroup, its network counters)."""
        running = [
            c for c in self.containers.in_sandbox(sandbox.id) if c.state is ContainerState.RUNNING
        ]
        parts = [samples[c.id] for c in running if c.id in samples]
        pod_sample = files.cgroup
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
        if files.interfaces:
            linux.network = network_usage(files.interfaces, now)
        return cri.PodSandboxStats(attributes=sandbox_attributes(sandbox), linux=linux)

    async def list_pod_stats(self, sandboxes: list[Sandbox]) -> list[cri.PodSandboxStats]:
        containers = [
            c.id
            for sandbox in sandboxes
            for c in self.containers.in_sandbox(sandbox.id)
            if c.state is ContainerState.RUNNING
        ]
        samples = await self.samples([*(s.id for s in sandboxes), *containers])
        await self.layers.of_many(i for i in containers if i in samples)
        now = time.time_ns()
        # Every pod's files in one trip to a worker thread, not two per pod.
        files = await asyncio.to_thread(read_pod_files, sandboxes, now)
        result = await asyncio.gather(
            *(self.pod_stats(s, samples, f, now) for s, f in zip(sandboxes, files, strict=True))
        )
        self._forget_gone()
        return list(result)

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
            usage = await self.layers.of(container.id)
            add_filesystem(out, filesystem, usage[0] if usage is not None else None)
        add_times(out, container.started_at)
        return container_metrics_bytes(container.id, out)

    def _forget_gone(self) -> None:
        """Drop the previous samples of containers and pods that no longer exist."""
        keys = {c.id for c in self.containers.by_id}
        keys |= {POD_KEY_PREFIX + s.id for s in self.sandboxes.by_id}
        self.rates.keep_only(keys)
