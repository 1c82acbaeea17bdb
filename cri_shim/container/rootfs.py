"""Reading files of a container's image without mounting it.

User names in USER or run_as_username are resolved through the image's
/etc/passwd and /etc/group. The overlayfs snapshot's mount options already
name its layer directories (upper first, then lowers top-down), so the files
can be read straight from them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from cri_shim.gen.containerd.types import Mount

MAX_FILE_BYTES = 1024 * 1024


def layer_dirs(mounts: list[Mount]) -> list[Path]:
    """Directories to search, highest layer first."""
    dirs: list[Path] = []
    for mount in mounts:
        if mount.type == "bind":
            dirs.append(Path(mount.source))
            continue
        upper = [o.split("=", 1)[1] for o in mount.options if o.startswith("upperdir=")]
        lower = [o.split("=", 1)[1] for o in mount.options if o.startswith("lowerdir=")]
        dirs += [Path(p) for p in upper]
        for entry in lower:
            dirs += [Path(p) for p in entry.split(":") if p]
    return dirs


def _read(dirs: list[Path], relative: str) -> str | None:
    for directory in dirs:
        candidate = directory / relative
        if candidate.is_symlink():
            return None  # never follow links out of the layer
        if candidate.is_file():
            with candidate.open("rb") as handle:
                return handle.read(MAX_FILE_BYTES).decode(errors="replace")
    return None


async def read_image_file(mounts: list[Mount], path: str) -> str | None:
    """The text of `path` (e.g. /etc/passwd) in the snapshot, or None if absent."""
    return await asyncio.to_thread(_read, layer_dirs(mounts), path.lstrip("/"))


class ImageUsers:
    """(passwd, group) texts per image chain id, at most `limit` images (oldest dropped)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._by_chain: dict[str, tuple[str | None, str | None]] = {}

    def get(self, chain_id: str) -> tuple[str | None, str | None] | None:
        return self._by_chain.get(chain_id)

    async def read(self, chain_id: str, mounts: list[Mount]) -> tuple[str | None, str | None]:
        """Both files from a fresh snapshot of the image, in one thread hop; remembered."""
        dirs = layer_dirs(mounts)
        found = await asyncio.to_thread(
            lambda: (_read(dirs, "etc/passwd"), _read(dirs, "etc/group"))
        )
        if chain_id:
            if len(self._by_chain) >= self.limit:
                del self._by_chain[next(iter(self._by_chain))]
            self._by_chain[chain_id] = found
        return found
