"""An in-memory `Runtime` (cri_shim.containerd.runtime.Runtime) for unit tests.

It keeps containers, snapshots, tasks and exec processes in dicts and plays
containerd's part in the races the lifecycle code must survive: a task exit
is published as an event (to `on_exit`, as the event stream delivers it)
separately from Tasks.Wait, and any call can be held at a gate so a test can
run another call in the middle of it. No containerd, no runc: milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import signal as signals
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from grpclib.const import Status

from cri_shim.containerd.events import TaskExit
from cri_shim.containerd.remap import RemappedRootfs, remap_labels
from cri_shim.containerd.runtime import SPEC_TYPE_URL, ExitInfo, TaskInfo, TaskStatus, pack_json
from cri_shim.errors import ContainerdError
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.containerd.types import Metric, Mount
from cri_shim.gen.google.protobuf import Any as AnyMessage
from cri_shim.oci.userns import PodUserns


@dataclass
class FakeProcess:
    pid: int
    status: TaskStatus = TaskStatus.CREATED
    exit_code: int = 0
    exited_at: datetime.datetime | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class FakeRuntime:
    """containerd as dicts; see the module docstring."""

    def __init__(self) -> None:
        self.containers: dict[str, containers_v1.Container] = {}
        self.snapshots: set[str] = set()
        self.tasks: dict[str, FakeProcess] = {}
        self.execs: dict[tuple[str, str], FakeProcess] = {}
        self.leases: set[str] = set()
        # The event stream: gets every task exit, as containerd publishes it.
        self.on_exit: Callable[[TaskExit], Awaitable[None]] | None = None
        # A process whose start makes it exit at once with this code (before Start returns).
        self.exit_on_start: int | None = None
        self._gates: dict[str, asyncio.Event] = {}
        self._entered: dict[str, asyncio.Event] = {}
        self._deliveries: set[asyncio.Task[None]] = set()
        self._next_pid = 1000
        self.calls: list[str] = []

    # test controls

    def hold(self, method: str) -> None:
        """The next calls of `method` wait at its gate until `release(method)`."""
        self._gates[method] = asyncio.Event()
        self._entered[method] = asyncio.Event()

    async def entered(self, method: str) -> None:
        """Returns once a call of `method` is waiting at its gate."""
        await self._entered[method].wait()

    def release(self, method: str) -> None:
        self._gates.pop(method).set()

    async def events_delivered(self) -> None:
        """Every exit event published so far has been handled."""
        while self._deliveries:
            await asyncio.gather(*list(self._deliveries))

    async def _call(self, method: str) -> None:
        self.calls.append(method)
        gate = self._gates.get(method)
        if gate is not None:
            self._entered[method].set()
            await gate.wait()

    def _exit(self, container_id: str, exec_id: str, process: FakeProcess, code: int) -> None:
        if process.status is TaskStatus.STOPPED:
            return
        process.status = TaskStatus.STOPPED
        process.exit_code = code
        process.exited_at = datetime.datetime.now(datetime.UTC)
        process.exited.set()
        if self.on_exit is not None:
            event = TaskExit(
                container_id, exec_id or container_id, process.pid, code, process.exited_at
            )
            delivery = asyncio.ensure_future(self.on_exit(event))
            self._deliveries.add(delivery)
            delivery.add_done_callback(self._deliveries.discard)

    def _process(self, container_id: str, exec_id: str) -> FakeProcess | None:
        if exec_id:
            return self.execs.get((container_id, exec_id))
        return self.tasks.get(container_id)

    # the Runtime protocol

    @contextlib.asynccontextmanager
    async def _lease(self) -> AsyncIterator[str]:
        lease = f"lease-{len(self.leases)}"
        self.leases.add(lease)
        try:
            yield lease
        finally:
            self.leases.discard(lease)

    def creation_lease(self) -> contextlib.AbstractAsyncContextManager[str]:
        return self._lease()

    async def prepare_snapshot(
        self, key: str, parent: str, labels: dict[str, str] | None = None, *, lease: str = ""
    ) -> list[Mount]:
        await self._call("prepare_snapshot")
        self.snapshots.add(key)
        return []

    async def userns_rootfs(self, parent: str, userns: PodUserns, lease: str) -> RemappedRootfs:
        await self._call("userns_rootfs")
        return RemappedRootfs(parent, remap_labels(userns))

    async def remove_snapshot(self, key: str) -> None:
        await self._call("remove_snapshot")
        self.snapshots.discard(key)

    async def create_container(
        self,
        container_id: str,
        *,
        image: str,
        spec: dict[str, Any],
        labels: dict[str, str],
        extensions: dict[str, AnyMessage],
        snapshot_key: str,
        lease: str = "",
        runc_binary: str = "",
        io_owner: tuple[int, int] | None = None,
    ) -> None:
        await self._call("create_container")
        self.containers[container_id] = containers_v1.Container(
            id=container_id,
            image=image,
            labels=dict(labels),
            extensions=dict(extensions),
            spec=pack_json(SPEC_TYPE_URL, spec),
            snapshot_key=snapshot_key,
        )

    async def get_container(self, container_id: str) -> containers_v1.Container | None:
        return self.containers.get(container_id)

    async def list_containers(self, *filters: str) -> list[containers_v1.Container]:
        return list(self.containers.values())

    async def update_extension(self, container_id: str, key: str, value: AnyMessage) -> None:
        await self._call("update_extension")
        record = self.containers.get(container_id)
        if record is not None:
            record.extensions[key] = value

    async def delete_container(self, container_id: str) -> None:
        await self._call("delete_container")
        self.containers.pop(container_id, None)

    async def create_task(
        self,
        container_id: str,
        rootfs: list[Mount],
        *,
        stdin: str = "",
        stdout: str = "",
        stderr: str = "",
        terminal: bool = False,
        options: AnyMessage | None = None,
    ) -> int:
        await self._call("create_task")
        self._next_pid += 1
        self.tasks[container_id] = FakeProcess(self._next_pid)
        return self._next_pid

    async def start_task(self, container_id: str, exec_id: str = "") -> int:
        await self._call("start_task")
        process = self._process(container_id, exec_id)
        if process is None:
            raise RuntimeError(f"no process {container_id}/{exec_id}")
        process.status = TaskStatus.RUNNING
        if self.exit_on_start is not None:
            self._exit(container_id, exec_id, process, self.exit_on_start)
            await asyncio.sleep(0)  # the event goes out before Start's answer
            await asyncio.sleep(0)
        return process.pid

    async def task(self, container_id: str) -> TaskInfo | None:
        process = self.tasks.get(container_id)
        if process is None:
            return None
        return TaskInfo(process.pid, process.status, process.exit_code, process.exited_at)

    async def kill(
        self,
        container_id: str,
        signal: int = signals.SIGKILL,
        *,
        exec_id: str = "",
        all_processes: bool = False,
    ) -> bool:
        await self._call("kill")
        process = self._process(container_id, exec_id)
        if process is None or process.status is TaskStatus.STOPPED:
            return False
        self._exit(container_id, exec_id, process, 128 + signal)
        return True

    async def wait(
        self, container_id: str, exec_id: str = "", timeout: float | None = None
    ) -> ExitInfo | None:
        process = self._process(container_id, exec_id)
        if process is None:
            return None
        await asyncio.wait_for(process.exited.wait(), timeout)
        return ExitInfo(process.exit_code, process.exited_at)

    async def delete_task(self, container_id: str) -> ExitInfo | None:
        await self._call("delete_task")
        process = self.tasks.get(container_id)
        if process is None:
            return None
        if process.status is TaskStatus.RUNNING:  # containerd refuses, as here
            raise ContainerdError(
                "Tasks.Delete", Status.FAILED_PRECONDITION, f"task {container_id} is running"
            )
        del self.tasks[container_id]
        return ExitInfo(process.exit_code, process.exited_at)

    async def exec_process(
        self,
        container_id: str,
        exec_id: str,
        process: dict[str, Any],
        *,
        stdin: str = "",
        stdout: str = "",
        stderr: str = "",
        terminal: bool = False,
    ) -> None:
        await self._call("exec_process")
        self._next_pid += 1
        self.execs[(container_id, exec_id)] = FakeProcess(self._next_pid)

    async def delete_process(self, container_id: str, exec_id: str) -> None:
        self.execs.pop((container_id, exec_id), None)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        return None

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        return None

    async def update_spec(self, container_id: str, spec: dict[str, Any]) -> None:
        record = self.containers.get(container_id)
        if record is not None:
            record.spec = pack_json(SPEC_TYPE_URL, spec)

    async def update_task_resources(self, container_id: str, resources: dict[str, Any]) -> bool:
        return container_id in self.tasks

    async def task_metrics(self, container_ids: Iterable[str]) -> list[Metric]:
        return []
