"""What the container manager's parts share: the store, containerd, the
record's persistence and spec, and the constants of containerd's records.
The parts: `lifecycle.py` (create, start, stop, remove, update), `exits.py`
(task exits and OOM kills), `recovery.py` (rebuilding after a restart).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri_shim.concurrency import InFlight
from cri_shim.container.checkpoint import CriuSupport
from cri_shim.container.events import ContainerEventBus
from cri_shim.container.image_volumes import ImageVolumes
from cri_shim.container.io import ContainerIO
from cri_shim.container.rootfs import ImageUsers
from cri_shim.containerd.checkpoint import CheckpointOps
from cri_shim.containerd.runtime import Runtime, pack_json, unpack_json
from cri_shim.errors import failed_precondition, not_found
from cri_shim.gen.runtime import v1 as cri
from cri_shim.images.store import ImageRecord, ImageStore
from cri_shim.logs import log_event
from cri_shim.store.containers import Container, ContainerStore
from cri_shim.store.sandboxes import SandboxStore

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
    enable_criu: bool = True  # runtime.enable_criu
    restore_via_create: bool = True  # runtime.restore_via_create
    # runc binary of each configured runtime handler; absent: the shim's default runc.
    runc_binaries: Mapping[str, str] = field(default_factory=dict)
    namespace: str = "k8s.io"  # containerd namespace (cgroup parent without a pod's own)


def _criu_disabled() -> str:
    return "criu support is disabled by configuration (runtime.enable_criu = false)"


def _ns(moment: datetime.datetime | None) -> int:
    if moment is None:
        return time.time_ns()
    return int(moment.timestamp() * 1_000_000_000)


class ContainerManagerBase:
    """The state and helpers every part of the container manager uses."""

    def __init__(
        self,
        store: ContainerStore,
        sandboxes: SandboxStore,
        images: ImageStore,
        ops: Runtime,
        events: ContainerEventBus,
        environment: ContainerEnvironment,
        image_volumes: ImageVolumes | None = None,
        checkpoints: CheckpointOps | None = None,
    ) -> None:
        self.store = store
        self.sandboxes = sandboxes
        self.images = images
        self.ops = ops
        self.events = events
        self.env = environment
        # Image volumes (Mount.image); None where no containerd backs the manager
        # (the in-memory fake), so such mounts are refused as not prepared.
        self.image_volumes = image_volumes
        # Checkpoint/restore through containerd; None (the in-memory fake) refuses both.
        self.checkpoints = checkpoints
        self.criu = CriuSupport() if environment.enable_criu else CriuSupport(_criu_disabled)
        # A container's IO, spec, mounts and exit signals live on its record
        # (`Container.runtime`), so removing the record drops them.
        self._releases: set[asyncio.Task[None]] = set()
        self.status_provider: Callable[[str], Awaitable[cri.PodSandboxStatus | None]] | None = None
        # Pulls a checkpoint's base image that is not present (the image manager's pull).
        self.pull_image: Callable[[str], Awaitable[ImageRecord]] | None = None
        # Creates in flight by name: a kubelet retry joins the first call's work.
        self._creating: InFlight[str] = InFlight()
        # /etc/passwd and /etc/group of each image's layers, by chain id (layers never
        # change): a create from a known image reads no files and needs no lease.
        self.image_users = ImageUsers()

    def io_dir(self, container_id: str) -> Path:
        return self.env.state_dir / "containers" / container_id

    def container_io(self, container_id: str) -> ContainerIO | None:
        """The stdio of a running container (attach joins it); None when it has none."""
        container = self._record(container_id)
        return container.runtime.io if container is not None else None

    def _record(self, container_id: str) -> Container | None:
        """The record with exactly this id (not a prefix)."""
        container = self.store.by_id.find(container_id)
        return container if container is not None and container.id == container_id else None

    # persistence

    async def _persist_exit(self, container: Container) -> None:
        data = container.to_record(with_exit=True)
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

    def spec(self, container_id: str) -> dict[str, Any] | None:
        container = self._record(container_id)
        return container.runtime.spec if container is not None else None

    async def load_spec(self, container_id: str) -> dict[str, Any]:
        container = self._record(container_id)
        if container is not None and container.runtime.spec is not None:
            return container.runtime.spec
        record = await self.ops.get_container(container_id)
        if record is None:
            raise not_found(f"container {container_id} not found in containerd")
        spec = unpack_json(record.spec)
        if not isinstance(spec, dict):
            raise failed_precondition(f"container {container_id} has no runtime spec")
        if container is not None:
            container.runtime.spec = spec
        return spec

    def _container_io(self, container: Container) -> ContainerIO:
        return ContainerIO(
            self.io_dir(container.id) / "io",
            container.id,
            stdin=container.config.stdin,
            tty=container.config.tty,
            log_path=container.log_path,
            log_relative=container.config.log_path,
        )
