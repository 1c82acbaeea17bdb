"""containerd's event stream, turned into calls on the shim's stores.

Task exits and OOM kills must reach the in-memory view at once (kubelet reads
it every second), and so must image records made or removed by other clients
of the same containerd (`ctr -n k8s.io images import`, `kind load`), as
containerd's CRI shows them; so one subscription runs for the life of the shim
and is re-established, with a resync, whenever containerd comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cri_shim.concurrency import stop_task
from cri_shim.containerd.client import ContainerdClient
from cri_shim.errors import ContainerdError, ContainerdUnavailable
from cri_shim.gen.containerd import events as events_v1
from cri_shim.gen.containerd.services.events import v1 as events_service
from cri_shim.gen.containerd.services.images import v1 as images_v1
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

TASK_EXIT_URL = "containerd.events.TaskExit"
TASK_OOM_URL = "containerd.events.TaskOOM"
IMAGE_CREATE_URL = "containerd.services.images.v1.ImageCreate"
IMAGE_UPDATE_URL = "containerd.services.images.v1.ImageUpdate"
IMAGE_DELETE_URL = "containerd.services.images.v1.ImageDelete"


@dataclass(frozen=True)
class TaskExit:
    container_id: str
    exec_id: str  # equals container_id for the task's main process
    pid: int
    exit_code: int
    exited_at: datetime.datetime | None

    @property
    def is_init(self) -> bool:
        return self.exec_id in ("", self.container_id)


ExitHandler = Callable[[TaskExit], Awaitable[None]]
OomHandler = Callable[[str], Awaitable[None]]
# An image record's name, and whether it was deleted (else created or updated).
ImageHandler = Callable[[str, bool], Awaitable[None]]
Resync = Callable[[], Awaitable[None]]
# After a new subscription is sent: long enough for containerd to register it,
# so an exit is either in the stream or already visible to the resync.
RESYNC_DELAY = 0.5


def _type_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


class EventMonitor:
    def __init__(self, client: ContainerdClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.exit_handlers: list[ExitHandler] = []
        self.oom_handlers: list[OomHandler] = []
        self.image_handlers: list[ImageHandler] = []
        # Run after a lost stream is re-established: exits in the gap never arrive.
        self.resync_handlers: list[Resync] = []
        self._task: asyncio.Task[None] | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def _dispatch(self, type_url: str, payload: bytes) -> None:
        name = _type_name(type_url)
        if name == TASK_EXIT_URL:
            event = events_v1.TaskExit.parse(payload)
            exit_info = TaskExit(
                event.container_id, event.id, event.pid, event.exit_status, event.exited_at
            )
            for handler in self.exit_handlers:
                await handler(exit_info)
        elif name == TASK_OOM_URL:
            oom = events_v1.TaskOom.parse(payload)
            for oom_handler in self.oom_handlers:
                await oom_handler(oom.container_id)
        elif name in (IMAGE_CREATE_URL, IMAGE_UPDATE_URL, IMAGE_DELETE_URL):
            deleted = name == IMAGE_DELETE_URL
            # The three messages all carry the record's name in field 1.
            image_name = images_v1.ImageDelete.parse(payload).name
            for image_handler in self.image_handlers:
                await image_handler(image_name, deleted)

    async def _resync(self) -> None:
        await asyncio.sleep(RESYNC_DELAY)
        for handler in self.resync_handlers:
            try:
                await handler()
            except Exception as err:  # the next reconnect tries again
                log_event(
                    log, "resync after event stream loss failed", level=logging.WARNING, error=err
                )

    async def _subscribe_once(self, resync: bool) -> None:
        request = events_service.SubscribeRequest(
            filters=[
                f'namespace=={self.namespace},topic=="/tasks/exit"',
                f'namespace=={self.namespace},topic=="/tasks/oom"',
                *(
                    f'namespace=={self.namespace},topic=="/images/{action}"'
                    for action in ("create", "update", "delete")
                ),
            ]
        )
        stream = self.client.stream("Events.Subscribe", self.client.events.subscribe(request))
        self.subscribed.set()
        if resync:
            self._resync_task = asyncio.create_task(self._resync(), name="containerd-resync")
        async for envelope in stream:
            if envelope.event is None:
                continue
            try:
                await self._dispatch(envelope.event.type_url, envelope.event.value)
            except Exception:
                log.exception("event handler failed")

    async def _run(self) -> None:
        backoff = 0.2
        lost = False
        while True:
            try:
                await self._subscribe_once(resync=lost)
                backoff = 0.2
            except (ContainerdUnavailable, ContainerdError) as err:
                self.subscribed.clear()
                log_event(log, "event stream lost", level=logging.DEBUG, error=err)
            lost = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="containerd-events")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.subscribed.wait(), 5)

    async def stop(self) -> None:
        await stop_task(self._resync_task)
        self._resync_task = None
        await stop_task(self._task)
        self._task = None
