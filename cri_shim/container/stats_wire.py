"""The stats replies' wire form, written by hand.

betterproto2 encodes in pure Python: one ContainerStats with kubelet's labels
and annotations took ~0.5 ms, and kubelet asks for every container twice each
10 s (ListContainerStats, then inside ListPodSandboxStats), which made encoding
a sixth of the shim's CPU on a full node. These functions write the same bytes
as `bytes(message)` for the fields the collector sets (tests compare the two on
random messages); fields it never sets (PSI, IO, Windows) go through
betterproto2 when present.
"""

from __future__ import annotations

from cri_shim.gen.runtime import v1 as cri
from cri_shim.store.encoded import map_field, message_field, varint

_U64_MASK = (1 << 64) - 1


def _tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def _int(number: int, value: int) -> bytes:
    """An int64/uint64/uint32 field; zero is not written (proto3)."""
    if not value:
        return b""
    return _tag(number, 0) + varint(value & _U64_MASK)


def _string(number: int, value: str) -> bytes:
    return message_field(number, value.encode()) if value else b""


def _message(number: int, data: bytes | None) -> bytes:
    """A set message field, even when empty (betterproto2 writes a set one)."""
    return b"" if data is None else message_field(number, data)


def _u64(number: int, wrapper: cri.UInt64Value | None) -> bytes:
    return b"" if wrapper is None else message_field(number, _int(1, wrapper.value))


def _other(number: int, message: object | None) -> bytes:
    return b"" if message is None else message_field(number, bytes(message))  # type: ignore[call-overload]


def cpu(usage: cri.CpuUsage) -> bytes:
    return (
        _int(1, usage.timestamp)
        + _u64(2, usage.usage_core_nano_seconds)
        + _u64(3, usage.usage_nano_cores)
        + _other(4, usage.psi)
    )


def memory(usage: cri.MemoryUsage) -> bytes:
    return (
        _int(1, usage.timestamp)
        + _u64(2, usage.working_set_bytes)
        + _u64(3, usage.available_bytes)
        + _u64(4, usage.usage_bytes)
        + _u64(5, usage.rss_bytes)
        + _u64(6, usage.page_faults)
        + _u64(7, usage.major_page_faults)
        + _other(8, usage.psi)
    )


def swap(usage: cri.SwapUsage) -> bytes:
    return (
        _int(1, usage.timestamp)
        + _u64(2, usage.swap_available_bytes)
        + _u64(3, usage.swap_usage_bytes)
    )


def filesystem(usage: cri.FilesystemUsage) -> bytes:
    fs_id = usage.fs_id
    return (
        _int(1, usage.timestamp)
        + _message(2, None if fs_id is None else _string(1, fs_id.mountpoint))
        + _u64(3, usage.used_bytes)
        + _u64(4, usage.inodes_used)
    )


def container_attributes(attributes: cri.ContainerAttributes) -> bytes:
    meta = attributes.metadata
    return (
        _string(1, attributes.id)
        + _message(2, None if meta is None else _string(1, meta.name) + _int(2, meta.attempt))
        + map_field(3, attributes.labels)
        + map_field(4, attributes.annotations)
    )


def _maybe(number: int, encode: object, message: object | None) -> bytes:
    return b"" if message is None else message_field(number, encode(message))  # type: ignore[operator]


def container_stats(stats: cri.ContainerStats) -> bytes:
    return (
        _maybe(1, container_attributes, stats.attributes)
        + _maybe(2, cpu, stats.cpu)
        + _maybe(3, memory, stats.memory)
        + _maybe(4, filesystem, stats.writable_layer)
        + _maybe(5, swap, stats.swap)
        + _other(6, stats.io)
    )


def _interface(usage: cri.NetworkInterfaceUsage) -> bytes:
    return (
        _string(1, usage.name)
        + _u64(2, usage.rx_bytes)
        + _u64(3, usage.rx_errors)
        + _u64(4, usage.tx_bytes)
        + _u64(5, usage.tx_errors)
    )


def network(usage: cri.NetworkUsage) -> bytes:
    return (
        _int(1, usage.timestamp)
        + _maybe(2, _interface, usage.default_interface)
        + b"".join(message_field(3, _interface(i)) for i in usage.interfaces)
    )


def process(usage: cri.ProcessUsage) -> bytes:
    return _int(1, usage.timestamp) + _u64(2, usage.process_count)


def pod_attributes(attributes: cri.PodSandboxAttributes) -> bytes:
    meta = attributes.metadata
    return (
        _string(1, attributes.id)
        + _message(
            2,
            None
            if meta is None
            else _string(1, meta.name)
            + _string(2, meta.uid)
            + _string(3, meta.namespace)
            + _int(4, meta.attempt),
        )
        + map_field(3, attributes.labels)
        + map_field(4, attributes.annotations)
    )


def linux_pod_stats(stats: cri.LinuxPodSandboxStats) -> bytes:
    return (
        _maybe(1, cpu, stats.cpu)
        + _maybe(2, memory, stats.memory)
        + _maybe(3, network, stats.network)
        + _maybe(4, process, stats.process)
        + b"".join(message_field(5, container_stats(c)) for c in stats.containers)
        + _other(6, stats.io)
    )


def pod_stats(stats: cri.PodSandboxStats) -> bytes:
    return (
        _maybe(1, pod_attributes, stats.attributes)
        + _maybe(2, linux_pod_stats, stats.linux)
        + _other(3, stats.windows)
    )


__all__ = ["container_stats", "pod_stats"]
