"""Fan-out of container lifecycle events to GetContainerEvents subscribers
(kubelet's evented PLEG). A slow subscriber loses its oldest events rather
than holding up the runtime.

Each event has containerd's shape: the pod's sandbox status and the statuses
of all the pod's containers, and sandboxes have events of their own under the
sandbox id. kubelet drops an event whose pod status is missing, and takes the
container list as the pod's whole state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from cri_shim.gen.runtime import v1 as cri

QUEUE_LIMIT = 1024
# Sandbox id -> the pod's sandbox status (None once gone) and all its containers' statuses.
PodView = Callable[[str], tuple[cri.PodSandboxStatus | None, list[cri.ContainerStatus]]]


class ContainerEventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[cri.ContainerEventResponse]] = set()
        self.pod_view: PodView | None = None  # set by the server once the stores exist

    def publish_for(self, container_id: str, sandbox_id: str, kind: cri.ContainerEventType) -> None:
        """An event for a container (or, with its own id, a sandbox), carrying
        the pod's state as it is now. Built only when someone listens."""
        if not self._subscribers:
            return
        pod_status, statuses = self.pod_view(sandbox_id) if self.pod_view else (None, [])
        self.publish(
            cri.ContainerEventResponse(
                container_id=container_id,
                container_event_type=kind,
                created_at=time.time_ns(),
                pod_sandbox_status=pod_status,
                containers_statuses=statuses,
            )
        )

    def publish(self, event: cri.ContainerEventResponse) -> None:
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    async def subscribe(self) -> AsyncIterator[cri.ContainerEventResponse]:
        queue: asyncio.Queue[cri.ContainerEventResponse] = asyncio.Queue(QUEUE_LIMIT)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
