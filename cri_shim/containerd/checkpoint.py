"""containerd's side of container checkpoint and restore, typed.

What containerd's Go client does for `task.Checkpoint` (pause, Tasks.Checkpoint
with runc options, a diff of the writable snapshot, resume) and for restoring
(the rootfs diff applied to the new snapshot, Tasks.Create with the CRIU image
directory in the runc options), as gRPC calls. Blobs it produces are held by a
lease, so containerd's GC takes them once the caller lets it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from grpclib.const import Status

from cri_shim.containerd.client import ContainerdClient, metadata_for
from cri_shim.containerd.leases import Leases
from cri_shim.containerd.runtime import RUNC_OPTIONS_TYPE_URL
from cri_shim.containerd.snapshots import SNAPSHOTTER
from cri_shim.errors import ContainerdError
from cri_shim.gen.containerd.runc import v1 as runc_v1
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.containerd.services.content import v1 as content_v1
from cri_shim.gen.containerd.services.diff import v1 as diff_v1
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.gen.containerd.services.tasks import v1 as tasks_v1
from cri_shim.gen.containerd.types import Descriptor, Mount
from cri_shim.gen.google.protobuf import Any as AnyMessage
from cri_shim.images.content import ContentStore
from cri_shim.registry.types import Descriptor as BlobDescriptor

CHECKPOINT_OPTIONS_TYPE_URL = "containerd.runc.v1.CheckpointOptions"
# containerd's images.MediaTypeContainerd1Checkpoint*, and the OCI gzip layer its diff writes.
MEDIA_CRIU_TAR = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
MEDIA_CHECKPOINT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
CHECKPOINT_LEASE_PREFIX = "cri-shim-checkpoint-"
CHECKPOINT_LEASE_EXPIRY = datetime.timedelta(hours=1)
WRITE_CHUNK = 1 << 20
# A stalled content write of the rootfs diff gives up after this long.
CONTENT_TIMEOUT = 300.0


class CheckpointOps:
    def __init__(self, client: ContainerdClient) -> None:
        self.client = client
        self.leases = Leases(client)
        self.content = ContentStore(client, timeout=CONTENT_TIMEOUT)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[str]:
        """Holds the blobs a checkpoint or restore writes until it is done with them."""
        async with self.leases.held(CHECKPOINT_LEASE_PREFIX, CHECKPOINT_LEASE_EXPIRY) as lease_id:
            yield lease_id

    async def pause(self, container_id: str) -> None:
        await self.client.call(
            "Tasks.Pause",
            self.client.tasks.pause(tasks_v1.PauseTaskRequest(container_id=container_id)),
        )

    async def resume(self, container_id: str) -> None:
        await self.client.call(
            "Tasks.Resume",
            self.client.tasks.resume(tasks_v1.ResumeTaskRequest(container_id=container_id)),
        )

    async def checkpoint_task(
        self, container_id: str, work_path: str, *, lease: str
    ) -> list[Descriptor]:
        """CRIU dump of the task, left running (Kubernetes' forensic checkpoint):
        the CRIU image tar and the container's spec as content blobs."""
        options = runc_v1.CheckpointOptions(exit=False, work_path=work_path)
        reply = await self.client.call(
            "Tasks.Checkpoint",
            self.client.tasks.checkpoint(
                tasks_v1.CheckpointTaskRequest(
                    container_id=container_id,
                    options=AnyMessage(type_url=CHECKPOINT_OPTIONS_TYPE_URL, value=bytes(options)),
                ),
                metadata=metadata_for(self.client, lease),
            ),
        )
        return list(reply.descriptors)

    async def diff_rw_snapshot(self, snapshot_key: str, *, lease: str) -> Descriptor:
        """The writable layer as a gzip tar blob (containerd's rootfs.CreateDiff):
        a view of the parent against the snapshot itself."""
        stat = await self.client.call(
            "Snapshots.Stat",
            self.client.snapshots.stat(
                snapshots_v1.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=snapshot_key)
            ),
        )
        parent = stat.info.parent if stat.info is not None else ""
        view_key = f"{snapshot_key}-parent-view-{secrets.token_hex(4)}"
        view = await self.client.call(
            "Snapshots.View",
            self.client.snapshots.view(
                snapshots_v1.ViewSnapshotRequest(
                    snapshotter=SNAPSHOTTER, key=view_key, parent=parent
                ),
                metadata=metadata_for(self.client, lease),
            ),
        )
        try:
            upper = await self.client.call(
                "Snapshots.Mounts",
                self.client.snapshots.mounts(
                    snapshots_v1.MountsRequest(snapshotter=SNAPSHOTTER, key=snapshot_key)
                ),
            )
            reply = await self.client.call(
                "Diff.Diff",
                self.client.diff.diff(
                    diff_v1.DiffRequest(
                        left=list(view.mounts),
                        right=list(upper.mounts),
                        media_type=MEDIA_LAYER_GZIP,
                        ref=f"checkpoint-rw-{snapshot_key}-{secrets.token_hex(4)}",
                    ),
                    metadata=metadata_for(self.client, lease),
                ),
            )
        finally:
            with contextlib.suppress(ContainerdError):
                await self.client.call(
                    "Snapshots.Remove",
                    self.client.snapshots.remove(
                        snapshots_v1.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=view_key)
                    ),
                )
        if reply.diff is None:
            raise ContainerdError(
                "Diff.Diff", Status.UNKNOWN, "containerd returned no diff descriptor"
            )
        return reply.diff

    async def read_blob_to(self, digest: str, path: Path) -> None:
        """Stream a blob into a file (CRIU images can be large)."""
        handle = await asyncio.to_thread(path.open, "wb")
        try:
            responses = self.client.content.read(content_v1.ReadContentRequest(digest=digest))
            async for part in self.client.stream("Content.Read", responses):
                await asyncio.to_thread(handle.write, part.data)
        finally:
            await asyncio.to_thread(handle.close)

    async def read_blob(self, digest: str) -> bytes:
        parts: list[bytes] = []
        responses = self.client.content.read(content_v1.ReadContentRequest(digest=digest))
        async for part in self.client.stream("Content.Read", responses):
            parts.append(part.data)
        return b"".join(parts)

    async def apply_layer_file(self, path: Path, mounts: list[Mount], *, lease: str) -> None:
        """Apply a (gzip) tar layer file onto a snapshot's mounts through containerd's
        Diff.Apply, which handles whiteouts as for image layers."""
        digest, size, gzipped = await asyncio.to_thread(_file_digest, path)
        desc = Descriptor(
            media_type=MEDIA_LAYER_GZIP if gzipped else MEDIA_LAYER_TAR,
            digest=digest,
            size=size,
        )
        await self._write_file(path, BlobDescriptor(desc.media_type, desc.digest, desc.size), lease)
        await self.client.call(
            "Diff.Apply",
            self.client.diff.apply(diff_v1.ApplyRequest(diff=desc, mounts=mounts)),
        )

    async def _write_file(self, path: Path, desc: BlobDescriptor, lease: str) -> None:
        async def source(offset: int) -> AsyncIterator[bytes]:
            handle = await asyncio.to_thread(path.open, "rb")
            try:
                await asyncio.to_thread(handle.seek, offset)
                while chunk := await asyncio.to_thread(handle.read, WRITE_CHUNK):
                    yield chunk
            finally:
                await asyncio.to_thread(handle.close)

        await self.content.write(desc, source, labels={}, lease=lease)


async def restore_task_options(
    client: ContainerdClient, container_id: str, criu_image_path: str, criu_work_path: str
) -> AnyMessage:
    """The container's own runc options (runc binary, cgroup driver) plus the CRIU
    image directory: Tasks.Create then restores instead of creating (containerd
    1.6 and 2.x alike read `criu_image_path`)."""
    reply = await client.call(
        "Containers.Get",
        client.containers.get(containers_v1.GetContainerRequest(id=container_id)),
    )
    options = runc_v1.Options()
    runtime = reply.container.runtime if reply.container is not None else None
    if runtime is not None and runtime.options is not None and runtime.options.value:
        options = runc_v1.Options.parse(runtime.options.value)
    options.criu_image_path = criu_image_path
    options.criu_work_path = criu_work_path
    return AnyMessage(type_url=RUNC_OPTIONS_TYPE_URL, value=bytes(options))


def _file_digest(path: Path) -> tuple[str, int, bool]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        head = handle.read(2)
        digest.update(head)
        size += len(head)
        while chunk := handle.read(WRITE_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return f"sha256:{digest.hexdigest()}", size, head == b"\x1f\x8b"
