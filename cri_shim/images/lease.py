"""The containerd lease a pull runs under.

Everything a pull creates (ingests, blobs, snapshots) is referenced by the
lease until the image records and GC labels reference it instead, so
containerd's garbage collector cannot remove half of an image mid-pull.
Blobs and snapshots that already existed are added to the lease explicitly
for the same reason. The lease carries its own expiry, so one left behind by
a crashed shim goes away by itself.
"""

from __future__ import annotations

import datetime
import logging
import secrets

from grpclib.const import Status

from cri_shim.containerd.client import ContainerdClient
from cri_shim.errors import ContainerdError, ContainerdUnavailable
from cri_shim.gen.containerd.services.leases import v1 as leases_v1
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

EXPIRE_LABEL = "containerd.io/gc.expire"
# Which reference a pull lease is for: a successful pull drops the leases its
# failed predecessors kept for resuming.
PULL_LABEL = "io.cri-shim.pull"
# containerd's client uses 24h for pull leases, and keeps unleased ingests as long.
DEFAULT_EXPIRY = datetime.timedelta(hours=24)


class PullLease:
    def __init__(
        self, client: ContainerdClient, *, expiry: datetime.timedelta = DEFAULT_EXPIRY
    ) -> None:
        self.client = client
        self.expiry = expiry
        self.id = ""
        # Set when a download stopped half-way: the lease then outlives the failed
        # pull (until it expires) so the next attempt resumes the partial ingest,
        # which containerd would otherwise collect together with the lease.
        self.keep = False
        self.ref = ""

    async def create(self, ref: str) -> str:
        expires = datetime.datetime.now(datetime.UTC) + self.expiry
        lease_id = f"cri-shim-pull-{secrets.token_hex(8)}"
        await self.client.call(
            "Leases.Create",
            self.client.leases.create(
                leases_v1.CreateRequest(
                    id=lease_id,
                    labels={
                        EXPIRE_LABEL: expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        PULL_LABEL: ref[:4000],
                    },
                )
            ),
        )
        self.id = lease_id
        self.ref = ref
        return lease_id

    async def add(self, resource_id: str, resource_type: str) -> None:
        """Hold an object that existed before the pull (`content`, `snapshots/overlayfs`)."""
        await self.client.call(
            "Leases.AddResource",
            self.client.leases.add_resource(
                leases_v1.AddResourceRequest(
                    id=self.id,
                    resource=leases_v1.Resource(id=resource_id, type=resource_type),
                )
            ),
        )

    async def release(self, *, failed: bool) -> None:
        """Delete the lease, unless a failed pull left partial downloads worth resuming."""
        if not self.id:
            return
        if failed and self.keep:
            log_event(
                log,
                "keeping pull lease for resuming partial downloads",
                level=logging.DEBUG,
                lease=self.id,
            )
            return
        stale: list[str] = []
        if not failed:
            stale = await self._kept_for(self.ref)
        for lease_id in [self.id, *stale]:
            await self._delete(lease_id)
        self.id = ""

    async def _kept_for(self, ref: str) -> list[str]:
        """Leases earlier failed pulls of `ref` kept; what they held is pulled now."""
        quoted = ref.replace("\\", "\\\\").replace('"', '\\"')
        try:
            reply = await self.client.call(
                "Leases.List",
                self.client.leases.list(
                    leases_v1.ListRequest(filters=[f'labels."{PULL_LABEL}"=="{quoted}"'])
                ),
            )
        except (ContainerdError, ContainerdUnavailable) as err:
            log_event(log, "could not list pull leases", level=logging.WARNING, error=str(err))
            return []
        return [lease.id for lease in reply.leases if lease.id != self.id]

    async def _delete(self, lease_id: str) -> None:
        try:
            await self.client.call(
                "Leases.Delete", self.client.leases.delete(leases_v1.DeleteRequest(id=lease_id))
            )
        except (ContainerdError, ContainerdUnavailable) as err:
            if isinstance(err, ContainerdError) and err.status is Status.NOT_FOUND:
                return
            log_event(
                log,
                "could not delete pull lease; it expires by itself",
                level=logging.WARNING,
                lease=lease_id,
                error=str(err),
            )


__all__ = ["EXPIRE_LABEL", "PullLease"]
