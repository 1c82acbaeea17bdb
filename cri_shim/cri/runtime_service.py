"""The CRI RuntimeService: each RPC routed, through the instrumented wrapper,
to the module that owns its group (status, sandbox, container, ...).

RPCs whose group has not landed yet are left to the generated base class,
which answers UNIMPLEMENTED as kubelet expects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from cri_shim.cri.container import ContainerHandlers
from cri_shim.cri.sandbox import SandboxHandlers
from cri_shim.cri.stats import StatsHandlers
from cri_shim.cri.status import StatusHandlers
from cri_shim.cri.streaming import StreamingHandlers
from cri_shim.gen.runtime import v1 as cri
from cri_shim.instrument import Instrumentation


class RuntimeService(cri.RuntimeServiceBase):
    def __init__(
        self,
        instrument: Instrumentation,
        status: StatusHandlers,
        sandboxes: SandboxHandlers,
        containers: ContainerHandlers,
        *,
        stats: StatsHandlers,
        streaming: StreamingHandlers,
    ) -> None:
        self._call = instrument.unary
        self._stream = instrument.server_stream
        self._status = status
        self._sandboxes = sandboxes
        self._containers = containers
        self._stats = stats
        self._streaming = streaming

    async def version(self, message: cri.VersionRequest) -> cri.VersionResponse:
        return await self._call("Version", self._status.version, message)

    async def status(self, message: cri.StatusRequest) -> cri.StatusResponse:
        return await self._call("Status", self._status.status, message)

    async def runtime_config(self, message: cri.RuntimeConfigRequest) -> cri.RuntimeConfigResponse:
        return await self._call("RuntimeConfig", self._status.runtime_config, message)

    async def update_runtime_config(
        self, message: cri.UpdateRuntimeConfigRequest
    ) -> cri.UpdateRuntimeConfigResponse:
        return await self._call("UpdateRuntimeConfig", self._status.update_runtime_config, message)

    async def run_pod_sandbox(self, message: cri.RunPodSandboxRequest) -> cri.RunPodSandboxResponse:
        return await self._call("RunPodSandbox", self._sandboxes.run_pod_sandbox, message)

    async def update_pod_sandbox_resources(
        self, message: cri.UpdatePodSandboxResourcesRequest
    ) -> cri.UpdatePodSandboxResourcesResponse:
        return await self._call(
            "UpdatePodSandboxResources", self._sandboxes.update_pod_sandbox_resources, message
        )

    async def stop_pod_sandbox(
        self, message: cri.StopPodSandboxRequest
    ) -> cri.StopPodSandboxResponse:
        return await self._call("StopPodSandbox", self._sandboxes.stop_pod_sandbox, message)

    async def remove_pod_sandbox(
        self, message: cri.RemovePodSandboxRequest
    ) -> cri.RemovePodSandboxResponse:
        return await self._call("RemovePodSandbox", self._sandboxes.remove_pod_sandbox, message)

    async def pod_sandbox_status(
        self, message: cri.PodSandboxStatusRequest
    ) -> cri.PodSandboxStatusResponse:
        return await self._call("PodSandboxStatus", self._sandboxes.pod_sandbox_status, message)

    async def list_pod_sandbox(
        self, message: cri.ListPodSandboxRequest
    ) -> cri.ListPodSandboxResponse:
        return await self._call("ListPodSandbox", self._sandboxes.list_pod_sandbox, message)

    async def stream_pod_sandboxes(
        self, message: cri.StreamPodSandboxesRequest
    ) -> AsyncIterator[cri.StreamPodSandboxesResponse]:
        async for batch in self._stream(
            "StreamPodSandboxes", self._sandboxes.stream_pod_sandboxes, message
        ):
            yield batch

    async def create_container(
        self, message: cri.CreateContainerRequest
    ) -> cri.CreateContainerResponse:
        return await self._call("CreateContainer", self._containers.create_container, message)

    async def start_container(
        self, message: cri.StartContainerRequest
    ) -> cri.StartContainerResponse:
        return await self._call("StartContainer", self._containers.start_container, message)

    async def stop_container(self, message: cri.StopContainerRequest) -> cri.StopContainerResponse:
        return await self._call("StopContainer", self._containers.stop_container, message)

    async def remove_container(
        self, message: cri.RemoveContainerRequest
    ) -> cri.RemoveContainerResponse:
        return await self._call("RemoveContainer", self._containers.remove_container, message)

    async def list_containers(
        self, message: cri.ListContainersRequest
    ) -> cri.ListContainersResponse:
        return await self._call("ListContainers", self._containers.list_containers, message)

    async def stream_containers(
        self, message: cri.StreamContainersRequest
    ) -> AsyncIterator[cri.StreamContainersResponse]:
        async for batch in self._stream(
            "StreamContainers", self._containers.stream_containers, message
        ):
            yield batch

    async def container_status(
        self, message: cri.ContainerStatusRequest
    ) -> cri.ContainerStatusResponse:
        return await self._call("ContainerStatus", self._containers.container_status, message)

    async def reopen_container_log(
        self, message: cri.ReopenContainerLogRequest
    ) -> cri.ReopenContainerLogResponse:
        return await self._call(
            "ReopenContainerLog", self._containers.reopen_container_log, message
        )

    async def checkpoint_container(
        self, message: cri.CheckpointContainerRequest
    ) -> cri.CheckpointContainerResponse:
        return await self._call(
            "CheckpointContainer", self._containers.checkpoint_container, message
        )

    async def exec_sync(self, message: cri.ExecSyncRequest) -> cri.ExecSyncResponse:
        return await self._call("ExecSync", self._containers.exec_sync, message)

    async def exec(self, message: cri.ExecRequest) -> cri.ExecResponse:
        return await self._call("Exec", self._streaming.exec, message)

    async def attach(self, message: cri.AttachRequest) -> cri.AttachResponse:
        return await self._call("Attach", self._streaming.attach, message)

    async def port_forward(self, message: cri.PortForwardRequest) -> cri.PortForwardResponse:
        return await self._call("PortForward", self._streaming.port_forward, message)

    async def get_container_events(
        self, message: cri.GetEventsRequest
    ) -> AsyncIterator[cri.ContainerEventResponse]:
        async for event in self._stream(
            "GetContainerEvents", self._containers.get_container_events, message
        ):
            yield event

    async def update_container_resources(
        self, message: cri.UpdateContainerResourcesRequest
    ) -> cri.UpdateContainerResourcesResponse:
        return await self._call(
            "UpdateContainerResources", self._containers.update_container_resources, message
        )

    async def container_stats(
        self, message: cri.ContainerStatsRequest
    ) -> cri.ContainerStatsResponse:
        return await self._call("ContainerStats", self._stats.container_stats, message)

    async def list_container_stats(
        self, message: cri.ListContainerStatsRequest
    ) -> cri.ListContainerStatsResponse:
        return await self._call("ListContainerStats", self._stats.list_container_stats, message)

    async def stream_container_stats(
        self, message: cri.StreamContainerStatsRequest
    ) -> AsyncIterator[cri.StreamContainerStatsResponse]:
        async for batch in self._stream(
            "StreamContainerStats", self._stats.stream_container_stats, message
        ):
            yield batch

    async def pod_sandbox_stats(
        self, message: cri.PodSandboxStatsRequest
    ) -> cri.PodSandboxStatsResponse:
        return await self._call("PodSandboxStats", self._stats.pod_sandbox_stats, message)

    async def list_pod_sandbox_stats(
        self, message: cri.ListPodSandboxStatsRequest
    ) -> cri.ListPodSandboxStatsResponse:
        return await self._call("ListPodSandboxStats", self._stats.list_pod_sandbox_stats, message)

    async def stream_pod_sandbox_stats(
        self, message: cri.StreamPodSandboxStatsRequest
    ) -> AsyncIterator[cri.StreamPodSandboxStatsResponse]:
        async for batch in self._stream(
            "StreamPodSandboxStats", self._stats.stream_pod_sandbox_stats, message
        ):
            yield batch

    async def list_metric_descriptors(
        self, message: cri.ListMetricDescriptorsRequest
    ) -> cri.ListMetricDescriptorsResponse:
        return await self._call(
            "ListMetricDescriptors", self._stats.list_metric_descriptors, message
        )

    async def list_pod_sandbox_metrics(
        self, message: cri.ListPodSandboxMetricsRequest
    ) -> cri.ListPodSandboxMetricsResponse:
        return await self._call(
            "ListPodSandboxMetrics", self._stats.list_pod_sandbox_metrics, message
        )

    async def stream_pod_sandbox_metrics(
        self, message: cri.StreamPodSandboxMetricsRequest
    ) -> AsyncIterator[cri.StreamPodSandboxMetricsResponse]:
        async for batch in self._stream(
            "StreamPodSandboxMetrics", self._stats.stream_pod_sandbox_metrics, message
        ):
            yield batch
