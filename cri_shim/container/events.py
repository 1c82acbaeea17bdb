"""Fan-out of container lifecycle events to GetContainerEvents subscribers
(kubelet's evented PLEG). A slow subscriber loses its oldest events rather
than holding up the runtime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from cri_shim.gen.runtime import v1 as cri

QUEUE_LIMIT = 1024


class ContainerEventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[cri.ContainerEventResponse]] = set()

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
