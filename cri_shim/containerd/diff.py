"""containerd's Diff service, typed: the one place its requests are built.

Image layer extraction (`images/unpack.py`) applies a layer blob from the
content store into a prepared snapshot's mounts here.
"""

from __future__ import annotations

from cri_shim.containerd.client import ContainerdClient
from cri_shim.gen.containerd import types as ctypes
from cri_shim.gen.containerd.services.diff import v1 as diff_v1


class Diff:
    def __init__(self, client: ContainerdClient) -> None:
        self.client = client

    async def apply(self, layer: ctypes.Descriptor, mounts: list[ctypes.Mount]) -> str:
        """Unpack `layer` into `mounts`; the digest of what was applied (uncompressed)."""
        reply = await self.client.call(
            "Diff.Apply", self.client.diff.apply(diff_v1.ApplyRequest(diff=layer, mounts=mounts))
        )
        return reply.applied.digest if reply.applied is not None else ""
