"""CreateContainer, StartContainer, StopContainer, RemoveContainer,
ContainerStatus, ListContainers, StreamContainers, UpdateContainerResources,
ReopenContainerLog, ExecSync and GetContainerEvents.

Status and List answer from the in-memory store; Stop and Remove of an
unknown id succeed so kubelet's retries after restarts never fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cri_shim.container.checkpoint import check_location
from cri_shim.container.events import ContainerEventBus
from cri_shim.container.exec_sync import ExecDrainTimeout, ExecTimeout, exec_sync
from cri_shim.container.lifecycle import ContainerManager
from cri_shim.cri.labels import require_label_keys
from cri_shim.errors import (
    DeadlineExceeded,
    Unknown,
    failed_precondition,
    invalid_argument,
    require,
)
from cri_shim.gen.runtime import v1 as cri
from cri_shim.oci.errors import SpecError
from cri_shim.store.containers import ContainerState, ContainerStore
from cri_shim.store.encoded import (
    BatchLimits,
    EncodedStreamContainersResponse,
    batches,
    container_status_response,
    list_containers_response,
    prebuilt,
)
from cri_shim.store.sandboxes import SandboxStore
from cri_shim.store.verbose import RUNC_IDENTITY, RuntimeIdentity, container_info, go_json

MAX_NAME_LENGTH = 253


class ContainerHandlers:
    def __init__(
        self,
        store: ContainerStore,
        sandboxes: SandboxStore,
        manager: ContainerManager,
        events: ContainerEventBus,
        limits: BatchLimits | None = None,
        runtime: RuntimeIdentity = RUNC_IDENTITY,
        *,
        drain_exec_sync_io_seconds: float = 0.0,
    ) -> None:
        self.store = store
        self.drain_exec_sync_io_seconds = drain_exec_sync_io_seconds
        self.limits = limits or BatchLimits()
        self.runtime = runtime
        self.sandboxes = sandboxes
        self.manager = manager
        self.events = events

    async def create_container(
        self, request: cri.CreateContainerRequest
    ) -> cri.CreateContainerResponse:
        require(request.pod_sandbox_id, "pod_sandbox_id")
        config = request.config
        if config is None or config.metadata is None:
            raise invalid_argument("config.metadata must be set")
        require(config.metadata.name, "config.metadata.name")
        if len(config.metadata.name) > MAX_NAME_LENGTH:
            raise invalid_argument(f"config.metadata.name exceeds {MAX_NAME_LENGTH} characters")
        if config.image is None or not config.image.image:
            raise invalid_argument("config.image.image must not be empty")
        require_label_keys(config.labels, "config.labels")
        sandbox = self.sandboxes.by_id.get(request.pod_sandbox_id)
        try:
            container_id = await self.manager.create(sandbox, config)
        except SpecError as err:
            raise invalid_argument(str(err)) from err
        return cri.CreateContainerResponse(container_id=container_id)

    async def start_container(
        self, request: cri.StartContainerRequest
    ) -> cri.StartContainerResponse:
        require(request.container_id, "container_id")
        await self.manager.start(self.store.by_id.get(request.container_id))
        return cri.StartContainerResponse()

    async def stop_container(self, request: cri.StopContainerRequest) -> cri.StopContainerResponse:
        require(request.container_id, "container_id")
        if request.timeout < 0:
            raise invalid_argument("timeout must not be negative")
        container = self.store.by_id.find(request.container_id)
        if container is not None:
            await self.manager.stop(container, request.timeout)
        return cri.StopContainerResponse()

    async def remove_container(
        self, request: cri.RemoveContainerRequest
    ) -> cri.RemoveContainerResponse:
        require(request.container_id, "container_id")
        container = self.store.by_id.find(request.container_id)
        if container is not None:
            await self.manager.remove(container)
        return cri.RemoveContainerResponse()

    async def container_status(
        self, request: cri.ContainerStatusRequest
    ) -> cri.ContainerStatusResponse:
        require(request.container_id, "container_id")
        container = self.store.by_id.get(request.container_id)
        if not request.verbose:
            return container_status_response(container)
        # containerd reads the spec back from its container record: the stored one.
        spec = container.runtime.spec or await self.manager.load_spec(container.id)
        info = container.info_bytes(
            lambda: {"info": go_json(container_info(container, spec, self.runtime))}, spec
        )
        return container_status_response(container, info)

    async def list_containers(
        self, request: cri.ListContainersRequest
    ) -> cri.ListContainersResponse:
        return list_containers_response(self.store.list(request.filter))

    async def stream_containers(
        self, request: cri.StreamContainersRequest
    ) -> AsyncIterator[cri.StreamContainersResponse]:
        """ListContainers in bounded batches; the items are taken (from the encoding
        cache) before the first send, so the stream is one consistent snapshot."""
        items = [c.list_bytes() for c in self.store.list(request.filter)]
        for body in batches(items, self.limits):
            yield prebuilt(EncodedStreamContainersResponse, body)

    async def update_container_resources(
        self, request: cri.UpdateContainerResourcesRequest
    ) -> cri.UpdateContainerResourcesResponse:
        require(request.container_id, "container_id")
        container = self.store.by_id.get(request.container_id)
        if request.linux is None:
            # Nothing for Linux to change (a Windows-only request): containerd's no-op.
            return cri.UpdateContainerResourcesResponse()
        try:
            await self.manager.update_resources(container, request.linux)
        except SpecError as err:
            raise invalid_argument(str(err)) from err
        return cri.UpdateContainerResourcesResponse()

    async def checkpoint_container(
        self, request: cri.CheckpointContainerRequest
    ) -> cri.CheckpointContainerResponse:
        require(request.container_id, "container_id")
        if request.timeout < 0:
            raise invalid_argument("timeout must not be negative")
        await asyncio.to_thread(check_location, request.location)
        container = self.store.by_id.get(request.container_id)
        # Shielded, and `timeout` not enforced (containerd ignores it too): a CRIU
        # dump cut off half-way by a caller that gave up must not leave the
        # container paused; the archive is still written.
        await asyncio.shield(self.manager.checkpoint(container, request.location))
        return cri.CheckpointContainerResponse()

    async def reopen_container_log(
        self, request: cri.ReopenContainerLogRequest
    ) -> cri.ReopenContainerLogResponse:
        require(request.container_id, "container_id")
        await self.manager.reopen_log(self.store.by_id.get(request.container_id))
        return cri.ReopenContainerLogResponse()

    async def exec_sync(self, request: cri.ExecSyncRequest) -> cri.ExecSyncResponse:
        require(request.container_id, "container_id")
        if not request.cmd:
            raise invalid_argument("cmd must not be empty")
        if request.timeout < 0:
            raise invalid_argument("timeout must not be negative")
        container = self.store.by_id.get(request.container_id)
        if container.state is not ContainerState.RUNNING:
            raise failed_precondition(f"container {container.id} is not running")
        spec = await self.manager.load_spec(container.id)
        try:
            result = await exec_sync(
                self.manager.ops,
                container.id,
                spec,
                list(request.cmd),
                float(request.timeout) if request.timeout else None,
                self.manager.io_dir(container.id) / "exec",
                drain_timeout=self.drain_exec_sync_io_seconds,
            )
        except ExecTimeout as err:
            raise DeadlineExceeded(str(err)) from err
        except ExecDrainTimeout as err:
            raise Unknown(f"failed to exec in container: {err}") from err
        return cri.ExecSyncResponse(
            stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
        )

    async def get_container_events(
        self, request: cri.GetEventsRequest
    ) -> AsyncIterator[cri.ContainerEventResponse]:
        async for event in self.events.subscribe():
            yield event
