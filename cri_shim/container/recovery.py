"""Rebuilding containers after a restart of the shim or of containerd: records
read back, log copiers re-attached, missed exits picked up, what a killed
shim left behind released (as containerd's restart.go)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from cri_shim.container.exits import ContainerExits
from cri_shim.container.manager_base import (
    CONTAINER_KIND,
    EXEC_RELEASE_HOLD,
    EXEC_RELEASE_SETTLE,
    KIND_LABEL,
    METADATA_EXTENSION,
    START_ERROR_EXIT_CODE,
    UNKNOWN_EXIT_CODE,
    UNKNOWN_EXIT_REASON,
    _ns,
)
from cri_shim.containerd.runtime import TaskStatus, unpack_json
from cri_shim.logs import log_event
from cri_shim.oci.container_spec import (
    resources_from_spec,
)
from cri_shim.store.containers import Container, ContainerState
from cri_shim.store.record import RecordVersionError

log = logging.getLogger(__name__)


class ContainerRecovery(ContainerExits):
    """The restart half of the container manager."""

    async def load(self) -> None:
        """Rebuild the store from containerd; re-attach log copiers to running tasks."""
        records = await self.ops.list_containers(f'labels."{KIND_LABEL}"=={CONTAINER_KIND}')
        for record in records:
            data = unpack_json(record.extensions.get(METADATA_EXTENSION))
            if not isinstance(data, dict):
                continue
            if record.id in self.store.by_id:
                await self._resync(record.id)
                continue
            try:
                container = Container.from_record(record.id, data)
            except RecordVersionError as err:
                log_event(log, "container record skipped", level=logging.WARNING, error=err)
                continue
            spec = unpack_json(record.spec)
            if isinstance(spec, dict):
                container.runtime.spec = spec
                container.resources = resources_from_spec(spec)
            task = await self.ops.task(record.id)
            if task is not None and task.status in (TaskStatus.RUNNING, TaskStatus.UNKNOWN):
                # UNKNOWN even after retries (a shim not answering): kept running, so
                # a live process is never killed or forgotten; its exit event ends it.
                container.state = ContainerState.RUNNING
                container.pid = task.pid
                container.started_at = int(data.get("startedAt", 0)) or container.created_at
                io = self._container_io(container)
                await io.open(fresh=False)
                container.runtime.io = io
                container.runtime.exit_seen = asyncio.Event()
            elif task is not None and task.status == TaskStatus.CREATED:
                # A StartContainer the kill cut off between Tasks.Create and Tasks.Start:
                # never started, so it ends as a failed start, as a start error would.
                await self._discard_unstarted_task(record.id)
                container.state = ContainerState.EXITED
                container.exit_code = START_ERROR_EXIT_CODE
                container.reason = "StartError"
                container.message = "start interrupted by a restart of cri-shim"
                container.finished_at = time.time_ns()
                await self._persist_exit(container)
                log_event(
                    log,
                    "unstarted task discarded",
                    level=logging.WARNING,
                    container=record.id,
                    status=TaskStatus(task.status).name,
                )
            elif task is not None:
                # Exited while the shim was away: record the real exit, copying what
                # the FIFOs still hold (usually nothing: the runc shim closes them
                # once the process is gone, and the kernel drops the bytes).
                container.state = ContainerState.RUNNING
                container.started_at = int(data.get("startedAt", 0)) or container.created_at
                self.store.add(container)
                self.store.names.reserve(container.name, container.id)
                io = self._container_io(container)
                # A placeholder writer opened and dropped at once: the FIFOs have
                # no writer left, so the copier sees EOF right after the buffered bytes.
                await io.open()
                io.task_created()
                container.runtime.io = io
                await self._finish(container, task.exit_code, _ns(task.exited_at))
                continue
            elif "finishedAt" in data:
                container.state = ContainerState.EXITED
                container.started_at = int(data.get("startedAt", 0))
                container.finished_at = int(data["finishedAt"])
                container.exit_code = int(data.get("exitCode", 0))
                container.reason = data.get("reason", "")
                container.message = data.get("message", "")
            self.store.add(container)
            self.store.names.reserve(container.name, container.id)
        if self.image_volumes is not None:
            await self.image_volumes.sweep(c.id for c in self.store.by_id)
        log_event(log, "containers loaded", count=len(self.store.by_id))

    async def release_abandoned_execs(self) -> int:
        """At start-up, before any exec can run: the exec FIFOs a killed shim left.
        A runc shim may be stuck opening such a FIFO for writing (its reader died
        with us), which blocks that whole shim: every task it runs, the pod's
        pause included, then reads as UNKNOWN. Holding a read end open lets the
        open return and the exec run to its end; the ends are held (output
        discarded) for EXEC_RELEASE_HOLD seconds in the background, then the
        dirs go. (Opening and closing at once is not enough: seen here, the
        shim stayed blocked.)"""
        held = await asyncio.to_thread(_open_exec_fifos, self.env.state_dir / "containers")
        if not held:
            return 0
        for container_id, exec_id, _, _ in held:
            log_event(log, "abandoned exec released", container=container_id, exec_id=exec_id)
        task = asyncio.create_task(_drain_and_remove(held))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        # Long enough for a stuck shim to see its reader and answer again.
        await asyncio.sleep(EXEC_RELEASE_SETTLE)
        return len(held)

    async def _discard_unstarted_task(self, container_id: str) -> None:
        """Kill a created-but-never-started task, wait until it is stopped (a
        created init cannot be deleted), then delete it."""
        await self.ops.kill(container_id)
        for _ in range(50):
            task = await self.ops.task(container_id)
            if task is None or task.status not in (TaskStatus.CREATED, TaskStatus.RUNNING):
                break
            await asyncio.sleep(0.1)
        await self.ops.delete_task(container_id)

    async def _resync(self, container_id: str) -> None:
        """A container already known: exits missed while the event stream was down
        (containerd restarting) are recorded from the task's own state."""
        container = self.store.by_id.find(container_id)
        if container is None or container.state is not ContainerState.RUNNING:
            return
        task = await self.ops.task(container_id)
        if task is not None and task.status == TaskStatus.RUNNING:
            return
        if task is None:
            # Deleted behind our back: the exit code is gone with it (containerd's CRI
            # says 255, reason Unknown).
            await self._finish(container, UNKNOWN_EXIT_CODE, time.time_ns(), UNKNOWN_EXIT_REASON)
        else:
            await self._finish(container, task.exit_code, _ns(task.exited_at))
        log_event(log, "missed exit picked up by resync", container=container_id)


HeldExec = tuple[str, str, Path, list[int]]


def _open_exec_fifos(root: Path) -> list[HeldExec]:
    """(container, exec id, dir, read fds) for every exec dir under `root`."""
    try:
        containers = os.listdir(root)
    except FileNotFoundError:
        return []
    held: list[HeldExec] = []
    for container_id in containers:
        execs = root / container_id / "exec"
        try:
            names = os.listdir(execs)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            directory = execs / name
            fds: list[int] = []
            with contextlib.suppress(OSError):
                for fifo in os.listdir(directory):
                    with contextlib.suppress(OSError):
                        fds.append(os.open(directory / fifo, os.O_RDONLY | os.O_NONBLOCK))
            held.append((container_id, name, directory, fds))
    return held


async def _drain_and_remove(held: list[HeldExec]) -> None:
    deadline = time.monotonic() + EXEC_RELEASE_HOLD
    fds = [fd for *_, exec_fds in held for fd in exec_fds]
    try:
        while time.monotonic() < deadline:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.read(fd, 65536)  # non-blocking: what the abandoned exec printed
            await asyncio.sleep(0.1)
    finally:
        for fd in fds:
            os.close(fd)
        for _, _, directory, _ in held:
            await asyncio.to_thread(shutil.rmtree, directory, True)
