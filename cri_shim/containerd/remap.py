"""Root filesystems for pods with their own user namespace.

As containerd 2.x's client does (`WithRemapperLabels`, `resolveSnapshotOptions`):
a snapshotter that advertises `remap-ids` (containerd 2.x's overlayfs on a
kernel with id-mapped overlay layers) gets the mapping as snapshot labels and
returns id-mapped mounts; any other (containerd 1.6/1.7) gets a copy of the
image's chain chowned into the mapped range once per image and mapping, then
committed and used as the parent of every such container's snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import stat
import tempfile
from dataclasses import dataclass

from grpclib.const import Status

from cri_shim.containerd.snapshots import Snapshots
from cri_shim.errors import ContainerdError
from cri_shim.gen.containerd.types import Mount
from cri_shim.keyed_locks import KeyedLocks
from cri_shim.logs import log_event
from cri_shim.oci.userns import PodUserns

log = logging.getLogger(__name__)

UID_MAPPING_LABEL = "containerd.io/snapshot/uidmapping"
GID_MAPPING_LABEL = "containerd.io/snapshot/gidmapping"
REMAP_CAPABILITY = "remap-ids"
MNT_DETACH = 0x2
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class RemappedRootfs:
    """The parent to prepare on and the labels to prepare with."""

    parent: str
    labels: dict[str, str]


def remap_labels(userns: PodUserns) -> dict[str, str]:
    return {UID_MAPPING_LABEL: userns.uids.label(), GID_MAPPING_LABEL: userns.gids.label()}


def remapped_name(parent: str, userns: PodUserns) -> str:
    return f"{parent}-userns-{userns.uids.label()}-{userns.gids.label()}"


def _mount_options(mount: Mount) -> tuple[int, str]:
    """MS_* flags and the data string of a snapshot mount (overlay or bind)."""
    flags = 0
    data: list[str] = []
    for option in mount.options:
        if option in ("bind", "rbind"):
            flags |= 0x1000 | (0x4000 if option == "rbind" else 0)
        elif option == "rw":
            continue
        elif option == "ro":
            flags |= 0x1
        else:
            data.append(option)
    if mount.type == "bind":
        flags |= 0x1000
    return flags, ",".join(data)


def _chown_tree(root: str, userns: PodUserns) -> int:
    """Shift every file's owner into the mapped range (symlinks themselves, not
    their targets); the count of entries changed."""
    changed = 0

    def shift(path: str) -> None:
        nonlocal changed
        info = os.lstat(path)
        os.lchown(path, userns.uids.to_host(info.st_uid), userns.gids.to_host(info.st_gid))
        if not stat.S_ISLNK(info.st_mode) and info.st_mode & SPECIAL_BITS:
            # chown clears set-id bits; containerd's remap restores them.
            os.chmod(path, stat.S_IMODE(info.st_mode))
        changed += 1

    shift(root)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            shift(os.path.join(directory, name))
    return changed


def _chown_mounted(mounts: list[Mount], userns: PodUserns) -> int:
    if len(mounts) != 1:
        raise OSError(f"cannot remap a rootfs of {len(mounts)} mounts")
    mount = mounts[0]
    flags, data = _mount_options(mount)
    with tempfile.TemporaryDirectory(prefix="cri-shim-remap-") as target:
        if (
            _libc.mount(
                mount.source.encode(),
                target.encode(),
                mount.type.encode(),
                ctypes.c_ulong(flags),
                data.encode() or None,
            )
            != 0
        ):
            code = ctypes.get_errno()
            raise OSError(code, f"mount {mount.type} for remapping: {os.strerror(code)}")
        try:
            return _chown_tree(target, userns)
        finally:
            _libc.umount2(target.encode(), ctypes.c_int(MNT_DETACH))


class RootfsRemapper:
    def __init__(self, snapshots: Snapshots, capabilities: tuple[str, ...]) -> None:
        self.snapshots = snapshots
        self.idmapped = REMAP_CAPABILITY in capabilities
        self._locks = KeyedLocks()

    async def _exists(self, key: str) -> bool:
        try:
            return await self.snapshots.stat(key) is not None
        except ContainerdError as err:
            if err.status is Status.NOT_FOUND:
                return False
            raise

    async def resolve(self, parent: str, userns: PodUserns, lease: str) -> RemappedRootfs:
        if self.idmapped:
            return RemappedRootfs(parent, remap_labels(userns))
        name = remapped_name(parent, userns)
        async with self._locks.hold(name):
            if await self._exists(name):
                return RemappedRootfs(name, {})
            work_key = f"{name}-remap"
            with contextlib.suppress(ContainerdError):
                await self.snapshots.remove(work_key)  # left by a killed shim
            mounts = await self.snapshots.prepare(work_key, parent, lease=lease)
            try:
                changed = await asyncio.to_thread(_chown_mounted, mounts, userns)
                await self.snapshots.commit(name, work_key, lease=lease)
            except BaseException:
                with contextlib.suppress(ContainerdError):
                    await asyncio.shield(self.snapshots.remove(work_key))
                raise
        log_event(log, "rootfs remapped for user namespace", snapshot=name, files=changed)
        return RemappedRootfs(name, {})


__all__ = ["RemappedRootfs", "RootfsRemapper", "remap_labels", "remapped_name"]
