"""Creating, starting, stopping and removing containers against containerd.

A CRI container is a containerd container (spec, labels, one JSON extension
with what the CRI view needs) on a snapshot of its image, plus a task while it
runs. Task exits arrive from containerd's event stream and update the store
at once; the exit code and time are kept after the task is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import logging
import os
import shutil
import signal as signals
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cri_shim.concurrency import run_all
from cri_shim.container.cgroups import oom_kills
from cri_shim.container.events import ContainerEventBus
from cri_shim.container.image_volumes import ImageVolumes
from cri_shim.container.io import ContainerIO
from cri_shim.container.rootfs import read_image_file
from cri_shim.containerd.events import TaskExit
from cri_shim.containerd.runtime import RuntimeOps, TaskStatus, pack_json, unpack_json
from cri_shim.errors import already_exists, failed_precondition, invalid_argument, not_found
from cri_shim.gen.containerd.types import Mount
from cri_shim.gen.runtime import v1 as cri
from cri_shim.images.store import ImageStore
from cri_shim.logs import log_event
from cri_shim.oci.container_spec import (
    ContainerSpecInput,
    SandboxView,
    apply_linux_resources,
    build_container_spec,
    ensure_mount_source,
    resources_from_spec,
)
from cri_shim.sandbox.files import SandboxDirs
from cri_shim.sandbox.lifecycle import runtime_config
from cri_shim.store.containers import Container, ContainerState, ContainerStore, container_name
from cri_shim.store.index import new_id
from cri_shim.store.sandboxes import Sandbox, SandboxState, SandboxStore

log = logging.getLogger(__name__)

KIND_LABEL = "io.cri-shim.kind"
CONTAINER_KIND = "container"
SANDBOX_LABEL = "io.cri-shim.sandbox-id"
METADATA_EXTENSION = "io.cri-shim.container.metadata"
METADATA_TYPE_URL = "cri-shim.io/container-metadata/v1"
# How long output may keep arriving after the process exited (children holding stdout).
DRAIN_SECONDS = 2.0
START_ERROR_EXIT_CODE = 128
# containerd's CRI (unknownExitCode/unknownExitReason): a running container whose task
# is gone when containerd comes back (containerd 2.x deletes a task whose process
# exited while it was down, so its real exit code is lost).
UNKNOWN_EXIT_CODE = 255
UNKNOWN_EXIT_REASON = "Unknown"
# Abandoned exec FIFOs found at start-up: read ends held this long, start-up
# waits the first part of it (see release_abandoned_execs).
EXEC_RELEASE_HOLD = 5.0
EXEC_RELEASE_SETTLE = 0.3
OOM_KILLED = "OOMKilled"


@dataclass(frozen=True)
class ContainerEnvironment:
    state_dir: Path
    sandbox_dirs_root: Path
    cgroup_driver: str
    oom_score_adj_floor: int | None
    seccomp_localhost_root: Path | None
    apparmor_available: bool
    recursive_readonly_supported: bool
    # Allow-lists of pod / container annotations for the spec (containerd's per handler).
    pod_annotations: tuple[str, ...] = ()
    container_annotations: tuple[str, ...] = ()


def _ns(moment: datetime.datetime | None) -> int:
    if moment is None:
        return time.time_ns()
    return int(moment.timestamp() * 1_000_000_000)


def log_path_for(sandbox: Sandbox, relative: str) -> str:
    """The CRI log file: the pod's log directory joined with the container's log_path,
    refusing any path that would escape that directory."""
    if not relative:
        return ""
    directory = sandbox.config.log_directory
    if not directory:
        raise invalid_argument("log_path is set but the pod sandbox has no log_directory")
    if os.path.isabs(relative):
        raise invalid_argument(f"log_path {relative!r} must be relative to the pod's log directory")
    joined = os.path.normpath(os.path.join(directory, relative))
    if os.path.commonpath([joined, os.path.normpath(directory)]) != os.path.normpath(directory):
        raise invalid_argument(f"log_path {relative!r} escapes the pod's log directory")
    return joined


def _signal_number(name: str) -> int:
    name = name.upper()
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signals.Signals[name])
    except KeyError as err:
        raise invalid_argument(f"unknown stop signal {name!r}") from err


def stop_signal(config: cri.ContainerConfig, image_config: dict[str, Any]) -> str:
    if config.stop_signal:
        return cri.Signal(config.stop_signal).name
    return str(image_config.get("StopSignal") or "SIGTERM")


class ContainerManager:
    def __init__(
        self,
        store: ContainerStore,
        sandboxes: SandboxStore,
        images: ImageStore,
        ops: RuntimeOps,
        events: ContainerEventBus,
        environment: ContainerEnvironment,
    ) -> None:
        self.store = store
        self.sandboxes = sandboxes
        self.images = images
        self.ops = ops
        self.events = events
        self.env = environment
        self._io: dict[str, ContainerIO] = {}
        self._specs: dict[str, dict[str, Any]] = {}
        self._exit_seen: dict[str, asyncio.Event] = {}
        # Containers whose exit is being recorded (still RUNNING until their log is complete).
        self._exiting: set[str] = set()
        self._early_exits: dict[str, TaskExit] = {}
        self._releases: set[asyncio.Task[None]] = set()
        # Set once an exit is fully recorded (task deleted, output drained, persisted).
        self._finished: dict[str, asyncio.Event] = {}
        # Containers whose task an exit record already deleted: Remove skips that call.
        self._task_deleted: set[str] = set()
        # Rootfs mounts from CreateContainer's Prepare, so StartContainer needs no
        # second Prepare/Mounts round-trip (after a restart it asks containerd).
        self._mounts: dict[str, list[Mount]] = {}
        self.status_provider: Callable[[str], Awaitable[cri.PodSandboxStatus | None]] | None = None
        # Creates in flight by name: a kubelet retry joins the first call's work.
        self._creating: dict[str, asyncio.Task[str]] = {}
        self.image_volumes = ImageVolumes(ops.client, images, environment.state_dir)

    def io_dir(self, container_id: str) -> Path:
        return self.env.state_dir / "containers" / container_id

    def container_io(self, container_id: str) -> ContainerIO | None:
        """The stdio of a running container (attach joins it); None when it has none."""
        return self._io.get(container_id)

    # persistence

    def _metadata(self, container: Container) -> dict[str, Any]:
        return {
            "id": container.id,
            "name": container.name,
            "sandboxId": container.sandbox_id,
            "config": container.config.to_dict(),
            "imageRef": container.image_ref,
            "imageId": container.image_id,
            "imageRepoRef": container.image_repo_ref,
            "createdAt": container.created_at,
            "logPath": container.log_path,
            "stopSignal": container.stop_signal,
            "user": [*container.user[:2], list(container.user[2])] if container.user else None,
        }

    async def _persist_exit(self, container: Container) -> None:
        data = self._metadata(container)
        data.update(
            startedAt=container.started_at,
            finishedAt=container.finished_at,
            exitCode=container.exit_code,
            reason=container.reason,
            message=container.message,
        )
        try:
            await self.ops.update_extension(
                container.id, METADATA_EXTENSION, pack_json(METADATA_TYPE_URL, data)
            )
        except Exception as err:  # the record in memory is still right
            log_event(
                log,
                "could not persist exit",
                level=logging.WARNING,
                container=container.id,
                error=err,
            )

    def _publish(self, container: Container, kind: cri.ContainerEventType) -> None:
        self.events.publish_for(container.id, container.sandbox_id, kind)

    # create

    def in_flight(self) -> list[asyncio.Task[str]]:
        """Creates still working (their callers may be gone): shutdown awaits them."""
        return list(self._creating.values())

    async def create(self, sandbox: Sandbox, config: cri.ContainerConfig) -> str:
        """Shielded: a caller that gives up (kubelet's timeout) does not undo the
        work, which finishes and is handed to the retry with the same name."""
        name = container_name(sandbox.name, config.metadata or cri.ContainerMetadata())
        pending = self._creating.get(name)
        if pending is None:
            pending = asyncio.create_task(self._create_once(sandbox, config))
            self._creating[name] = pending
            pending.add_done_callback(lambda done: _forget_create(self._creating, name, done))
        else:
            log_event(log, "retried create joins the one in flight", name=name)
        return await asyncio.shield(pending)

    async def _create_once(self, sandbox: Sandbox, config: cri.ContainerConfig) -> str:
        metadata = config.metadata or cri.ContainerMetadata()
        if sandbox.state is not SandboxState.READY:
            raise failed_precondition(f"pod sandbox {sandbox.id} is not ready")
        image_spec = config.image or cri.ImageSpec()
        image = self.images.get(image_spec.image)
        if image is None:
            raise not_found(f"image {image_spec.image!r} not found; pull it first")
        name = container_name(sandbox.name, metadata)
        owner = self.store.names.owner(name)
        if owner is not None:
            existing = self.store.by_id.find(owner)
            if existing is not None and existing.state is ContainerState.CREATED:
                log_event(log, "container reused for retried create", container=owner)
                return owner
            raise already_exists(f"container name {name!r} is reserved for {owner}")
        log_path = log_path_for(sandbox, config.log_path)
        container = Container(
            id=new_id(),
            name=name,
            sandbox_id=sandbox.id,
            config=config,
            image_ref=image_spec.image,
            image_id=image.id,
            image_repo_ref=(image.repo_digests or [image.id])[0],
            created_at=time.time_ns(),
            log_path=log_path,
            stop_signal=stop_signal(config, runtime_config(image.config)),
        )
        self.store.names.reserve(name, container.id)
        try:
            await self._create_in_containerd(
                container, sandbox, runtime_config(image.config), image.chain_id
            )
        except BaseException:
            self.store.names.release(name, container.id)
            await asyncio.shield(self._forget(container))
            raise
        self.store.add(container)
        self._publish(container, cri.ContainerEventType.CONTAINER_CREATED_EVENT)
        log_event(log, "container created", container=container.id, pod=sandbox.id, name=name)
        return container.id

    async def _create_in_containerd(
        self, container: Container, sandbox: Sandbox, image_config: dict[str, Any], chain_id: str
    ) -> None:
        async with self.ops.creation_lease() as lease:
            await self._prepare_and_create(container, sandbox, image_config, chain_id, lease)

    async def _prepare_and_create(
        self,
        container: Container,
        sandbox: Sandbox,
        image_config: dict[str, Any],
        chain_id: str,
        lease: str,
    ) -> None:
        mounts = await self.ops.prepare_snapshot(container.id, chain_id, lease=lease)
        await self.image_volumes.attach(container.id, container.config)
        passwd = await read_image_file(mounts, "/etc/passwd")
        group = await read_image_file(mounts, "/etc/group")
        dirs = SandboxDirs(self.env.sandbox_dirs_root, sandbox.id)
        inputs = ContainerSpecInput(
            container_id=container.id,
            config=container.config,
            sandbox=SandboxView(
                sandbox_id=sandbox.id,
                pid=sandbox.pid,
                config=sandbox.config,
                hostname_path=str(dirs.hostname),
                hosts_path=str(dirs.hosts),
                resolv_conf_path=str(dirs.resolv_conf),
                shm_path=str(dirs.shm),
            ),
            image_config=image_config,
            image_name=container.image_ref,
            passwd=passwd,
            group=group,
            cgroup_driver=self.env.cgroup_driver,
            oom_score_adj_floor=self.env.oom_score_adj_floor,
            seccomp_localhost_root=self.env.seccomp_localhost_root,
            apparmor_available=self.env.apparmor_available,
            recursive_readonly_supported=self.env.recursive_readonly_supported,
            # Missing host paths are created, symlinks resolved, as containerd does.
            resolve_mount_source=ensure_mount_source,
            pod_annotations=self.env.pod_annotations,
            container_annotations=self.env.container_annotations,
        )
        # Building stats devices and may create mount sources: off the event loop.
        spec = await asyncio.to_thread(build_container_spec, inputs)
        user = spec["process"]["user"]
        container.user = (
            int(user.get("uid", 0)),
            int(user.get("gid", 0)),
            tuple(int(g) for g in user.get("additionalGids", [])),
        )
        container.resources = resources_from_spec(spec)
        labels = {
            **dict(container.config.labels),
            KIND_LABEL: CONTAINER_KIND,
            SANDBOX_LABEL: sandbox.id,
        }
        await self.ops.create_container(
            container.id,
            image=container.image_ref,
            spec=spec,
            labels=labels,
            extensions={
                METADATA_EXTENSION: pack_json(METADATA_TYPE_URL, self._metadata(container))
            },
            snapshot_key=container.id,
            lease=lease,
        )
        self._specs[container.id] = spec
        self._mounts[container.id] = mounts

    async def _forget(self, container: Container) -> None:
        await self.ops.delete_container(container.id)
        await self.ops.remove_snapshot(container.id)
        await self.image_volumes.release(container.id)

    # start

    async def start(self, container: Container) -> None:
        async with container.lock:
            if container.state is not ContainerState.CREATED:
                raise failed_precondition(
                    f"container {container.id} is {container.state.value}, not created"
                )
            sandbox = self.sandboxes.by_id.find(container.sandbox_id)
            if sandbox is None or sandbox.state is not SandboxState.READY:
                raise failed_precondition(f"pod sandbox {container.sandbox_id} is not ready")
            io = self._container_io(container)
            self._io[container.id] = io
            self._exit_seen[container.id] = asyncio.Event()
            try:
                await io.open()
                mounts = self._mounts.pop(container.id, None) or await self.ops.prepare_snapshot(
                    container.id, ""
                )
                stdin, stdout, stderr = io.stdio()
                await self.ops.create_task(
                    container.id,
                    mounts,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    terminal=container.config.tty,
                )
                io.task_created()
                # Taken before the start call: the exit time containerd reports for a
                # process that ends at once must never precede it.
                started_at = time.time_ns()
                container.pid = await self.ops.start_task(container.id)
            except BaseException as err:
                self._early_exits.pop(container.id, None)
                await asyncio.shield(self._start_failed(container, io, err))
                raise
            container.state = ContainerState.RUNNING
            container.started_at = started_at
        self._publish(container, cri.ContainerEventType.CONTAINER_STARTED_EVENT)
        log_event(log, "container started", container=container.id, pid=container.pid)
        early = self._early_exits.pop(container.id, None)
        if early is not None:
            await self._finish(container, early.exit_code, _ns(early.exited_at))

    async def _start_failed(
        self, container: Container, io: ContainerIO, err: BaseException
    ) -> None:
        await self.ops.kill(container.id)
        await self.ops.delete_task(container.id)
        await io.close()
        self._io.pop(container.id, None)
        container.state = ContainerState.EXITED
        container.exit_code = START_ERROR_EXIT_CODE
        container.reason = "StartError"
        container.message = str(err)
        container.finished_at = time.time_ns()
        await self._persist_exit(container)

    # exit

    async def on_task_exit(self, event: TaskExit) -> None:
        container = self.store.by_id.find(event.container_id) if event.is_init else None
        if container is None or container.id != event.container_id:
            return
        if container.state is ContainerState.CREATED and container.id in self._io:
            # Exited before StartContainer returned; finished once the start completes.
            self._early_exits[container.id] = event
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
        if container.state is not ContainerState.RUNNING or container.id in self._exiting:
            return
        finished = self._finished.setdefault(container.id, asyncio.Event())
        if not container.oom_killed and exit_code != 0:
            container.oom_killed = await self._cgroup_oom_killed(container)
            if container.oom_killed:
                log_event(log, "OOM kill found in the cgroup", container=container.id)
        if container.state is not ContainerState.RUNNING or container.id in self._exiting:
            return  # finished (or being finished) by a concurrent caller meanwhile
        self._exiting.add(container.id)
        try:
            await self._record_exit(container, exit_code, finished_at, reason)
        finally:
            self._exiting.discard(container.id)
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
        seen = self._exit_seen.get(container.id)
        if seen is not None:
            seen.set()
        try:
            # Recorded before the task goes: a shim killed in between still finds the
            # exit code (in the record, or in the stopped task) when it starts again.
            await self._persist_exit(container)
            await self.ops.delete_task(container.id)
            self._task_deleted.add(container.id)
            io = self._io.pop(container.id, None)
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

    # stop / remove

    async def stop(self, container: Container, timeout: int) -> None:
        """Stop signal, then SIGKILL after `timeout` seconds. Returns once the exit is
        fully recorded (task deleted, as containerd's StopContainer does), also when
        the event stream got there first: RemoveContainer then finds nothing to wait on."""
        await self._stop(container, timeout)
        finished = self._finished.get(container.id)
        if finished is not None:
            await finished.wait()

    async def _stop(self, container: Container, timeout: int) -> None:
        if container.state is not ContainerState.RUNNING:
            return
        seen = self._exit_seen.setdefault(container.id, asyncio.Event())
        if timeout > 0:
            await self.ops.kill(container.id, _signal_number(container.stop_signal))
            try:
                await asyncio.wait_for(seen.wait(), timeout)
            except TimeoutError:
                log_event(
                    log,
                    "stop signal ignored; killing",
                    container=container.id,
                    signal=container.stop_signal,
                    timeout_s=timeout,
                )
        if container.state is ContainerState.RUNNING:
            # Wait is asked first, so its round-trip overlaps the kill's (and no exit
            # can fall between the two), as containerd's own client does.
            waiting = asyncio.ensure_future(self.ops.wait(container.id))
            try:
                await self.ops.kill(container.id, signals.SIGKILL, all_processes=True)
            except BaseException:
                waiting.cancel()
                raise
            exit_info = await waiting
            if exit_info is not None:
                await self._finish(container, exit_info.exit_code, _ns(exit_info.exited_at))
            elif container.state is ContainerState.RUNNING:
                await self._finish(container, 137, time.time_ns())

    async def remove(self, container: Container) -> None:
        await self.stop(container, 0)
        async with container.lock:
            if container.id not in self._task_deleted:
                await self.ops.delete_task(container.id)
            io = self._io.pop(container.id, None)
            if io is not None:
                await io.close()
            await run_all(
                self._forget(container), asyncio.to_thread(_rmtree, self.io_dir(container.id))
            )
            self.store.remove(container)
            self._specs.pop(container.id, None)
            self._exit_seen.pop(container.id, None)
            self._finished.pop(container.id, None)
            self._task_deleted.discard(container.id)
            self._mounts.pop(container.id, None)
        self._publish(container, cri.ContainerEventType.CONTAINER_DELETED_EVENT)
        log_event(log, "container removed", container=container.id)

    async def stop_pod(self, sandbox: Sandbox) -> None:
        await asyncio.gather(*(self.stop(c, 0) for c in self.store.in_sandbox(sandbox.id)))

    async def remove_pod(self, sandbox: Sandbox) -> None:
        await run_all(*(self.remove(c) for c in self.store.in_sandbox(sandbox.id)))

    # logs

    async def reopen_log(self, container: Container) -> None:
        io = self._io.get(container.id)
        if container.state is not ContainerState.RUNNING or io is None:
            raise failed_precondition(f"container {container.id} is not running")
        await io.reopen_log()

    # resources

    async def update_resources(
        self, container: Container, resources: cri.LinuxContainerResources
    ) -> None:
        """containerd's order: the stored spec first (the source of truth, and all a
        container that has not started needs), then the running task's cgroup;
        a refused task update puts the old spec back."""
        async with container.lock:
            old = await self.load_spec(container.id)
            new = copy.deepcopy(old)
            new.setdefault("linux", {})
            # May look at the cgroup tree (is swap limitable?): off the event loop.
            await asyncio.to_thread(apply_linux_resources, new, resources)
            await self.ops.update_spec(container.id, new)
            self._specs[container.id] = new
            try:
                if container.state is ContainerState.RUNNING:
                    applied = await self.ops.update_task_resources(
                        container.id, new["linux"].get("resources", {})
                    )
                    if not applied:
                        log_event(log, "task gone before its update", container=container.id)
            except BaseException:
                self._specs[container.id] = old
                await asyncio.shield(self.ops.update_spec(container.id, old))
                raise
            container.resources = resources_from_spec(new)
        log_event(
            log,
            "container resources updated",
            container=container.id,
            memory_limit=container.resources.memory_limit_in_bytes or None,
            cpu_quota=container.resources.cpu_quota or None,
        )

    def spec(self, container_id: str) -> dict[str, Any] | None:
        return self._specs.get(container_id)

    async def load_spec(self, container_id: str) -> dict[str, Any]:
        cached = self._specs.get(container_id)
        if cached is not None:
            return cached
        record = await self.ops.get_container(container_id)
        if record is None:
            raise not_found(f"container {container_id} not found in containerd")
        spec = unpack_json(record.spec)
        if not isinstance(spec, dict):
            raise failed_precondition(f"container {container_id} has no runtime spec")
        self._specs[container_id] = spec
        return spec

    # recovery

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
            user = data.get("user")
            container = Container(
                id=record.id,
                name=data["name"],
                sandbox_id=data["sandboxId"],
                config=cri.ContainerConfig.from_dict(data["config"]),
                image_ref=data.get("imageRef", ""),
                image_id=data.get("imageId", ""),
                image_repo_ref=data.get("imageRepoRef", ""),
                created_at=int(data.get("createdAt", 0)),
                log_path=data.get("logPath", ""),
                stop_signal=data.get("stopSignal", "SIGTERM"),
                user=(int(user[0]), int(user[1]), tuple(user[2])) if user else None,
            )
            spec = unpack_json(record.spec)
            if isinstance(spec, dict):
                self._specs[record.id] = spec
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
                self._io[record.id] = io
                self._exit_seen[record.id] = asyncio.Event()
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
                self._io[record.id] = io
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

    def _container_io(self, container: Container) -> ContainerIO:
        return ContainerIO(
            self.io_dir(container.id) / "io",
            container.id,
            stdin=container.config.stdin,
            tty=container.config.tty,
            log_path=container.log_path,
            log_relative=container.config.log_path,
        )

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


def _forget_create(
    creating: dict[str, asyncio.Task[str]], name: str, done: asyncio.Task[str]
) -> None:
    if creating.get(name) is done:
        del creating[name]
    if not done.cancelled():
        done.exception()  # retrieved here: the caller that would have may be gone


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


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
