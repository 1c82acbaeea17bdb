"""Creating, starting, stopping and removing containers against containerd.

A CRI container is a containerd container (spec, labels, one JSON extension
with what the CRI view needs) on a snapshot of its image, plus a task while it
runs. Task exits arrive from containerd's event stream and update the store
at once; the exit code and time are kept after the task is deleted.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import shutil
import signal as signals
import time
from pathlib import Path
from typing import Any

from cri_shim.concurrency import run_all
from cri_shim.container.checkpoint import (
    CHECKPOINT_DIRECTORY,
    CONFIG_DUMP,
    CONTAINER_LOG,
    RESTORE_DIR,
    ROOTFS_DIFF,
    SPEC_DUMP,
    STATUS_DUMP,
    STATUS_FILE,
    ArchiveMetadata,
    base_image_refs,
    config_dump,
    extract_criu_tar,
    is_checkpoint_archive,
    read_archive_metadata,
    restored_config,
    runtime_status_file,
    status_dump,
    unpack_archive,
    write_archive,
)
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
from cri_shim.containerd.checkpoint import (
    MEDIA_CHECKPOINT_CONFIG,
    MEDIA_CRIU_TAR,
    restore_task_options,
)
from cri_shim.containerd.runtime import pack_json
from cri_shim.errors import (
    failed_precondition,
    go_quote,
    invalid_argument,
    not_found,
)
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.containerd.types import Mount
from cri_shim.gen.google.protobuf import Any as AnyMessage
from cri_shim.gen.runtime import v1 as cri
from cri_shim.images.store import ImageRecord
from cri_shim.logs import log_event
from cri_shim.oci.container_spec import (
    ContainerSpecInput,
    SandboxView,
    apply_linux_resources,
    build_container_spec,
    ensure_mount_source,
    resources_from_spec,
)
from cri_shim.oci.userns import pod_userns_of
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
        name = container_name(sandbox.metadata, config.metadata or cri.ContainerMetadata())
        return await self._creating.join(
            name,
            lambda: self._create_once(sandbox, config),
            on_join=lambda: log_event(log, "retried create joins the one in flight", name=name),
        )

    async def _create_once(self, sandbox: Sandbox, config: cri.ContainerConfig) -> str:
        if sandbox.state is not SandboxState.READY:
            raise failed_precondition(f"pod sandbox {sandbox.id} is not ready")
        image_spec = config.image or cri.ImageSpec()
        if await asyncio.to_thread(is_checkpoint_archive, image_spec.image):
            return await self._create_restored(sandbox, config, image_spec.image)
        image = self.images.get(image_spec.image)
        if image is None:
            raise not_found(f"image {image_spec.image!r} not found; pull it first")
        return await self._create_with_image(sandbox, config, image, restore_from=None)

    async def _create_restored(
        self, sandbox: Sandbox, request: cri.ContainerConfig, archive: str
    ) -> str:
        """CreateContainer whose image is a checkpoint archive (containerd 2.0-2.3's
        CRImportCheckpoint): the container on the checkpoint's base image, the
        archive unpacked for StartContainer, the checkpointed log put back."""
        if not self.env.restore_via_create:
            raise failed_precondition(
                f"{archive} is a checkpoint archive, and restoring one in CreateContainer "
                "is disabled by configuration (runtime.restore_via_create = false)"
            )
        await self.criu.require()
        metadata = await asyncio.to_thread(read_archive_metadata, archive)
        user_image = (request.image or cri.ImageSpec()).user_specified_image or archive
        config = restored_config(request, metadata, user_image)
        image = None
        for ref in base_image_refs(metadata):
            image = self.images.get(ref)
            if image is not None:
                break
        if image is None:
            image = await self._pull_base_image(metadata)
        log_event(log, "restoring container from checkpoint", archive=archive, pod=sandbox.id)
        return await self._create_with_image(sandbox, config, image, restore_from=archive)

    async def _pull_base_image(self, metadata: ArchiveMetadata) -> ImageRecord:
        """containerd pulls the image a checkpoint is based on (NAME@DIGEST, as the
        archive records it) when it is not present; so does this."""
        refs = base_image_refs(metadata)
        if not refs:
            raise invalid_argument("the checkpoint archive names no base image")
        if self.pull_image is None:
            raise not_found(f"the checkpoint's base image {refs[0]} is not present")
        log_event(log, "pulling checkpoint base image", image=refs[0])
        return await self.pull_image(refs[0])

    async def _create_with_image(
        self,
        sandbox: Sandbox,
        config: cri.ContainerConfig,
        image: ImageRecord,
        *,
        restore_from: str | None,
    ) -> str:
        metadata = config.metadata or cri.ContainerMetadata()
        image_spec = config.image or cri.ImageSpec()
        name = container_name(sandbox.metadata, metadata)
        owner = self.store.names.owner(name)
        if owner is not None:
            existing = self.store.by_id.find(owner)
            if (
                existing is not None
                and existing.state is ContainerState.CREATED
                and existing.config == config
            ):
                # kubelet retrying a call that timed out on its side: same answer.
                log_event(log, "container reused for retried create", container=owner)
                return owner
            # containerd's words (its name registrar), so tools matching them keep working.
            raise failed_precondition(
                f"failed to reserve container name {go_quote(name)}; check if another "
                f"CreateContainer request is in progress: name {go_quote(name)} is reserved "
                f"for {go_quote(owner)}"
            )
        log_path = log_path_for(sandbox, config.log_path)
        container = Container(
            id=new_id(),
            name=name,
            sandbox_id=sandbox.id,
            config=config,
            image_ref=image_spec.image,
            image_id=image.id,
            image_repo_ref=(image.repo_digests or [image.id])[0],
            image_tag=(image.repo_tags or [""])[0],
            created_at=time.time_ns(),
            log_path=log_path,
            stop_signal=stop_signal(config, runtime_config(image.config)),
            restore=restore_from is not None,
        )
        self.store.names.reserve(name, container.id)
        try:
            await self._create_in_containerd(
                container, sandbox, runtime_config(image.config), image.chain_id
            )
            if restore_from is not None:
                await asyncio.to_thread(
                    _unpack_for_restore, restore_from, self.io_dir(container.id), log_path
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
        # A user-namespaced pod's rootfs is its own id-mapped snapshot: the long way.
        known = chain_id and pod_userns_of(sandbox.config) is None
        users = self.image_users.get(chain_id) if known else None
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
        userns = pod_userns_of(sandbox.config)
        mounts = None
        if users is None:
            parent, labels = chain_id, None
            if userns is not None:
                rootfs = await self.ops.userns_rootfs(chain_id, userns, lease)
                parent, labels = rootfs.parent, rootfs.labels
            mounts = await self.ops.prepare_snapshot(container.id, parent, labels, lease=lease)
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
            namespace=self.env.namespace,
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
            runc_binary=self.env.runc_binaries.get(sandbox.runtime_handler, ""),
            # The stdio pipes belong to the process's host ids (containerd's WithUIDOwner).
            io_owner=(
                (userns.uids.to_host(container.user[0]), userns.gids.to_host(container.user[1]))
                if userns is not None
                else None
            ),
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
                options = await self._restore_options(container, mounts)
                stdin, stdout, stderr = io.stdio()
                await self.ops.create_task(
                    container.id,
                    mounts,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    terminal=container.config.tty,
                    options=options,
                )
                if options is None:
                    io.task_created()
                # Taken before the start call: the exit time containerd reports for a
                # process that ends at once must never precede it.
                started_at = time.time_ns()
                container.pid = await self.ops.start_task(container.id)
                if options is not None:
                    # A restoring shim opens the output FIFOs only in Start (the
                    # CRIU restore), so EOF means "gone" only from here on.
                    io.task_created()
            except BaseException as err:
                runtime.early_exit = None
                await asyncio.shield(self._start_failed(container, io, err))
                raise
            container.state = ContainerState.RUNNING
            container.started_at = started_at
            if container.restore:
                await self._restored(container)
        self._publish(container, cri.ContainerEventType.CONTAINER_STARTED_EVENT)
        log_event(log, "container started", container=container.id, pid=container.pid)
        early, container.runtime.early_exit = container.runtime.early_exit, None
        if early is not None:
            await self._finish(container, early.exit_code, _ns(early.exited_at))

    async def _restore_options(
        self, container: Container, mounts: list[Mount]
    ) -> AnyMessage | None:
        """For a container created from a checkpoint: its rootfs diff applied to the
        new snapshot, and runc options naming the CRIU images, so Tasks.Create
        prepares a restore that Tasks.Start carries out."""
        if not container.restore:
            return None
        await self.criu.require()
        if self.checkpoints is None:
            raise failed_precondition("checkpoint restore needs containerd")
        restore_dir = self.io_dir(container.id) / RESTORE_DIR
        images = restore_dir / CHECKPOINT_DIRECTORY
        if not await asyncio.to_thread(images.is_dir):
            raise failed_precondition(
                f"container {container.id}: checkpoint images missing in {restore_dir}"
            )
        diff = restore_dir / ROOTFS_DIFF
        if await asyncio.to_thread(diff.is_file):
            async with self.checkpoints.lease() as lease:
                await self.checkpoints.apply_layer_file(diff, mounts, lease=lease)
        return await restore_task_options(
            self.checkpoints.client, container.id, str(images), str(restore_dir)
        )

    async def _restored(self, container: Container) -> None:
        """The restore is done: its files go, and the record stops asking for one."""
        container.restore = False
        await asyncio.to_thread(_rmtree, self.io_dir(container.id) / RESTORE_DIR)
        try:
            await self.ops.update_extension(
                container.id,
                METADATA_EXTENSION,
                pack_json(METADATA_TYPE_URL, container.to_record()),
            )
        except Exception as err:  # the record in memory is right; a restart would re-restore
            log_event(log, "could not persist restore", container=container.id, error=err)
        log_event(log, "container restored from checkpoint", container=container.id)

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
            container.removing = True  # verbose status says so, as containerd's does
            try:
                if not container.runtime.task_deleted:
                    await self.ops.delete_task(container.id)
                io, container.runtime.io = container.runtime.io, None
                if io is not None:
                    await io.close()
                await run_all(
                    self._forget(container), asyncio.to_thread(_rmtree, self.io_dir(container.id))
                )
            except BaseException:
                container.removing = False
                raise
            self.store.remove(container)
        self._publish(container, cri.ContainerEventType.CONTAINER_DELETED_EVENT)
        log_event(log, "container removed", container=container.id)

    async def stop_pod(self, sandbox: Sandbox) -> None:
        await asyncio.gather(*(self.stop(c, 0) for c in self.store.in_sandbox(sandbox.id)))

    async def remove_pod(self, sandbox: Sandbox) -> None:
        await run_all(*(self.remove(c) for c in self.store.in_sandbox(sandbox.id)))

    # checkpoint

    async def checkpoint(self, container: Container, location: str) -> None:
        """containerd's CheckpointContainer: the running task dumped by CRIU and left
        running, its writable layer diffed (paused between the two), then the
        archive written to `location` with the metadata files kubelet's API has."""
        await self.criu.require()
        if self.checkpoints is None:
            raise failed_precondition("checkpoint needs containerd")
        async with container.lock:
            if container.state is not ContainerState.RUNNING:
                raise failed_precondition(
                    f"container {container.id} is {container.state.value}; "
                    "only running containers can be checkpointed"
                )
            record = await self.ops.get_container(container.id)
            if record is None:
                raise not_found(f"container {container.id} not found in containerd")
            work = self.io_dir(container.id) / "ctrd-checkpoint"
            await asyncio.to_thread(_fresh_dir, work)
            try:
                await self._checkpoint_into(container, record, work)
                await asyncio.to_thread(write_archive, work, location)
            finally:
                await asyncio.to_thread(_rmtree, work)
        log_event(log, "container checkpointed", container=container.id, location=location)

    async def _checkpoint_into(
        self, container: Container, record: containers_v1.Container, work: Path
    ) -> None:
        assert self.checkpoints is not None
        ops = self.checkpoints
        status = container.to_status()
        checkpointed_at = time.time_ns()
        created = record.created_at
        config = config_dump(
            container_id=container.id,
            name=container.name,
            image=container.image_ref,
            image_ref=container.image_repo_ref,
            runtime=record.runtime.name if record.runtime is not None else "",
            created_at=_ns(created) if created is not None else container.created_at,
            checkpointed_at=checkpointed_at,
        )
        async with ops.lease() as lease:
            # containerd's task.Checkpoint: paused so the CRIU images and the
            # filesystem diff show one moment; resumed whatever happens.
            await ops.pause(container.id)
            try:
                blobs = await ops.checkpoint_task(container.id, str(work), lease=lease)
                rw_layer = await ops.diff_rw_snapshot(container.id, lease=lease)
            finally:
                await ops.resume(container.id)
            for blob in blobs:
                if blob.media_type == MEDIA_CRIU_TAR:
                    tar_path = work / ".criu.tar"
                    await ops.read_blob_to(blob.digest, tar_path)
                    await asyncio.to_thread(extract_criu_tar, tar_path, work / CHECKPOINT_DIRECTORY)
                    await asyncio.to_thread(tar_path.unlink)
                elif blob.media_type == MEDIA_CHECKPOINT_CONFIG:
                    spec_any = AnyMessage.parse(await ops.read_blob(blob.digest))
                    await asyncio.to_thread((work / SPEC_DUMP).write_bytes, spec_any.value)
            await ops.read_blob_to(rw_layer.digest, work / ROOTFS_DIFF)
        files = {
            STATUS_FILE: runtime_status_file(
                container.pid, container.created_at, container.started_at
            ),
            CONFIG_DUMP: config,
            STATUS_DUMP: status_dump(status),
        }
        await asyncio.to_thread(_write_checkpoint_files, work, files, container.log_path)

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


def _unpack_for_restore(archive: str, io_dir: Path, log_path: str) -> None:
    """The archive (less its metadata dumps) under the container's state dir, and
    its saved log as the new container's log (as containerd restores it)."""
    restore_dir = io_dir / RESTORE_DIR
    unpack_archive(archive, restore_dir)
    saved_log = restore_dir / CONTAINER_LOG
    if log_path and saved_log.is_file() and not saved_log.is_symlink():
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(saved_log, log_path)
        os.chmod(log_path, 0o600)


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)


def _write_checkpoint_files(work: Path, files: dict[str, Any], log_path: str) -> None:
    for name, value in files.items():
        target = work / name
        # Compact, as Go's encoding/json writes them.
        target.write_text(json.dumps(value, separators=(",", ":")))
        target.chmod(0o600)
    if log_path and os.path.isfile(log_path):
        shutil.copyfile(log_path, work / CONTAINER_LOG)
        (work / CONTAINER_LOG).chmod(0o600)


def _rmtree(path: Path) -> None:

    shutil.rmtree(path, ignore_errors=True)
