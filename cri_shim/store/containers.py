"""In-memory view of containers: answers ContainerStatus and ListContainers
without a containerd round-trip. Task exit events update it at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from cri_shim.gen.runtime import v1 as cri
from cri_shim.store.encoded import EncodingCache
from cri_shim.store.index import IdIndex, NameIndex
from cri_shim.store.record import RECORD_VERSION, check_record_version

if TYPE_CHECKING:  # types only: the store does not depend on the domain code
    from cri_shim.container.io import ContainerIO
    from cri_shim.containerd.events import TaskExit
    from cri_shim.gen.containerd.types import Mount
    from cri_shim.images.store import ImageRecord


class ContainerState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


_CRI_STATE = {
    ContainerState.CREATED: cri.ContainerState.CONTAINER_CREATED,
    ContainerState.RUNNING: cri.ContainerState.CONTAINER_RUNNING,
    ContainerState.EXITED: cri.ContainerState.CONTAINER_EXITED,
    ContainerState.UNKNOWN: cri.ContainerState.CONTAINER_UNKNOWN,
}


@dataclass
class ContainerRuntime:
    """What the shim holds for a container besides its CRI status, kept on its
    record (as containerd's store/container keeps IO, StopCh and Status) so
    that removing the record drops all of it. Changed in place: no part of it
    is in the record's cached encodings."""

    io: ContainerIO | None = None  # stdio and log copier while the task runs
    spec: dict[str, Any] | None = None  # the OCI spec, as stored in containerd
    mounts: list[Mount] | None = None  # rootfs mounts from Create's Prepare, for Start
    exit_seen: asyncio.Event | None = None  # the exit is known (Stop's signal wait)
    early_exit: TaskExit | None = None  # an exit that came before Start returned
    finished: asyncio.Event | None = None  # the exit is fully recorded (task deleted)
    exiting: bool = False  # the exit is being recorded (RUNNING until the log is complete)
    task_deleted: bool = False  # recording the exit deleted the task: Remove skips it


@dataclass
class Container(EncodingCache):
    """Change it only by assigning fields: that is what drops its cached encodings."""

    id: str
    name: str
    sandbox_id: str
    config: cri.ContainerConfig
    image_ref: str  # the reference the caller gave (ImageSpec.image)
    image_id: str  # config digest
    image_repo_ref: str  # a repo digest of the image, for ContainerStatus.image_ref
    created_at: int
    log_path: str
    # The image's first repo tag while it has one (kept current from the image store,
    # not recorded): ContainerStatus.image, as containerd reports it.
    image_tag: str = ""
    stop_signal: str = "SIGTERM"
    state: ContainerState = ContainerState.CREATED
    pid: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    oom_killed: bool = False
    # (uid, gid, supplemental gids) the process runs as, reported in ContainerStatus.user.
    user: tuple[int, int, tuple[int, ...]] | None = None
    resources: cri.LinuxContainerResources | None = None
    removing: bool = False  # RemoveContainer is under way (verbose info's "removing")
    # Created from a checkpoint archive: StartContainer restores the task from it.
    restore: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)
    runtime: ContainerRuntime = field(default_factory=ContainerRuntime, repr=False, compare=False)

    @property
    def metadata(self) -> cri.ContainerMetadata:
        return self.config.metadata or cri.ContainerMetadata()

    def to_record(self, *, with_exit: bool = False) -> dict[str, Any]:
        """What survives a restart of the shim; `with_exit` once the exit is known."""
        user = self.user
        data: dict[str, Any] = {
            "version": RECORD_VERSION,
            "id": self.id,
            "name": self.name,
            "sandboxId": self.sandbox_id,
            "config": self.config.to_dict(),
            "imageRef": self.image_ref,
            "imageId": self.image_id,
            "imageRepoRef": self.image_repo_ref,
            "createdAt": self.created_at,
            "logPath": self.log_path,
            "stopSignal": self.stop_signal,
            "user": [*user[:2], list(user[2])] if user else None,
        }
        if self.restore:
            data["restore"] = True
        if with_exit:
            data.update(
                startedAt=self.started_at,
                finishedAt=self.finished_at,
                exitCode=self.exit_code,
                reason=self.reason,
                message=self.message,
            )
        return data

    @classmethod
    def from_record(cls, container_id: str, data: dict[str, Any]) -> Container:
        """The container as created; its state is for the caller to set from the task
        (and from the exit fields, when the record has them)."""
        check_record_version(data, "container")
        user = data.get("user")
        return cls(
            id=container_id,
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
            restore=bool(data.get("restore", False)),
        )

    def cri_state(self) -> cri.ContainerState:
        return _CRI_STATE[self.state]

    def image_spec(self) -> cri.ImageSpec:
        spec = self.config.image or cri.ImageSpec()
        return cri.ImageSpec(
            image=self.image_ref,
            annotations=dict(spec.annotations),
            user_specified_image=spec.user_specified_image or self.image_ref,
        )

    def to_cri(self) -> cri.Container:
        return cri.Container(
            id=self.id,
            pod_sandbox_id=self.sandbox_id,
            metadata=self.metadata,
            image=self.image_spec(),
            image_ref=self.image_id,
            state=self.cri_state(),
            created_at=self.created_at,
            labels=dict(self.config.labels),
            annotations=dict(self.config.annotations),
            image_id=self.image_id,
        )

    def to_status(self) -> cri.ContainerStatus:
        return cri.ContainerStatus(
            id=self.id,
            metadata=self.metadata,
            state=self.cri_state(),
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            exit_code=self.exit_code,
            image=cri.ImageSpec(image=self.image_tag) if self.image_tag else self.image_spec(),
            image_ref=self.image_repo_ref or self.image_id,
            reason=self.reason,
            message=self.message,
            labels=dict(self.config.labels),
            annotations=dict(self.config.annotations),
            mounts=list(self.config.mounts),
            log_path=self.log_path,
            # Always present, as containerd 2.x reports it (empty without limits).
            resources=cri.ContainerResources(linux=self.resources or cri.LinuxContainerResources()),
            image_id=self.image_id,
            user=self._user(),
            stop_signal=cri_signal(self.stop_signal),
        )

    def _user(self) -> cri.ContainerUser | None:
        if self.user is None:
            return None
        uid, gid, groups = self.user
        return cri.ContainerUser(
            linux=cri.LinuxContainerUser(uid=uid, gid=gid, supplemental_groups=list(groups))
        )


def cri_signal(name: str) -> cri.Signal:
    """The CRI enum for a stop signal name (`SIGQUIT`, `SIGRTMIN+1`), as containerd's
    toCRISignal maps it: a name CRI has no value for is RUNTIME_DEFAULT."""
    key = name.replace("+", "PLUS", 1).replace("-", "MINUS", 1)
    try:
        return cri.Signal[key]
    except KeyError:
        return cri.Signal.RUNTIME_DEFAULT


def container_name(sandbox: cri.PodSandboxMetadata, metadata: cri.ContainerMetadata) -> str:
    """The unique name of a container attempt in a pod, as containerd's CRI forms it
    (makeContainerName: the pod's attempt is not part of it)."""
    return "_".join(
        [metadata.name, sandbox.name, sandbox.namespace, sandbox.uid, str(metadata.attempt)]
    )


class ContainerStore:
    def __init__(self) -> None:
        self.by_id: IdIndex[Container] = IdIndex("container")
        self.names = NameIndex()

    def add(self, container: Container) -> None:
        self.by_id.add(container.id, container)

    def remove(self, container: Container) -> None:
        self.by_id.discard(container.id)
        self.names.release(container.name, container.id)

    def follow_images(self, ids: set[str], current: Callable[[str], ImageRecord | None]) -> None:
        """The images `ids` gained or lost names: each container of one reports the
        image's current first tag and repo digest, or its id once it is gone, as
        containerd's ContainerStatus looks them up on every call."""
        for container in self.by_id:
            if container.image_id not in ids:
                continue
            image = current(container.image_id)
            tag = (image.repo_tags or [""])[0] if image is not None else ""
            repo_ref = (image.repo_digests or [""])[0] if image is not None else ""
            if container.image_tag != tag:
                container.image_tag = tag
            if container.image_repo_ref != repo_ref:
                container.image_repo_ref = repo_ref

    def in_sandbox(self, sandbox_id: str) -> list[Container]:
        return [c for c in self.by_id if c.sandbox_id == sandbox_id]

    def list(self, filters: cri.ContainerFilter | None) -> list[Container]:
        items = list(self.by_id)
        if filters is None:
            return items
        if filters.id:
            items = [c for c in items if c.id.startswith(filters.id)]
        if filters.pod_sandbox_id:
            items = [c for c in items if c.sandbox_id.startswith(filters.pod_sandbox_id)]
        if filters.state is not None:
            wanted = filters.state.state
            items = [c for c in items if c.cri_state() == wanted]
        if filters.label_selector:
            selector = dict(filters.label_selector)
            items = [
                c for c in items if all(c.config.labels.get(k) == v for k, v in selector.items())
            ]
        return items
