"""ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats,
ListMetricDescriptors and ListPodSandboxMetrics, and the Stream* variants of
the three lists (the same answer, in bounded batches).

The figures come from `container/stats.py`. Lists follow containerd: running
containers and ready pods only, unknown filter ids match nothing. A single
ContainerStats of a container without a task (created, exited) fails as
containerd's does: containerd's metrics call has no entry for it.

ListMetricDescriptors and ListPodSandboxMetrics carry cAdvisor-style
metrics (`container/metrics.py`) for kubelet's PodAndContainerStatsFromCRI:
ready pods, their running containers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from cri_shim.container import stats_wire
from cri_shim.container.metrics import descriptors
from cri_shim.container.stats import StatsCollector
from cri_shim.errors import Unavailable, Unknown, require
from cri_shim.gen.runtime import v1 as cri
from cri_shim.store.containers import Container, ContainerStore
from cri_shim.store.encoded import (
    BatchLimits,
    EncodedContainerStatsResponse,
    EncodedListContainerStatsResponse,
    EncodedListPodSandboxMetricsResponse,
    EncodedListPodSandboxStatsResponse,
    EncodedPodSandboxStatsResponse,
    EncodedStreamContainerStatsResponse,
    EncodedStreamPodSandboxMetricsResponse,
    EncodedStreamPodSandboxStatsResponse,
    batches,
    message_field,
    prebuilt,
)
from cri_shim.store.sandboxes import Sandbox, SandboxState, SandboxStore


def _framed_containers(stats: list[cri.ContainerStats]) -> Iterator[bytes]:
    """Each item as repeated field 1, encoded by hand (stats_wire)."""
    for item in stats:
        yield message_field(1, stats_wire.container_stats(item))


def _framed_pods(stats: list[cri.PodSandboxStats]) -> Iterator[bytes]:
    for item in stats:
        yield message_field(1, stats_wire.pod_stats(item))


class StatsHandlers:
    def __init__(
        self,
        containers: ContainerStore,
        sandboxes: SandboxStore,
        collector: StatsCollector,
        limits: BatchLimits | None = None,
    ) -> None:
        self.limits = limits or BatchLimits()
        self.containers = containers
        self.sandboxes = sandboxes
        self.collector = collector

    async def container_stats(
        self, request: cri.ContainerStatsRequest
    ) -> cri.ContainerStatsResponse:
        require(request.container_id, "container_id")
        container = self.containers.by_id.get(request.container_id)
        samples = await self.collector.samples([container.id])
        sample = samples.get(container.id)
        if sample is None:
            # containerd's words for the same case (its Tasks.Metrics answers no entry).
            raise Unknown("unexpected metrics response: []")
        stats = await self.collector.container_stats(container, sample)
        return prebuilt(
            EncodedContainerStatsResponse, message_field(1, stats_wire.container_stats(stats))
        )

    def _stats_containers(self, wanted: cri.ContainerStatsFilter | None) -> list[Container]:
        wanted = wanted or cri.ContainerStatsFilter()
        return self.containers.list(
            cri.ContainerFilter(
                id=wanted.id,
                pod_sandbox_id=wanted.pod_sandbox_id,
                label_selector=dict(wanted.label_selector),
            )
        )

    def _stats_sandboxes(self, wanted: cri.PodSandboxStatsFilter | None) -> list[Sandbox]:
        wanted = wanted or cri.PodSandboxStatsFilter()
        return self.sandboxes.list(
            cri.PodSandboxFilter(
                id=wanted.id,
                state=cri.PodSandboxStateValue(state=cri.PodSandboxState.SANDBOX_READY),
                label_selector=dict(wanted.label_selector),
            )
        )

    async def list_container_stats(
        self, request: cri.ListContainerStatsRequest
    ) -> cri.ListContainerStatsResponse:
        stats = await self.collector.list_container_stats(self._stats_containers(request.filter))
        return prebuilt(EncodedListContainerStatsResponse, b"".join(_framed_containers(stats)))

    async def stream_container_stats(
        self, request: cri.StreamContainerStatsRequest
    ) -> AsyncIterator[cri.StreamContainerStatsResponse]:
        """Collected once like ListContainerStats, each item encoded once, then batched."""
        stats = await self.collector.list_container_stats(self._stats_containers(request.filter))
        for body in batches(_framed_containers(stats), self.limits):
            yield prebuilt(EncodedStreamContainerStatsResponse, body)

    async def pod_sandbox_stats(
        self, request: cri.PodSandboxStatsRequest
    ) -> cri.PodSandboxStatsResponse:
        require(request.pod_sandbox_id, "pod_sandbox_id")
        sandbox = self.sandboxes.by_id.get(request.pod_sandbox_id)
        if sandbox.state is not SandboxState.READY:
            # containerd's answer too: kubelet treats it as transient.
            raise Unavailable(f"pod sandbox {sandbox.id} is not ready")
        stats = await self.collector.list_pod_stats([sandbox])
        return prebuilt(
            EncodedPodSandboxStatsResponse, message_field(1, stats_wire.pod_stats(stats[0]))
        )

    async def list_pod_sandbox_stats(
        self, request: cri.ListPodSandboxStatsRequest
    ) -> cri.ListPodSandboxStatsResponse:
        stats = await self.collector.list_pod_stats(self._stats_sandboxes(request.filter))
        return prebuilt(EncodedListPodSandboxStatsResponse, b"".join(_framed_pods(stats)))

    async def stream_pod_sandbox_stats(
        self, request: cri.StreamPodSandboxStatsRequest
    ) -> AsyncIterator[cri.StreamPodSandboxStatsResponse]:
        stats = await self.collector.list_pod_stats(self._stats_sandboxes(request.filter))
        for body in batches(_framed_pods(stats), self.limits):
            yield prebuilt(EncodedStreamPodSandboxStatsResponse, body)

    async def list_metric_descriptors(
        self, request: cri.ListMetricDescriptorsRequest
    ) -> cri.ListMetricDescriptorsResponse:
        return cri.ListMetricDescriptorsResponse(descriptors=descriptors())

    def _ready_sandboxes(self) -> list[Sandbox]:
        return self._stats_sandboxes(None)

    async def list_pod_sandbox_metrics(
        self, request: cri.ListPodSandboxMetricsRequest
    ) -> cri.ListPodSandboxMetricsResponse:
        metrics = await self.collector.list_pod_metrics(self._ready_sandboxes())
        body = b"".join(message_field(1, pod) for pod in metrics)
        return prebuilt(EncodedListPodSandboxMetricsResponse, body)

    async def stream_pod_sandbox_metrics(
        self, request: cri.StreamPodSandboxMetricsRequest
    ) -> AsyncIterator[cri.StreamPodSandboxMetricsResponse]:
        """Collected once like ListPodSandboxMetrics, each pod encoded once, then batched;
        no ready pod: the stream ends without a message."""
        metrics = await self.collector.list_pod_metrics(self._ready_sandboxes())
        framed_pods = (message_field(1, pod) for pod in metrics)
        for body in batches(framed_pods, self.limits):
            yield prebuilt(EncodedStreamPodSandboxMetricsResponse, body)
