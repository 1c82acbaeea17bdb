"""Snapshot usage, the one cache of it: ImageFsInfo (the sum over the
snapshotter's snapshots, on its root, as containerd's CRI reports it) and the
writable layers of the container stats.

Committed snapshots never change, so their usage is asked once. An active one
(a container's writable layer) is asked at most once per STATS_COLLECT_PERIOD,
whoever asks: containerd's CRI refreshes its snapshot usage on that period
too, and kubelet's stats (ListContainerStats, then the same containers in
ListPodSandboxStats) and ImageFsInfo all come every ten seconds. Each
Snapshots.Usage is a round trip from Python, and they were the largest part
of a full node's stats round; so an active overlay snapshot whose upper
directory this process can read is measured here instead, the way containerd's
overlay snapshotter measures it (`disk_usage`), all of one round's layers in
one worker-thread trip. Others (another snapshotter, a root not visible from a
container) are asked of containerd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from grpclib.const import Status

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.introspection import Introspection
from cri_shim.containerd.snapshots import Snapshots
from cri_shim.errors import ContainerdError
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.gen.containerd.types import Mount
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

SNAPSHOTTER_PLUGIN_TYPE = "io.containerd.snapshotter.v1"
# containerd's CRI `stats_collect_period` default.
STATS_COLLECT_PERIOD = 10.0
# Snapshots.Usage walks a writable layer in containerd: bound how many walk at once.
CONCURRENT_USAGE_CALLS = 8


def disk_usage(root: str) -> tuple[int, int] | None:
    """(bytes, inodes) under `root` as containerd's fs.DiskUsage counts them for an
    overlay snapshot's upper directory: every inode once (hard links too), the
    root included, bytes as allocated blocks of 512; symlinks not followed. A
    file that goes away during the walk is skipped; None when `root` is gone.
    Blocking: for a worker thread."""
    try:
        top = os.lstat(root)
    except FileNotFoundError:
        return None
    seen = {(top.st_dev, top.st_ino)}
    size = top.st_blocks * 512
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
                is_dir = entry.is_dir(follow_symlinks=False)
            except FileNotFoundError:
                continue
            inode = (info.st_dev, info.st_ino)
            if inode not in seen:
                seen.add(inode)
                size += info.st_blocks * 512
            if is_dir:
                pending.append(entry.path)
    return size, len(seen)


def upper_directory(mounts: Iterable[Mount]) -> str | None:
    """Where an active snapshot's own files are: an overlay's upperdir, or the
    source of a read-write bind (an active snapshot without parents). None for
    anything else (a view, another snapshotter's mount)."""
    for mount in mounts:
        if mount.type == "overlay":
            for option in mount.options:
                if option.startswith("upperdir="):
                    return option.removeprefix("upperdir=")
        elif mount.type == "bind" and "rw" in mount.options:
            return mount.source
    return None


def measure(uppers: dict[str, str]) -> dict[str, tuple[int, int] | None]:
    """disk_usage of several upper directories, keyed as given (one thread trip)."""
    return {key: disk_usage(path) for key, path in uppers.items()}


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
        # Active snapshot key -> its upper directory, readable here; None: ask containerd.
        self._uppers: dict[str, str | None] = {}
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

    async def _upper(self, key: str) -> str | None:
        """The snapshot's upper directory when this process can read it (learned once
        per snapshot: it never moves)."""
        if key in self._uppers:
            return self._uppers[key]
        try:
            async with self._calls:
                mounts = await self.snapshots.mounts(key)
        except ContainerdError as err:
            if err.status is Status.NOT_FOUND:
                return None
            raise
        upper = upper_directory(mounts)
        if upper is not None and not await asyncio.to_thread(os.path.isdir, upper):
            upper = None  # containerd's paths are not this process's (a container)
        self._uppers[key] = upper
        return upper

    async def of_many(self, keys: Iterable[str]) -> dict[str, tuple[int, int] | None]:
        """(bytes, inodes) of active snapshots (writable layers, keyed by their
        container's id), each taken within the last STATS_COLLECT_PERIOD; None for
        a key with no such snapshot."""
        now = time.monotonic()
        found: dict[str, tuple[int, int] | None] = {}
        stale: list[str] = []
        for key in keys:
            taken = self._active.get(key)
            if taken is not None and now - taken[0] < STATS_COLLECT_PERIOD:
                found[key] = taken[1]
            else:
                stale.append(key)
        if not stale:
            return found
        uppers = dict(
            zip(stale, await asyncio.gather(*(self._upper(k) for k in stale)), strict=True)
        )
        local = {key: path for key, path in uppers.items() if path is not None}
        measured = await asyncio.to_thread(measure, local) if local else {}
        remote = [key for key in stale if key not in local]
        measured.update(
            zip(remote, await asyncio.gather(*(self._usage(k) for k in remote)), strict=True)
        )
        taken_at = time.monotonic()
        for key, usage in measured.items():
            if usage is None:
                self._uppers.pop(key, None)
            self._active[key] = (taken_at, usage)
        found.update(measured)
        return found

    async def of(self, key: str) -> tuple[int, int] | None:
        """of_many for one snapshot."""
        return (await self.of_many([key]))[key]

    async def usage(self) -> FsUsage:
        async with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last_at < STATS_COLLECT_PERIOD:
                return self._last
            mountpoint = await self.mountpoint()
            infos = await self.snapshots.all()
            committed: dict[str, tuple[int, int]] = {}

            active = await self.of_many(
                info.name for info in infos if info.kind == snapshots_v1.Kind.ACTIVE
            )

            async def one(info: snapshots_v1.Info) -> tuple[int, int]:
                if info.kind == snapshots_v1.Kind.ACTIVE:
                    return active[info.name] or (0, 0)
                if info.kind != snapshots_v1.Kind.COMMITTED:
                    return await self._usage(info.name) or (0, 0)  # a view
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
                self._uppers.pop(gone, None)
            self._last = FsUsage(
                mountpoint=mountpoint,
                used_bytes=sum(size for size, _ in results),
                inodes_used=sum(inodes for _, inodes in results),
                timestamp_ns=time.time_ns(),
            )
            self._last_at = time.monotonic()
            return self._last


__all__ = ["FsUsage", "SnapshotUsage"]
