"""Task exits and OOM kills: how a container's exit is recorded once, whichever
of containerd's event stream and StopContainer sees it first."""

from __future__ import annotations

import asyncio
import logging

from cri_shim.container.cgroups import oom_kills
from cri_shim.container.manager_base import (
    DRAIN_SECONDS,
    OOM_KILLED,
    ContainerManagerBase,
    _ns,
)
from cri_shim.containerd.events import TaskExit
from cri_shim.gen.runtime import v1 as cri
from cri_shim.logs import log_event
from cri_shim.store.containers import Container, ContainerState

log = logging.getLogger(__name__)


class ContainerExits(ContainerManagerBase):
    """The exit half of the container manager."""

    async def on_task_exit(self, event: TaskExit) -> None:
        container = self.store.by_id.find(event.container_id) if event.is_init else None
        if container is None or container.id != event.container_id:
            return
        if container.state is ContainerState.CREATED and container.runtime.io is not None:
            # Exited before StartContainer returned; finished once the start completes.
            container.runtime.early_exit = event
            return
        await self._finish(container, event.exit_code, _ns(event.exited_at))

    async def on_oom(self, container_id: str) -> None:
        container = self.store.by_id.find(container_id)
        if container is None or container.id != container_id:
            return
        container.oom_killed = True
        log_event(log, "container OOM event", level=logging.DEBUG, container=container.id)
        if container.state is ContainerState.EXITED and container.reason in ("Completed", "Error"):
            # The OOM event came after the exit was recorded (containerd's
            # events are not ordered across topics): the kill is the reason.
            container.reason = OOM_KILLED
            await self._persist_exit(container)
            log_event(log, "container exit was an OOM kill", container=container.id)

    async def _cgroup_oom_killed(self, container: Container) -> bool:
        """Whether the kernel OOM-killed anything in the container's cgroup; read
        before the task is deleted, when the cgroup still exists."""
        try:
            spec = await self.load_spec(container.id)
            cgroup = str(spec.get("linux", {}).get("cgroupsPath", ""))
            kills = await asyncio.to_thread(oom_kills, cgroup) if cgroup else None
        except Exception as err:  # the event may still say so
            log_event(
                log,
                "could not read the OOM counter",
                level=logging.DEBUG,
                container=container.id,
                error=err,
            )
            return False
        return bool(kills)

    async def _finish(
        self, container: Container, exit_code: int, finished_at: int, reason: str = ""
    ) -> None:
        """Record an exit once, whichever of event stream and Stop sees it first;
        `reason` overrides the one derived from the exit code."""
        if container.state is not ContainerState.RUNNING or container.runtime.exiting:
            return
        finished = container.runtime.finished
        if finished is None:
            finished = container.runtime.finished = asyncio.Event()
        if not container.oom_killed and exit_code != 0:
            container.oom_killed = await self._cgroup_oom_killed(container)
            if container.oom_killed:
                log_event(log, "OOM kill found in the cgroup", container=container.id)
        if container.state is not ContainerState.RUNNING or container.runtime.exiting:
            return  # finished (or being finished) by a concurrent caller meanwhile
        container.runtime.exiting = True
        try:
            await self._record_exit(container, exit_code, finished_at, reason)
        finally:
            container.runtime.exiting = False
            finished.set()

    async def _record_exit(
        self, container: Container, exit_code: int, finished_at: int, reason: str = ""
    ) -> None:
        container.exit_code = exit_code
        container.finished_at = finished_at
        container.pid = 0
        if container.oom_killed:
            container.reason = OOM_KILLED
        elif reason:
            container.reason = reason
        else:
            container.reason = "Completed" if exit_code == 0 else "Error"
        seen = container.runtime.exit_seen
        if seen is not None:
            seen.set()
        try:
            # Recorded before the task goes: a shim killed in between still finds the
            # exit code (in the record, or in the stopped task) when it starts again.
            await self._persist_exit(container)
            await self.ops.delete_task(container.id)
            container.runtime.task_deleted = True
            io, container.runtime.io = container.runtime.io, None
            if io is not None:
                await io.drained(DRAIN_SECONDS)
                await io.close()
        finally:
            # EXITED only once the output is copied, as containerd's CRI (its task
            # delete waits for the IO): whoever sees the exit finds the whole log.
            container.state = ContainerState.EXITED
        self._publish(container, cri.ContainerEventType.CONTAINER_STOPPED_EVENT)
        log_event(
            log,
            "container exited",
            container=container.id,
            exit_code=exit_code,
            reason=container.reason,
        )
