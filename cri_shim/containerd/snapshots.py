"""containerd's Snapshots service, typed: the one place its requests are built.

Containers' writable layers (`RuntimeOps.prepare_snapshot`) and image layer
extraction (`images/unpack.py`) both go through it. Errors are containerd's
(`ContainerdError`); what counts as success (an existing snapshot, one
already gone) is for the caller to say.
"""

from __future__ import annotations

from cri_shim.containerd.client import ContainerdClient, metadata_for
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.gen.containerd.types import Mount

SNAPSHOTTER = "overlayfs"


class Snapshots:
    def __init__(self, client: ContainerdClient, snapshotter: str = SNAPSHOTTER) -> None:
        self.client = client
        self.snapshotter = snapshotter

    async def prepare(
        self, key: str, parent: str, labels: dict[str, str] | None = None, *, lease: str = ""
    ) -> list[Mount]:
        """A new active snapshot on `parent` (held by `lease`); its mounts."""
        reply = await self.client.call(
            "Snapshots.Prepare",
            self.client.snapshots.prepare(
                snapshots_v1.PrepareSnapshotRequest(
                    snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
                ),
                metadata=metadata_for(self.client, lease),
            ),
        )
        return list(reply.mounts)

    async def view(
        self, key: str, parent: str, labels: dict[str, str] | None = None
    ) -> list[Mount]:
        """A new read-only view of the committed `parent`; its mounts."""
        reply = await self.client.call(
            "Snapshots.View",
            self.client.snapshots.view(
                snapshots_v1.ViewSnapshotRequest(
                    snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
                )
            ),
        )
        return list(reply.mounts)

    async def mounts(self, key: str) -> list[Mount]:
        reply = await self.client.call(
            "Snapshots.Mounts",
            self.client.snapshots.mounts(
                snapshots_v1.MountsRequest(snapshotter=self.snapshotter, key=key)
            ),
        )
        return list(reply.mounts)

    async def commit(
        self, name: str, key: str, labels: dict[str, str] | None = None, *, lease: str = ""
    ) -> None:
        await self.client.call(
            "Snapshots.Commit",
            self.client.snapshots.commit(
                snapshots_v1.CommitSnapshotRequest(
                    snapshotter=self.snapshotter, name=name, key=key, labels=labels or {}
                ),
                metadata=metadata_for(self.client, lease),
            ),
        )

    async def remove(self, key: str) -> None:
        await self.client.call(
            "Snapshots.Remove",
            self.client.snapshots.remove(
                snapshots_v1.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key)
            ),
        )

    async def stat(self, key: str) -> snapshots_v1.Info | None:
        reply = await self.client.call(
            "Snapshots.Stat",
            self.client.snapshots.stat(
                snapshots_v1.StatSnapshotRequest(snapshotter=self.snapshotter, key=key)
            ),
        )
        return reply.info

    async def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes) the snapshot uses."""
        reply = await self.client.call(
            "Snapshots.Usage",
            self.client.snapshots.usage(
                snapshots_v1.UsageRequest(snapshotter=self.snapshotter, key=key)
            ),
        )
        return reply.size, reply.inodes

    async def all(self) -> list[snapshots_v1.Info]:
        """Every snapshot of this snapshotter (a server stream, gathered)."""
        infos: list[snapshots_v1.Info] = []
        responses = self.client.snapshots.list(
            snapshots_v1.ListSnapshotsRequest(snapshotter=self.snapshotter)
        )
        async for reply in self.client.stream("Snapshots.List", responses):
            infos.extend(reply.info)
        return infos
