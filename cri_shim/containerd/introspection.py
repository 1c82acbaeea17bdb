"""containerd's Introspection service, typed: the one place its requests are built.

`cri-shim check` asks whether the snapshotter loaded, image usage asks where
its root directory is; both read the plugin list here.
"""

from __future__ import annotations

from cri_shim.containerd.client import ContainerdClient
from cri_shim.gen.containerd.services.introspection import v1 as introspection_v1


class Introspection:
    def __init__(self, client: ContainerdClient) -> None:
        self.client = client

    async def plugins(
        self, *filters: str, timeout: float | None = None
    ) -> list[introspection_v1.Plugin]:
        """The plugins matching any of `filters` (containerd's filter syntax)."""
        reply = await self.client.call(
            "Introspection.Plugins",
            self.client.introspection.plugins(
                introspection_v1.PluginsRequest(filters=list(filters)), timeout=timeout
            ),
        )
        return list(reply.plugins)
