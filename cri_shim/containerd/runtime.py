"""Typed operations on containerd containers, tasks and snapshots.

The sandbox and container modules speak in these terms (prepare a rootfs,
create a container with a spec, start/kill/wait/delete its task) and never
build containerd request messages themselves. "Not found" on cleanup paths is
success, which keeps Stop/Remove idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal as signals
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from grpclib.const import Status

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.leases import Leases
from cri_shim.containerd.remap import RemappedRootfs, RootfsRemapper
from cri_shim.containerd.snapshots import SNAPSHOTTER, Snapshots
from cri_shim.errors import ContainerdError
from cri_shim.gen.containerd.runc import v1 as runc_v1
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.containerd.services.introspection import v1 as introspection_v1
from cri_shim.gen.containerd.services.tasks import v1 as tasks_v1
from cri_shim.gen.containerd.types import Metric, Mount
from cri_shim.gen.containerd.v1 import types as task_types
from cri_shim.gen.google.protobuf import Any as AnyMessage
from cri_shim.logs import log_event
from cri_shim.oci.userns import PodUserns
from cri_shim.wire import read_fields, repeated_field

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
LINUX_RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
RUNC_OPTIONS_TYPE_URL = "containerd.runc.v1.Options"
RUNC_RUNTIME = "io.containerd.runc.v2"

log = logging.getLogger(__name__)

TaskStatus = task_types.Status
# Tasks.Get answers that said UNKNOWN asked again (0.5 s apart) before it is believed.
UNKNOWN_STATUS_RETRIES = 3
# Long enough for any create; a lease left by a crash then expires on its own.
CREATION_LEASE_EXPIRY = datetime.timedelta(hours=1)
CREATION_LEASE_PREFIX = "cri-shim-create-"
# The runc shim of a task that just exited can close its connection mid-call.
SHIM_GONE = "ttrpc: closed"
SHIM_GONE_RETRIES = 5


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int
    exited_at: datetime.datetime | None


@dataclass(frozen=True)
class TaskInfo:
    pid: int
    status: TaskStatus
    exit_code: int
    exited_at: datetime.datetime | None


def pack_json(type_url: str, value: Any) -> AnyMessage:
    return AnyMessage(type_url=type_url, value=json.dumps(value, sort_keys=True).encode())


def unpack_json(message: AnyMessage | None) -> Any:
    if message is None or not message.value:
        return None
    return json.loads(message.value)


def _missing_mount_paths(mounts: list[Mount]) -> list[str]:
    """Paths a rootfs mount names that do not exist: the actionable part of an ENOENT."""
    paths = [m.source for m in mounts if m.type == "bind"]
    for mount in mounts:
        for option in mount.options:
            key, _, value = option.partition("=")
            if key in ("upperdir", "workdir"):
                paths.append(value)
            elif key == "lowerdir":
                paths += value.split(":")
    return [p for p in paths if p and not os.path.exists(p)]


def _missing(err: ContainerdError) -> bool:
    return err.status is Status.NOT_FOUND


class Runtime(Protocol):
    """What the container domain code asks of containerd: `RuntimeOps` below
    over gRPC, or an in-memory fake in unit tests (tests/fake_runtime.py), so
    lifecycle races run in milliseconds without a containerd."""

    def creation_lease(self) -> AbstractAsyncContextManager[str]: ...

    async def prepare_snapshot(
        self, key: str, parent: str, labels: dict[str, str] | None = None, *, lease: str = ""
    ) -> list[Mount]: ...

    async def remove_snapshot(self, key: str) -> None: ...

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
    ) -> None: ...

    async def userns_rootfs(self, parent: str, userns: PodUserns, lease: str) -> RemappedRootfs: ...

    async def get_container(self, container_id: str) -> containers_v1.Container | None: ...

    async def list_containers(self, *filters: str) -> list[containers_v1.Container]: ...

    async def update_extension(self, container_id: str, key: str, value: AnyMessage) -> None: ...

    async def delete_container(self, container_id: str) -> None: ...

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
    ) -> int: ...

    async def start_task(self, container_id: str, exec_id: str = "") -> int: ...

    async def task(self, container_id: str) -> TaskInfo | None: ...

    async def kill(
        self,
        container_id: str,
        signal: int = signals.SIGKILL,
        *,
        exec_id: str = "",
        all_processes: bool = False,
    ) -> bool: ...

    async def wait(
        self, container_id: str, exec_id: str = "", timeout: float | None = None
    ) -> ExitInfo | None: ...

    async def delete_task(self, container_id: str) -> ExitInfo | None: ...

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
    ) -> None: ...

    async def delete_process(self, container_id: str, exec_id: str) -> None: ...

    async def resize_pty(
        self, container_id: str, exec_id: str, width: int, height: int
    ) -> None: ...

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None: ...

    async def update_spec(self, container_id: str, spec: dict[str, Any]) -> None: ...

    async def update_task_resources(self, container_id: str, resources: dict[str, Any]) -> bool: ...

    async def task_metrics(self, container_ids: Iterable[str]) -> list[Metric]: ...


class WireReply:
    """A reply kept as its wire bytes (grpclib's codec calls FromString): a full
    node's Tasks.Metrics answer, decoded by betterproto2, was a fifth of the
    shim's CPU under kubelet's stats polling."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    @classmethod
    def FromString(cls, data: bytes) -> WireReply:
        return cls(data)


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_METRIC_FIELDS = frozenset({1, 2, 3})  # timestamp, id, data
_ANY_FIELDS = frozenset({1, 2})  # type_url, value
_TIMESTAMP_FIELDS = frozenset({1, 2})  # seconds, nanos


def metric_from_wire(data: bytes) -> Metric:
    """One containerd.types.Metric from its wire form; its payload stays bytes."""
    fields = read_fields(data, _METRIC_FIELDS)
    metric = Metric(id=_text(fields.get(2, b"")))
    stamp = fields.get(1)
    if isinstance(stamp, bytes):
        parts = read_fields(stamp, _TIMESTAMP_FIELDS)
        seconds, nanos = parts.get(1, 0), parts.get(2, 0)
        if not isinstance(seconds, int) or not isinstance(nanos, int):
            raise ValueError("timestamp fields are not numbers")
        if seconds >= 1 << 63:
            seconds -= 1 << 64
        # As betterproto2's Timestamp.to_datetime: exact, no float seconds.
        offset = datetime.timedelta(seconds=seconds, microseconds=nanos // 1000)
        metric.timestamp = _EPOCH + offset
    payload = fields.get(3)
    if isinstance(payload, bytes):
        parts = read_fields(payload, _ANY_FIELDS)
        value = parts.get(2, b"")
        if not isinstance(value, bytes):
            raise ValueError("Any.value is not bytes")
        metric.data = AnyMessage(type_url=_text(parts.get(1, b"")), value=value)
    return metric


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ValueError("a string field is not length-delimited")
    return value.decode()


class RuntimeOps:
    def __init__(self, client: ContainerdClient, *, systemd_cgroup: bool) -> None:
        self.client = client
        self.systemd_cgroup = systemd_cgroup
        self.leases = Leases(client)
        self.snapshots = Snapshots(client, SNAPSHOTTER)
        self._remapper: RootfsRemapper | None = None

    # leases

    @contextlib.asynccontextmanager
    async def creation_lease(self) -> AsyncIterator[str]:
        """Hold a new snapshot until a container record references it: without
        this, containerd's GC (run after any removal) may collect the snapshot
        between Prepare and Containers.Create."""
        async with self.leases.held(CREATION_LEASE_PREFIX, CREATION_LEASE_EXPIRY) as lease_id:
            yield lease_id

    async def release_stale_creation_leases(self) -> int:
        """Leases a shim killed mid-create left behind. Only safe before serving (no
        create is in flight then); their half-made snapshots go now, not in an hour."""
        stale = [i for i in await self.leases.ids() if i.startswith(CREATION_LEASE_PREFIX)]
        for lease_id in stale:
            with contextlib.suppress(ContainerdError):
                await self.leases.delete(lease_id, sync=True)
        return len(stale)

    # snapshots

    async def prepare_snapshot(
        self, key: str, parent: str, labels: dict[str, str] | None = None, *, lease: str = ""
    ) -> list[Mount]:
        """Writable snapshot on top of the image's chain; reuses one left by a retry."""
        try:
            return await self.snapshots.prepare(key, parent, labels, lease=lease)
        except ContainerdError as err:
            if err.status is not Status.ALREADY_EXISTS:
                raise
        return await self.snapshots.mounts(key)

    async def remove_snapshot(self, key: str) -> None:
        try:
            await self.snapshots.remove(key)
        except ContainerdError as err:
            if not _missing(err):
                raise

    # containers

    async def userns_rootfs(self, parent: str, userns: PodUserns, lease: str) -> RemappedRootfs:
        """Where and how to prepare a rootfs owned by the pod's mapped root."""
        if self._remapper is None:
            reply = await self.client.call(
                "Introspection.Plugins",
                self.client.introspection.plugins(
                    introspection_v1.PluginsRequest(
                        filters=[f"type==io.containerd.snapshotter.v1,id=={SNAPSHOTTER}"]
                    )
                ),
            )
            capabilities = tuple(c for p in reply.plugins for c in p.capabilities)
            self._remapper = RootfsRemapper(self.snapshots, capabilities)
        return await self._remapper.resolve(parent, userns, lease)

    def runtime_options(
        self, runc_binary: str = "", io_owner: tuple[int, int] | None = None
    ) -> containers_v1.ContainerRuntime:
        """The runc shim's options: the handler's runc (`BinaryName`) and, in a pod
        user namespace, the owner of its stdio pipes (containerd's WithUIDOwner)."""
        uid, gid = io_owner or (0, 0)
        options = runc_v1.Options(
            systemd_cgroup=self.systemd_cgroup, binary_name=runc_binary, io_uid=uid, io_gid=gid
        )
        return containers_v1.ContainerRuntime(
            name=RUNC_RUNTIME,
            options=AnyMessage(type_url=RUNC_OPTIONS_TYPE_URL, value=bytes(options)),
        )

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
        container = containers_v1.Container(
            id=container_id,
            labels=labels,
            image=image,
            runtime=self.runtime_options(runc_binary, io_owner),
            spec=pack_json(SPEC_TYPE_URL, spec),
            snapshotter=SNAPSHOTTER,
            snapshot_key=snapshot_key,
            extensions=extensions,
        )
        await self._write_container(
            "Create", containers_v1.CreateContainerRequest(container=container)
        )

    async def _write_container(
        self,
        method: str,
        request: containers_v1.CreateContainerRequest | containers_v1.UpdateContainerRequest,
    ) -> None:
        """Containers.Create/Update, whose reply repeats the whole record (its spec
        included): kept as bytes, never decoded, on every pod and container step."""
        raw: Any = WireReply
        await self.client.call(
            f"Containers.{method}",
            self.client.containers._unary_unary(
                f"/containerd.services.containers.v1.Containers/{method}", request, raw
            ),
        )

    async def get_container(self, container_id: str) -> containers_v1.Container | None:
        try:
            reply = await self.client.call(
                "Containers.Get",
                self.client.containers.get(containers_v1.GetContainerRequest(id=container_id)),
            )
        except ContainerdError as err:
            if _missing(err):
                return None
            raise
        return reply.container

    async def list_containers(self, *filters: str) -> list[containers_v1.Container]:
        reply = await self.client.call(
            "Containers.List",
            self.client.containers.list(containers_v1.ListContainersRequest(filters=list(filters))),
        )
        return list(reply.containers)

    async def update_extension(self, container_id: str, key: str, value: AnyMessage) -> None:
        from cri_shim.gen.google.protobuf import FieldMask

        container = containers_v1.Container(id=container_id, extensions={key: value})
        await self._write_container(
            "Update",
            containers_v1.UpdateContainerRequest(
                container=container, update_mask=FieldMask(paths=[f"extensions.{key}"])
            ),
        )

    async def delete_container(self, container_id: str) -> None:
        try:
            await self.client.call(
                "Containers.Delete",
                self.client.containers.delete(
                    containers_v1.DeleteContainerRequest(id=container_id)
                ),
            )
        except ContainerdError as err:
            if not _missing(err):
                raise

    # tasks

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
        try:
            return await self._create_task(
                container_id, rootfs, stdin, stdout, stderr, terminal, options
            )
        except ContainerdError as err:
            if "no such file or directory" not in err.detail:
                raise
            missing = await asyncio.to_thread(_missing_mount_paths, rootfs)
            if not missing:
                raise
            raise ContainerdError(
                err.method, err.status, f"{err.detail} (missing: {', '.join(missing)})"
            ) from err

    async def _create_task(
        self,
        container_id: str,
        rootfs: list[Mount],
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        options: AnyMessage | None = None,
    ) -> int:
        reply = await self.client.call(
            "Tasks.Create",
            self.client.tasks.create(
                tasks_v1.CreateTaskRequest(
                    container_id=container_id,
                    rootfs=rootfs,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    terminal=terminal,
                    options=options,
                )
            ),
        )
        return reply.pid

    async def start_task(self, container_id: str, exec_id: str = "") -> int:
        reply = await self.client.call(
            "Tasks.Start",
            self.client.tasks.start(
                tasks_v1.StartRequest(container_id=container_id, exec_id=exec_id)
            ),
        )
        return reply.pid

    # exec processes

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
        """Register an extra process in the container's task (started by start_task)."""
        await self.client.call(
            "Tasks.Exec",
            self.client.tasks.exec(
                tasks_v1.ExecProcessRequest(
                    container_id=container_id,
                    exec_id=exec_id,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    terminal=terminal,
                    spec=pack_json(PROCESS_TYPE_URL, process),
                )
            ),
        )

    async def delete_process(self, container_id: str, exec_id: str) -> None:
        """Forget an exec process; one already gone is success."""
        try:
            await self.client.call(
                "Tasks.DeleteProcess",
                self.client.tasks.delete_process(
                    tasks_v1.DeleteProcessRequest(container_id=container_id, exec_id=exec_id)
                ),
            )
        except ContainerdError as err:
            if not _missing(err):
                raise

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        await self.client.call(
            "Tasks.ResizePty",
            self.client.tasks.resize_pty(
                tasks_v1.ResizePtyRequest(
                    container_id=container_id, exec_id=exec_id, width=width, height=height
                )
            ),
        )

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        """The process's stdin sees EOF once what was written is read (Tasks.CloseIO)."""
        await self.client.call(
            "Tasks.CloseIO",
            self.client.tasks.close_io(
                tasks_v1.CloseIoRequest(container_id=container_id, exec_id=exec_id, stdin=True)
            ),
        )

    async def task(self, container_id: str) -> TaskInfo | None:
        """The task's state. containerd answers UNKNOWN when its runc shim does
        not reply within 2 s (a loaded node), so UNKNOWN is asked again for a
        while: read as "not running" it would mark live pods not ready."""
        attempt = 0
        while True:
            try:
                reply = await self.client.call(
                    "Tasks.Get",
                    self.client.tasks.get(tasks_v1.GetRequest(container_id=container_id)),
                )
            except ContainerdError as err:
                if _missing(err):
                    return None
                raise
            process = reply.process
            if process is None:
                return None
            attempt += 1
            if process.status != TaskStatus.UNKNOWN or attempt == UNKNOWN_STATUS_RETRIES:
                break
            log_event(log, "task status unknown; asking again", container=container_id)
            await asyncio.sleep(0.5)
        return TaskInfo(process.pid, process.status, process.exit_status, process.exited_at)

    async def kill(
        self,
        container_id: str,
        signal: int = signals.SIGKILL,
        *,
        exec_id: str = "",
        all_processes: bool = False,
    ) -> bool:
        """Send a signal; False when there is no such task/process any more."""
        try:
            await self.client.call(
                "Tasks.Kill",
                self.client.tasks.kill(
                    tasks_v1.KillRequest(
                        container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes
                    )
                ),
            )
        except ContainerdError as err:
            if _missing(err) or "process already finished" in err.detail or SHIM_GONE in err.detail:
                return False
            raise
        return True

    async def wait(
        self, container_id: str, exec_id: str = "", timeout: float | None = None
    ) -> ExitInfo | None:
        """Block until the process exits; None if it does not exist (any more)."""
        for attempt in range(SHIM_GONE_RETRIES):
            try:
                reply = await self.client.call(
                    "Tasks.Wait",
                    self.client.tasks.wait(
                        tasks_v1.WaitRequest(container_id=container_id, exec_id=exec_id),
                        timeout=timeout,
                    ),
                )
            except ContainerdError as err:
                if _missing(err):
                    return None
                if SHIM_GONE in err.detail and attempt + 1 < SHIM_GONE_RETRIES:
                    # The task's shim exited under the call; ask again for its exit.
                    await asyncio.sleep(0.2)
                    continue
                if SHIM_GONE in err.detail:
                    return None
                raise
            return ExitInfo(reply.exit_status, reply.exited_at)
        return None

    async def delete_task(self, container_id: str) -> ExitInfo | None:
        """Delete the task; a shim that is exiting under us ("ttrpc: closed") is
        retried briefly, as containerd cleans it up on its own moments later."""
        for attempt in range(SHIM_GONE_RETRIES):
            try:
                reply = await self.client.call(
                    "Tasks.Delete",
                    self.client.tasks.delete(tasks_v1.DeleteTaskRequest(container_id=container_id)),
                )
            except ContainerdError as err:
                if _missing(err):
                    return None
                if SHIM_GONE in err.detail and attempt + 1 < SHIM_GONE_RETRIES:
                    await asyncio.sleep(0.2)
                    continue
                raise
            return ExitInfo(reply.exit_status, reply.exited_at)
        return None

    # resources, metrics, usage

    async def update_spec(self, container_id: str, spec: dict[str, Any]) -> None:
        """Replace the container's stored OCI spec (its source of truth for limits)."""
        from cri_shim.gen.google.protobuf import FieldMask

        container = containers_v1.Container(id=container_id, spec=pack_json(SPEC_TYPE_URL, spec))
        await self._write_container(
            "Update",
            containers_v1.UpdateContainerRequest(
                container=container, update_mask=FieldMask(paths=["spec"])
            ),
        )

    async def update_task_resources(self, container_id: str, resources: dict[str, Any]) -> bool:
        """Apply OCI linux.resources to a running task; False when it is gone."""
        try:
            await self.client.call(
                "Tasks.Update",
                self.client.tasks.update(
                    tasks_v1.UpdateTaskRequest(
                        container_id=container_id,
                        resources=pack_json(LINUX_RESOURCES_TYPE_URL, resources),
                    )
                ),
            )
        except ContainerdError as err:
            if _missing(err) or "process already finished" in err.detail:
                return False
            raise
        return True

    async def task_metrics(self, container_ids: Iterable[str]) -> list[Metric]:
        """One cgroup sample per running task of these containers, in one call
        (containerd ORs the filters); no ids means no call."""
        filters = [f"id=={container_id}" for container_id in container_ids]
        if not filters:
            return []
        # The generated stub's own call, with a reply type that keeps the bytes.
        raw: Any = WireReply
        reply: WireReply = await self.client.call(
            "Tasks.Metrics",
            self.client.tasks._unary_unary(
                "/containerd.services.tasks.v1.Tasks/Metrics",
                tasks_v1.MetricsRequest(filters=filters),
                raw,
            ),
        )
        try:
            return [metric_from_wire(item) for item in repeated_field(reply.data, 1)]
        except ValueError:  # decoded whole, which says what is wrong with it
            return list(tasks_v1.MetricsResponse.parse(reply.data).metrics)
