"""containerd's Leases service, typed: the one place its requests are built.

A lease holds what it references (content, snapshots, ingests) out of
containerd's garbage collector; `EXPIRE_LABEL` makes one a crashed shim left
behind go away by itself. Container creation (`RuntimeOps.creation_lease`)
and image pulls (`images/lease.py`) both take theirs here.
"""

from __future__ import annotations

import contextlib
import datetime
import secrets
from collections.abc import AsyncIterator

from cri_shim.containerd.client import ContainerdClient
from cri_shim.errors import ContainerdError, ContainerdUnavailable
from cri_shim.gen.containerd.services.leases import v1 as leases_v1

EXPIRE_LABEL = "containerd.io/gc.expire"


def expires_in(delta: datetime.timedelta) -> dict[str, str]:
    """The label that makes containerd drop the lease `delta` from now."""
    moment = datetime.datetime.now(datetime.UTC) + delta
    return {EXPIRE_LABEL: moment.strftime("%Y-%m-%dT%H:%M:%SZ")}


class Leases:
    def __init__(self, client: ContainerdClient) -> None:
        self.client = client

    async def create(self, lease_id: str, labels: dict[str, str]) -> None:
        await self.client.call(
            "Leases.Create",
            self.client.leases.create(leases_v1.CreateRequest(id=lease_id, labels=labels)),
        )

    @contextlib.asynccontextmanager
    async def held(self, prefix: str, expiry: datetime.timedelta) -> AsyncIterator[str]:
        """A new lease `<prefix><random>` for the block's duration; it expires by
        itself after `expiry` if the shim dies holding it."""
        lease_id = f"{prefix}{secrets.token_hex(8)}"
        await self.create(lease_id, expires_in(expiry))
        try:
            yield lease_id
        finally:
            with contextlib.suppress(ContainerdError, ContainerdUnavailable):
                await self.delete(lease_id)

    async def delete(self, lease_id: str, *, sync: bool = False) -> None:
        """`sync`: return only once what the lease alone held is collected."""
        await self.client.call(
            "Leases.Delete",
            self.client.leases.delete(leases_v1.DeleteRequest(id=lease_id, sync=sync)),
        )

    async def add_resource(self, lease_id: str, resource_id: str, resource_type: str) -> None:
        await self.client.call(
            "Leases.AddResource",
            self.client.leases.add_resource(
                leases_v1.AddResourceRequest(
                    id=lease_id, resource=leases_v1.Resource(id=resource_id, type=resource_type)
                )
            ),
        )

    async def resources(self, lease_id: str) -> list[leases_v1.Resource]:
        reply = await self.client.call(
            "Leases.ListResources",
            self.client.leases.list_resources(leases_v1.ListResourcesRequest(id=lease_id)),
        )
        return list(reply.resources)

    async def ids(self, *filters: str) -> list[str]:
        """Ids of the leases matching any of `filters` (all leases without one)."""
        reply = await self.client.call(
            "Leases.List", self.client.leases.list(leases_v1.ListRequest(filters=list(filters)))
        )
        return [lease.id for lease in reply.leases]
