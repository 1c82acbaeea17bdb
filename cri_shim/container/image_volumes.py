"""CRI image volumes (`Mount.image`): an OCI image's filesystem mounted read-only.

As containerd 2.x's CRI does: the image must already be pulled (no pull here;
kubelet pulls it first), a snapshot of its chain is mounted at a host path
under the state dir and that path becomes the mount's host_path, so the
container gets an ordinary read-only bind of it; `image_sub_path` picks a
directory inside the image, resolved without leaving the image's root.

Unlike containerd (one mount per pod and image, released at StopPodSandbox),
each container gets its own read-only *view* snapshot, released when the
container is removed: nothing outlives the container that uses it, and a
shim restart sweeps what a killed shim left (`sweep`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.snapshots import Snapshots
from cri_shim.errors import ContainerdError, failed_precondition, invalid_argument, not_found
from cri_shim.gen.containerd.types import Mount
from cri_shim.gen.runtime import v1 as cri
from cri_shim.images.store import ImageStore
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

# crierrors.ErrImageVolumeMountFailed: kubelet and containerd name the failure so.
MOUNT_FAILED = "ImageVolumeMountFailed"
GC_ROOT_LABEL = "containerd.io/gc.root"
CONTAINER_LABEL = "io.cri-shim.image-volume.container"
MAX_SYMLINKS = 40

# <sys/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2
_FLAG_OPTIONS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
}
_IGNORED_OPTIONS = frozenset({"rw", "defaults"})

_libc = ctypes.CDLL(None, use_errno=True)


class ImageVolumeError(OSError):
    pass


def _mount_one(mount: Mount, target: Path) -> None:
    flags = 0
    data: list[str] = []
    for option in mount.options:
        if option in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[option]
        elif option not in _IGNORED_OPTIONS:
            data.append(option)
    source = mount.source.encode()
    fstype = mount.type.encode() if not flags & MS_BIND else None
    payload = ",".join(data).encode() or None
    if _libc.mount(source, bytes(target), fstype, ctypes.c_ulong(flags), payload) != 0:
        code = ctypes.get_errno()
        raise ImageVolumeError(code, f"mount {mount.type} at {target}: {os.strerror(code)}")
    if flags & MS_BIND and flags & MS_RDONLY:
        # A bind ignores MS_RDONLY on the first call: a remount makes it read-only.
        remount = ctypes.c_ulong(MS_REMOUNT | MS_BIND | MS_RDONLY | (flags & MS_REC))
        if _libc.mount(None, bytes(target), None, remount, None) != 0:
            code = ctypes.get_errno()
            _libc.umount2(bytes(target), ctypes.c_int(MNT_DETACH))
            raise ImageVolumeError(code, f"remount {target} read-only: {os.strerror(code)}")


def _is_mountpoint(target: Path) -> bool:
    wanted = str(target)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == wanted for line in mounts)


def _unmount_all(target: Path) -> None:
    while _is_mountpoint(target):
        if _libc.umount2(bytes(target), ctypes.c_int(MNT_DETACH)) != 0:
            code = ctypes.get_errno()
            if code in (errno.EINVAL, errno.ENOENT):
                return
            raise ImageVolumeError(code, f"unmount {target}: {os.strerror(code)}")


def resolve_in_root(root: Path, sub_path: str) -> Path:
    """`sub_path` inside `root`, symlinks resolved as if `root` were `/` (Go's
    os.OpenInRoot): an image's absolute links never reach the host. Must be a dir."""
    parts = [p for p in sub_path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            links += 1
            if links > MAX_SYMLINKS:
                raise ImageVolumeError(errno.ELOOP, f"too many links in {sub_path!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        if not candidate.exists():
            raise ImageVolumeError(errno.ENOENT, f"{'/'.join([*resolved, part])!r} does not exist")
        resolved.append(part)
    final = root.joinpath(*resolved)
    if not final.is_dir():
        raise ImageVolumeError(errno.ENOTDIR, f"not a directory: {sub_path!r}")
    return final


class ImageVolumes:
    """Mounts the image volumes of containers under `<state_dir>/image-volumes/<id>/`."""

    def __init__(self, client: ContainerdClient, images: ImageStore, state_dir: Path) -> None:
        self.snapshots = Snapshots(client)
        self.images = images
        self.root = state_dir / "image-volumes"
        self._swept = False

    def _dir(self, container_id: str) -> Path:
        return self.root / container_id

    @staticmethod
    def wanted(config: cri.ContainerConfig) -> list[cri.Mount]:
        return [m for m in config.mounts if m.image is not None and m.image.image]

    async def attach(self, container_id: str, config: cri.ContainerConfig) -> None:
        """Mount each image volume of `config` and point its host_path at it (the
        config is changed in place, so ContainerStatus shows it as containerd does)."""
        mounts = self.wanted(config)
        if not mounts:
            return
        try:
            for mount in mounts:
                await self._attach_one(container_id, mount)
        except BaseException:
            await asyncio.shield(self.release(container_id))
            raise

    async def _attach_one(self, container_id: str, mount: cri.Mount) -> None:
        spec = mount.image or cri.ImageSpec()
        where = f"{MOUNT_FAILED}: image volume at {mount.container_path!r}"
        if mount.host_path:
            raise invalid_argument(f"{where}: host_path must be empty for an image mount")
        if not mount.readonly:
            raise invalid_argument(f"{where}: readonly must be true for an image mount")
        if mount.uid_mappings or mount.gid_mappings:
            raise invalid_argument(f"{where}: id-mapped image mounts are not supported")
        image = self.images.get(spec.image)
        if image is None:
            raise not_found(f"{where}: image {spec.image!r} not found; pull it first")
        if not image.chain_id:
            raise failed_precondition(f"{where}: image {image.id} has no layers")
        target = self._dir(container_id) / image.id.removeprefix("sha256:")
        if not await asyncio.to_thread(_is_mountpoint, target):
            await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
            snapshot_mounts = await self._view(str(target), image.chain_id, container_id)
            try:
                for snapshot_mount in snapshot_mounts:
                    await asyncio.to_thread(_mount_one, snapshot_mount, target)
            except ImageVolumeError as err:
                raise failed_precondition(f"{where}: {err.strerror}") from err
        host_path = target
        if mount.image_sub_path:
            try:
                host_path = await asyncio.to_thread(resolve_in_root, target, mount.image_sub_path)
            except OSError as err:
                raise invalid_argument(
                    f"{where}: image_sub_path {mount.image_sub_path!r}: {err.strerror or err}"
                ) from err
        mount.host_path = str(host_path)
        # KEP-5365: the node-local image id the volume was made of.
        spec.image_ref = image.id
        log_event(
            log, "image volume mounted", container=container_id, image=image.id, path=str(host_path)
        )

    async def _view(self, key: str, parent: str, container_id: str) -> list[Mount]:
        """A read-only snapshot of the image, kept from GC by its root label until
        `release` removes it; one left by an interrupted attach is reused."""
        labels = {
            GC_ROOT_LABEL: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            CONTAINER_LABEL: container_id,
        }
        try:
            return await self.snapshots.view(key, parent, labels)
        except ContainerdError as err:
            if err.status is not Status.ALREADY_EXISTS:
                raise
        return await self.snapshots.mounts(key)

    async def release(self, container_id: str) -> None:
        """Unmount and remove every image volume of the container (idempotent)."""
        directory = self._dir(container_id)
        entries = await asyncio.to_thread(_entries, directory)
        for target in entries:
            await asyncio.to_thread(_unmount_all, target)
            try:
                await self.snapshots.remove(str(target))
            except ContainerdError as err:
                if err.status is not Status.NOT_FOUND:
                    raise
            await asyncio.to_thread(_remove_dir, target)
            log_event(log, "image volume released", container=container_id, path=str(target))
        await asyncio.to_thread(_remove_dir, directory)

    async def sweep(self, known: Iterable[str]) -> int:
        """At start-up: release the volumes of containers that no longer exist
        (a shim killed between create and remove, or a failed create). Only once:
        a later resync (containerd reconnecting) may overlap a create in flight."""
        if self._swept:
            return 0
        self._swept = True
        keep = set(known)
        names = await asyncio.to_thread(_entries, self.root)
        stale = [path.name for path in names if path.name not in keep]
        for container_id in stale:
            try:
                await self.release(container_id)
            except (OSError, ContainerdError, GRPCError) as err:
                log_event(
                    log,
                    "stale image volume not released",
                    level=logging.WARNING,
                    container=container_id,
                    error=str(err),
                )
        return len(stale)


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []


def _remove_dir(path: Path) -> None:
    """rmdir only: an unmounted mount point is empty, and a mounted one must stay."""
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


__all__ = ["MOUNT_FAILED", "ImageVolumes", "resolve_in_root"]
