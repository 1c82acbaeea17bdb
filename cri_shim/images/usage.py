"""Image filesystem usage for ImageFsInfo, as containerd's CRI plugin reports it:
the sum of the snapshotter's snapshot usages, on the snapshotter's root.

Committed snapshots never change, so their usage is asked once and cached;
active ones (container writable layers) are asked every time. Answers are
reused for a couple of seconds because kubelet's eviction manager and stats
loop both ask about every ten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from grpclib.const import Status

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.introspection import Introspection
from cri_shim.containerd.snapshots import Snapshots
from cri_shim.errors import ContainerdError
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

SNAPSHOTTER_PLUGIN_TYPE = "io.containerd.snapshotter.v1"
CACHE_SECONDS = 2.0
CONCURRENT_USAGE_CALLS = 8


@dataclass(frozen=True)
class FsUsage:
    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


class SnapshotUsage:
    def __init__(self, client: ContainerdClient, snapshotter: str) -> None:
        self.client = client
        self.snapshotter = snapshotter
        self.snapshots = Snapshots(client, snapshotter)
        self._root = ""
        self._committed: dict[str, tuple[int, int]] = {}
        self._last: FsUsage | None = None
        self._last_at = 0.0
        self._lock = asyncio.Lock()

    async def mountpoint(self) -> str:
        """The snapshotter's root directory, from containerd's introspection service."""
        if self._root:
            return self._root
        plugins = await Introspection(self.client).plugins(
            f'type=="{SNAPSHOTTER_PLUGIN_TYPE}",id=="{self.snapshotter}"'
        )
        for plugin in plugins:
            root = plugin.exports.get("root", "")
            if root:
                self._root = root
                return root
        log_event(
            log,
            "snapshotter exports no root directory",
            level=logging.WARNING,
            snapshotter=self.snapshotter,
        )
        return ""

    async def _usage(self, key: str) -> tuple[int, int]:
        try:
            return await self.snapshots.usage(key)
        except ContainerdError as err:
            if err.status is Status.NOT_FOUND:
                return 0, 0  # removed since it was listed
            raise

    async def usage(self) -> FsUsage:
        async with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last_at < CACHE_SECONDS:
                return self._last
            mountpoint = await self.mountpoint()
            infos = await self.snapshots.all()
            semaphore = asyncio.Semaphore(CONCURRENT_USAGE_CALLS)
            committed: dict[str, tuple[int, int]] = {}

            async def one(info: snapshots_v1.Info) -> tuple[int, int]:
                is_committed = info.kind == snapshots_v1.Kind.COMMITTED
                if is_committed and info.name in self._committed:
                    committed[info.name] = self._committed[info.name]
                    return committed[info.name]
                async with semaphore:
                    found = await self._usage(info.name)
                if is_committed:
                    committed[info.name] = found
                return found

            results = await asyncio.gather(*(one(info) for info in infos))
            self._committed = committed
            self._last = FsUsage(
                mountpoint=mountpoint,
                used_bytes=sum(size for size, _ in results),
                inodes_used=sum(inodes for _, inodes in results),
                timestamp_ns=time.time_ns(),
            )
            self._last_at = time.monotonic()
            return self._last


__all__ = ["FsUsage", "SnapshotUsage"]
