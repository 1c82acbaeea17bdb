"""Creating, starting, stopping and removing containers against containerd.

A CRI container is a containerd container (spec, labels, one JSON extension
with what the CRI view needs) on a snapshot of its image, plus a task while it
runs. Task exits arrive from containerd's event stream and update the store
at once; the exit code and time are kept after the task is deleted.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import shutil
import signal as signals
import time
from pathlib import Path
from typing import Any

from cri_shim.concurrency import run_all
from cri_shim.container.io import ContainerIO
from cri_shim.container.manager_base import (
    CONTAINER_KIND,
    KIND_LABEL,
    METADATA_EXTENSION,
    METADATA_TYPE_URL,
    SANDBOX_LABEL,
    START_ERROR_EXIT_CODE,
    ContainerEnvironment,
    _ns,
)
from cri_shim.container.recovery import ContainerRecovery
from cri_shim.containerd.runtime import pack_json
from cri_shim.errors import already_exists, failed_precondition, invalid_argument, not_found
from cri_shim.gen.runtime import v1 as cri
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
from cri_shim.store.containers import Container, ContainerState, container_name
from cri_shim.store.index import new_id
from cri_shim.store.sandboxes import Sandbox, SandboxState

__all__ = [
    "CONTAINER_KIND",
    "KIND_LABEL",
    "METADATA_EXTENSION",
    "METADATA_TYPE_URL",
    "SANDBOX_LABEL",
    "ContainerEnvironment",
    "ContainerManager",
    "log_path_for",
    "stop_signal",
]

log = logging.getLogger(__name__)


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


class ContainerManager(ContainerRecovery):
    """CreateContainer, StartContainer, StopContainer, RemoveContainer and updates;
    exits and recovery come from the parts it is built on."""

    # create

    def in_flight(self) -> list[asyncio.Task[str]]:
        """Creates still working (their callers may be gone): shutdown awaits them."""
        return self._creating.running()

    async def create(self, sandbox: Sandbox, config: cri.ContainerConfig) -> str:
        """Shielded: a caller that gives up (kubelet's timeout) does not undo the
        work, which finishes and is handed to the retry with the same name."""
        name = container_name(sandbox.name, config.metadata or cri.ContainerMetadata())
        return await self._creating.join(
            name,
            lambda: self._create_once(sandbox, config),
            on_join=lambda: log_event(log, "retried create joins the one in flight", name=name),
        )

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
        users = self.image_users.get(chain_id) if chain_id else None
        if users is not None:
            # An image seen before: no file to read, so the record can go first and
            # hold the snapshot prepared after it; no lease (two round trips fewer).
            await self._prepare_and_create(container, sandbox, image_config, chain_id, "", users)
            return
        async with self.ops.creation_lease() as lease:
            await self._prepare_and_create(container, sandbox, image_config, chain_id, lease)

    async def _prepare_and_create(
        self,
        container: Container,
        sandbox: Sandbox,
        image_config: dict[str, Any],
        chain_id: str,
        lease: str,
        users: tuple[str | None, str | None] | None = None,
    ) -> None:
        """With `users` known, the snapshot is prepared after the container record
        that references it; otherwise first, under `lease`, and the users read."""
        mounts = None
        if users is None:
            mounts = await self.ops.prepare_snapshot(container.id, chain_id, lease=lease)
        if self.image_volumes is not None:
            await self.image_volumes.attach(container.id, container.config)
        if users is None:
            assert mounts is not None
            users = await self.image_users.read(chain_id, mounts)
        passwd, group = users
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
            extensions={METADATA_EXTENSION: pack_json(METADATA_TYPE_URL, container.to_record())},
            snapshot_key=container.id,
            lease=lease,
        )
        if mounts is None:
            mounts = await self.ops.prepare_snapshot(container.id, chain_id)
        container.runtime.spec = spec
        # StartContainer then needs no second Prepare/Mounts round-trip
        # (after a restart it asks containerd).
        container.runtime.mounts = mounts

    async def _forget(self, container: Container) -> None:
        # containerd removes a snapshot whatever record names it: both at once.
        await run_all(
            self.ops.delete_container(container.id), self.ops.remove_snapshot(container.id)
        )
        if self.image_volumes is not None:
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
            runtime = container.runtime
            runtime.io = io
            runtime.exit_seen = asyncio.Event()
            try:
                await io.open()
                mounts, runtime.mounts = runtime.mounts, None
                mounts = mounts or await self.ops.prepare_snapshot(container.id, "")
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
                runtime.early_exit = None
                await asyncio.shield(self._start_failed(container, io, err))
                raise
            container.state = ContainerState.RUNNING
            container.started_at = started_at
        self._publish(container, cri.ContainerEventType.CONTAINER_STARTED_EVENT)
        log_event(log, "container started", container=container.id, pid=container.pid)
        early, container.runtime.early_exit = container.runtime.early_exit, None
        if early is not None:
            await self._finish(container, early.exit_code, _ns(early.exited_at))

    async def _start_failed(
        self, container: Container, io: ContainerIO, err: BaseException
    ) -> None:
        await self.ops.kill(container.id)
        await self.ops.delete_task(container.id)
        await io.close()
        container.runtime.io = None
        container.state = ContainerState.EXITED
        container.exit_code = START_ERROR_EXIT_CODE
        container.reason = "StartError"
        container.message = str(err)
        container.finished_at = time.time_ns()
        await self._persist_exit(container)

    # stop / remove

    async def stop(self, container: Container, timeout: int) -> None:
        """Stop signal, then SIGKILL after `timeout` seconds. Returns once the exit is
        fully recorded (task deleted, as containerd's StopContainer does), also when
        the event stream got there first: RemoveContainer then finds nothing to wait on."""
        await self._stop(container, timeout)
        finished = container.runtime.finished
        if finished is not None:
            await finished.wait()

    async def _stop(self, container: Container, timeout: int) -> None:
        if container.state is not ContainerState.RUNNING:
            return
        seen = container.runtime.exit_seen
        if seen is None:
            seen = container.runtime.exit_seen = asyncio.Event()
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
            if container.state is ContainerState.RUNNING:
                # A StartContainer that held the lock ran the task after the stop
                # above: stop that too, as containerd's RemoveContainer does.
                await self.stop(container, 0)
            if not container.runtime.task_deleted:
                await self.ops.delete_task(container.id)
            io, container.runtime.io = container.runtime.io, None
            if io is not None:
                await io.close()
            await run_all(
                self._forget(container), asyncio.to_thread(_rmtree, self.io_dir(container.id))
            )
            self.store.remove(container)
        self._publish(container, cri.ContainerEventType.CONTAINER_DELETED_EVENT)
        log_event(log, "container removed", container=container.id)

    async def stop_pod(self, sandbox: Sandbox) -> None:
        await asyncio.gather(*(self.stop(c, 0) for c in self.store.in_sandbox(sandbox.id)))

    async def remove_pod(self, sandbox: Sandbox) -> None:
        await run_all(*(self.remove(c) for c in self.store.in_sandbox(sandbox.id)))

    # logs

    async def reopen_log(self, container: Container) -> None:
        io = container.runtime.io
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
            container.runtime.spec = new
            try:
                if container.state is ContainerState.RUNNING:
                    applied = await self.ops.update_task_resources(
                        container.id, new["linux"].get("resources", {})
                    )
                    if not applied:
                        log_event(log, "task gone before its update", container=container.id)
            except BaseException:
                container.runtime.spec = old
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


def _rmtree(path: Path) -> None:

    shutil.rmtree(path, ignore_errors=True)
