"""Layers onto the overlayfs snapshotter, one committed snapshot per chain id.

The same steps as containerd's unpacker: a layer whose chain id is already a
committed snapshot is skipped; otherwise an active snapshot is prepared on
the parent chain under a unique `extract-<random> <chainID>` key, the diff
service applies the layer into its mounts, the uncompressed digest it reports
is checked against the config's diff id, and the snapshot is committed under
the chain id. A concurrent unpack of the same chain that commits first is
fine: ours is dropped and theirs used.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from grpclib.const import Status

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.diff import Diff
from cri_shim.containerd.snapshots import SNAPSHOTTER, Snapshots
from cri_shim.errors import ContainerdError
from cri_shim.gen.containerd import types as ctypes
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.logs import log_event
from cri_shim.registry.types import Descriptor

log = logging.getLogger(__name__)

SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"
PREPARE_ATTEMPTS = 3


class LayerMismatchError(Exception):
    """The applied layer's uncompressed digest is not the config's diff id."""


class Unpacker:
    def __init__(self, client: ContainerdClient, snapshotter: str = SNAPSHOTTER) -> None:
        self.client = client
        self.snapshotter = snapshotter
        self.snapshots = Snapshots(client, snapshotter)
        self.diff = Diff(client)

    @property
    def lease_type(self) -> str:
        return f"snapshots/{self.snapshotter}"

    async def committed(self, chain_id: str) -> bool:
        """Whether the chain is already unpacked (a committed snapshot by that name)."""
        try:
            info = await self.snapshots.stat(chain_id)
        except ContainerdError as err:
            if err.status is Status.NOT_FOUND:
                return False
            raise
        return info is not None and info.kind == snapshots_v1.Kind.COMMITTED

    async def _remove(self, key: str) -> None:
        try:
            await self.snapshots.remove(key)
        except ContainerdError as err:
            if err.status is not Status.NOT_FOUND:
                log_event(
                    log,
                    "could not remove extraction snapshot",
                    level=logging.WARNING,
                    key=key,
                    error=str(err),
                )

    async def apply(
        self, layer: Descriptor, diff_id: str, chain_id: str, parent: str, *, lease: str
    ) -> bool:
        """Unpack one layer on `parent`; False when another unpack committed it first."""
        labels = {SNAPSHOT_REF_LABEL: chain_id}
        for attempt in range(1, PREPARE_ATTEMPTS + 1):
            key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain_id}"
            try:
                mounts = await self.snapshots.prepare(key, parent, labels, lease=lease)
            except ContainerdError as err:
                if err.status is not Status.ALREADY_EXISTS:
                    raise
                if await self.committed(chain_id):
                    return False
                if attempt == PREPARE_ATTEMPTS:
                    raise
                continue
            break
        try:
            started = time.monotonic()
            applied = await self.diff.apply(
                ctypes.Descriptor(
                    media_type=layer.media_type,
                    digest=layer.digest,
                    size=layer.size,
                    annotations=dict(layer.annotations),
                ),
                mounts,
            )
            if applied != diff_id:
                raise LayerMismatchError(
                    f"layer {layer.digest} unpacked to {applied or 'nothing'}, but the image "
                    f"config says its diff id is {diff_id}"
                )
            try:
                await self.snapshots.commit(chain_id, key, labels, lease=lease)
            except ContainerdError as err:
                if err.status is not Status.ALREADY_EXISTS:
                    raise
                await self._remove(key)
                return False
        except BaseException:
            # Never leave an active extraction snapshot behind, even when cancelled.
            await asyncio.shield(self._remove(key))
            raise
        log_event(
            log,
            "unpacked layer",
            level=logging.DEBUG,
            layer=layer.digest,
            chain_id=chain_id,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return True


__all__ = ["SNAPSHOTTER", "LayerMismatchError", "Unpacker"]
