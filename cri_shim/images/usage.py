"""Snapshot usage, the one cache of it: ImageFsInfo (the sum over the
snapshotter's snapshots, on its root, as containerd's CRI reports it) and the
writable layers of the container stats.

Committed snapshots never change, so their usage is asked once. An active one
(a container's writable layer) is asked at most once per STATS_COLLECT_PERIOD,
whoever asks: containerd's CRI refreshes its snapshot usage on that period
too, and kubelet's stats (ListContainerStats, then the same containers in
ListPodSandboxStats) and ImageFsInfo all come every ten seconds. Each
Snapshots.Usage is a round trip from Python, the largest part of a full node's
stats round.
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
# containerd's CRI `stats_collect_period` default.
STATS_COLLECT_PERIOD = 10.0
# Snapshots.Usage walks a writable layer in containerd: bound how many walk at once.
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
        # Active snapshot key -> (when taken, monotonic; its usage, None: missing).
        self._active: dict[str, tuple[float, tuple[int, int] | None]] = {}
        self._calls = asyncio.Semaphore(CONCURRENT_USAGE_CALLS)
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

    async def _usage(self, key: str) -> tuple[int, int] | None:
        try:
            async with self._calls:
                return await self.snapshots.usage(key)
        except ContainerdError as err:
            if err.status is Status.NOT_FOUND:
                return None  # removed since it was listed
            raise

    async def of(self, key: str) -> tuple[int, int] | None:
        """(bytes, inodes) of one active snapshot (a writable layer, keyed by its
        container's id), taken within the last STATS_COLLECT_PERIOD; None when
        there is no such snapshot."""
        taken = self._active.get(key)
        if taken is not None and time.monotonic() - taken[0] < STATS_COLLECT_PERIOD:
            return taken[1]
        found = await self._usage(key)
        self._active[key] = (time.monotonic(), found)
        return found

    async def usage(self) -> FsUsage:
        async with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last_at < STATS_COLLECT_PERIOD:
                return self._last
            mountpoint = await self.mountpoint()
            infos = await self.snapshots.all()
            committed: dict[str, tuple[int, int]] = {}

            async def one(info: snapshots_v1.Info) -> tuple[int, int]:
                if info.kind != snapshots_v1.Kind.COMMITTED:
                    return await self.of(info.name) or (0, 0)
                known = self._committed.get(info.name)
                found = known if known is not None else await self._usage(info.name)
                if found is None:
                    return 0, 0
                committed[info.name] = found
                return found

            results = await asyncio.gather(*(one(info) for info in infos))
            self._committed = committed
            # Layers of containers that are gone: the walk saw every snapshot.
            listed = {info.name for info in infos}
            for gone in [key for key in self._active if key not in listed]:
                del self._active[gone]
            self._last = FsUsage(
                mountpoint=mountpoint,
                used_bytes=sum(size for size, _ in results),
                inodes_used=sum(inodes for _, inodes in results),
                timestamp_ns=time.time_ns(),
            )
            self._last_at = time.monotonic()
            return self._last


__all__ = ["FsUsage", "SnapshotUsage"]
