"""The stats path's hand-written wire code agrees with betterproto2, byte for byte."""

from __future__ import annotations

import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from cri_shim.container import stats_wire
from cri_shim.containerd.runtime import metric_from_wire
from cri_shim.gen.containerd.services.tasks.v1 import MetricsResponse
from cri_shim.gen.containerd.types import Metric
from cri_shim.gen.google.protobuf import Any as AnyMessage
from cri_shim.gen.runtime import v1 as cri
from cri_shim.wire import repeated_field

text = st.text(max_size=12)
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
i64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
wrapped = st.none() | st.builds(cri.UInt64Value, value=u64)
labels = st.dictionaries(text, text, max_size=4)

cpu = st.builds(
    cri.CpuUsage, timestamp=i64, usage_core_nano_seconds=wrapped, usage_nano_cores=wrapped
)
memory = st.builds(
    cri.MemoryUsage,
    timestamp=i64,
    working_set_bytes=wrapped,
    available_bytes=wrapped,
    usage_bytes=wrapped,
    rss_bytes=wrapped,
    page_faults=wrapped,
    major_page_faults=wrapped,
)
filesystem = st.builds(
    cri.FilesystemUsage,
    timestamp=i64,
    fs_id=st.none() | st.builds(cri.FilesystemIdentifier, mountpoint=text),
    used_bytes=wrapped,
    inodes_used=wrapped,
)
swap = st.builds(
    cri.SwapUsage, timestamp=i64, swap_available_bytes=wrapped, swap_usage_bytes=wrapped
)
container = st.builds(
    cri.ContainerStats,
    attributes=st.none()
    | st.builds(
        cri.ContainerAttributes,
        id=text,
        metadata=st.none()
        | st.builds(cri.ContainerMetadata, name=text, attempt=st.integers(0, (1 << 32) - 1)),
        labels=labels,
        annotations=labels,
    ),
    cpu=st.none() | cpu,
    memory=st.none() | memory,
    writable_layer=st.none() | filesystem,
    swap=st.none() | swap,
    io=st.none() | st.just(cri.IoUsage(timestamp=7)),
)
interface = st.builds(
    cri.NetworkInterfaceUsage,
    name=text,
    rx_bytes=wrapped,
    rx_errors=wrapped,
    tx_bytes=wrapped,
    tx_errors=wrapped,
)
pod = st.builds(
    cri.PodSandboxStats,
    attributes=st.none()
    | st.builds(
        cri.PodSandboxAttributes,
        id=text,
        metadata=st.none()
        | st.builds(
            cri.PodSandboxMetadata,
            name=text,
            uid=text,
            namespace=text,
            attempt=st.integers(0, (1 << 32) - 1),
        ),
        labels=labels,
        annotations=labels,
    ),
    linux=st.none()
    | st.builds(
        cri.LinuxPodSandboxStats,
        cpu=st.none() | cpu,
        memory=st.none() | memory,
        network=st.none()
        | st.builds(
            cri.NetworkUsage,
            timestamp=i64,
            default_interface=st.none() | interface,
            interfaces=st.lists(interface, max_size=3),
        ),
        process=st.none() | st.builds(cri.ProcessUsage, timestamp=i64, process_count=wrapped),
        containers=st.lists(container, max_size=3),
    ),
)


@settings(max_examples=300, deadline=None)
@given(container)
def test_container_stats_as_betterproto2_writes_them(stats: cri.ContainerStats) -> None:
    assert stats_wire.container_stats(stats) == bytes(stats)


@settings(max_examples=200, deadline=None)
@given(pod)
def test_pod_stats_as_betterproto2_writes_them(stats: cri.PodSandboxStats) -> None:
    assert stats_wire.pod_stats(stats) == bytes(stats)


timestamps = st.none() | st.datetimes(
    min_value=datetime.datetime(1900, 1, 1),
    max_value=datetime.datetime(2200, 1, 1),
    timezones=st.just(datetime.UTC),
)
metrics = st.builds(
    Metric,
    id=text,
    timestamp=timestamps,
    data=st.none() | st.builds(AnyMessage, type_url=text, value=st.binary(max_size=40)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(metrics, max_size=4))
def test_task_metrics_read_from_the_wire_as_betterproto2_decodes_them(
    items: list[Metric],
) -> None:
    """Tasks.Metrics replies are read field by field (runtime.metric_from_wire)."""
    data = bytes(MetricsResponse(metrics=items))
    expected = MetricsResponse.parse(data).metrics
    assert [metric_from_wire(item) for item in repeated_field(data, 1)] == expected
