"""A thin, typed layer over containerd's generated gRPC stubs.

One channel per process, the namespace header on every call, and containerd's
failures turned into `ContainerdError` / `ContainerdUnavailable`, which the
instrumented CRI wrapper maps to statuses a kubelet understands.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.exceptions import StreamTerminatedError

from cri_shim.errors import ContainerdError, ContainerdUnavailable
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.containerd.services.content import v1 as content_v1
from cri_shim.gen.containerd.services.diff import v1 as diff_v1
from cri_shim.gen.containerd.services.events import v1 as events_v1
from cri_shim.gen.containerd.services.images import v1 as images_v1
from cri_shim.gen.containerd.services.introspection import v1 as introspection_v1
from cri_shim.gen.containerd.services.leases import v1 as leases_v1
from cri_shim.gen.containerd.services.namespaces import v1 as namespaces_v1
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.gen.containerd.services.tasks import v1 as tasks_v1
from cri_shim.gen.containerd.services.version import v1 as version_v1
from cri_shim.gen.grpc.health import v1 as health_v1

T = TypeVar("T")

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"


def metadata_for(client: ContainerdClient, lease: str | None) -> dict[str, str]:
    """gRPC headers for calls whose new objects must be held by `lease`."""
    headers = {NAMESPACE_HEADER: client.namespace}
    if lease:
        headers[LEASE_HEADER] = lease
    return headers


@dataclass(frozen=True)
class ContainerdVersion:
    version: str
    revision: str


class ContainerdClient:
    """Stubs for every containerd service the shim uses, sharing one channel."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._channel = Channel(path=address)
        metadata = {NAMESPACE_HEADER: namespace}
        channel = self._channel
        self.containers = containers_v1.ContainersStub(channel, metadata=metadata)
        self.content = content_v1.ContentStub(channel, metadata=metadata)
        self.diff = diff_v1.DiffStub(channel, metadata=metadata)
        self.events = events_v1.EventsStub(channel, metadata=metadata)
        self.images = images_v1.ImagesStub(channel, metadata=metadata)
        self.introspection = introspection_v1.IntrospectionStub(channel, metadata=metadata)
        self.leases = leases_v1.LeasesStub(channel, metadata=metadata)
        self.namespaces = namespaces_v1.NamespacesStub(channel, metadata=metadata)
        self.snapshots = snapshots_v1.SnapshotsStub(channel, metadata=metadata)
        self.tasks = tasks_v1.TasksStub(channel, metadata=metadata)
        self.version_service = version_v1.VersionStub(channel, metadata=metadata)
        self.health = health_v1.HealthStub(channel)

    async def call(self, method: str, pending: Awaitable[T]) -> T:
        """Await one containerd call, translating its failure into our error types."""
        try:
            return await pending
        except GRPCError as err:
            raise ContainerdError(method, err.status, err.message or "") from err
        except (ConnectionError, FileNotFoundError, StreamTerminatedError) as err:
            raise ContainerdUnavailable(self.address, err) from err
        except OSError as err:
            # A socket path that is not a socket, or an unreadable one.
            raise ContainerdUnavailable(self.address, err) from err

    async def stream(self, method: str, responses: AsyncIterator[T]) -> AsyncIterator[T]:
        """Iterate a server stream from containerd with the same error translation."""
        try:
            async for item in responses:
                yield item
        except GRPCError as err:
            raise ContainerdError(method, err.status, err.message or "") from err
        except (ConnectionError, StreamTerminatedError, OSError) as err:
            raise ContainerdUnavailable(self.address, err) from err

    async def server_version(self, timeout: float | None = None) -> ContainerdVersion:
        reply = await self.call("Version", self.version_service.version(timeout=timeout))
        return ContainerdVersion(version=reply.version, revision=reply.revision)

    async def is_serving(self, timeout: float) -> bool:
        """True when containerd answers its health check as SERVING within `timeout`."""
        try:
            reply = await self.call(
                "Health.Check",
                self.health.check(health_v1.HealthCheckRequest(), timeout=timeout),
            )
        except (TimeoutError, ContainerdError, ContainerdUnavailable):
            return False
        return reply.status == health_v1.HealthCheckResponseServingStatus.SERVING

    def close(self) -> None:
        self._channel.close()
