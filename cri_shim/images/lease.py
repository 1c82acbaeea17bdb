"""The containerd lease a pull runs under.

Everything a pull creates (ingests, blobs, snapshots) is referenced by the
lease until the image records and GC labels reference it instead, so
containerd's garbage collector cannot remove half of an image mid-pull.
Blobs and snapshots that already existed are added to the lease explicitly
for the same reason. Leases carry their own expiry, so one left behind by a
crashed shim goes away by itself.

A download that stops half-way leaves a partial ingest that containerd would
collect together with the lease. So a failed pull hands what its lease holds
to a separate *resume* lease (labelled with the reference) and the next pull
of that reference resumes the ingest; once one succeeds, the resume leases of
its reference are dropped. Pull leases themselves are never touched by other
pulls, so runtimes sharing a containerd cannot pull the ground from under
each other.
"""

from __future__ import annotations

import datetime
import logging
import secrets

from grpclib.const import Status

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.leases import EXPIRE_LABEL, Leases, expires_in
from cri_shim.errors import ContainerdError, ContainerdUnavailable
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

PULL_LABEL = "io.cri-shim.pull"  # the reference a pull lease is for (diagnostics)
RESUME_LABEL = "io.cri-shim.resume"  # the reference whose partial downloads it keeps
# containerd's client uses 24h for pull leases, and keeps unleased ingests as long.
DEFAULT_EXPIRY = datetime.timedelta(hours=24)
MAX_LABEL_VALUE = 4000


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class PullLease:
    def __init__(
        self, client: ContainerdClient, *, expiry: datetime.timedelta = DEFAULT_EXPIRY
    ) -> None:
        self.client = client
        self.leases = Leases(client)
        self.expiry = expiry
        self.id = ""
        self.ref = ""
        # Set when a download stopped half-way with bytes worth resuming.
        self.keep = False

    async def _create(self, prefix: str, labels: dict[str, str]) -> str:
        lease_id = f"{prefix}-{secrets.token_hex(8)}"
        await self.leases.create(lease_id, {**expires_in(self.expiry), **labels})
        return lease_id

    async def create(self, ref: str) -> str:
        self.ref = ref[:MAX_LABEL_VALUE]
        self.id = await self._create("cri-shim-pull", {PULL_LABEL: self.ref})
        return self.id

    async def add(self, resource_id: str, resource_type: str, *, lease: str = "") -> None:
        """Hold an object that existed before the pull (`content`, `snapshots/overlayfs`)."""
        await self.leases.add_resource(lease or self.id, resource_id, resource_type)

    async def release(self, *, failed: bool) -> None:
        """Delete the lease; a failed pull with partial downloads hands them on first,
        a successful one also drops what earlier failures kept for its reference."""
        if not self.id:
            return
        try:
            if failed and self.keep:
                await self._hand_over()
            elif not failed:
                for lease_id in await self._resume_leases():
                    await self._delete(lease_id)
        except (ContainerdError, ContainerdUnavailable) as err:
            log_event(
                log,
                "pull lease bookkeeping failed; leases expire by themselves",
                level=logging.WARNING,
                lease=self.id,
                error=str(err),
            )
        # A failed pull's lease goes synchronously: containerd collects what only it
        # held (the documents already committed) before the error is returned, as
        # a failed pull must leave nothing behind. Without it containerd's GC waits
        # for its next trigger (100 more changes, or someone's synchronous delete).
        await self._delete(self.id, sync=failed)
        self.id = ""

    async def _hand_over(self) -> None:
        resources = await self.leases.resources(self.id)
        resume = await self._create("cri-shim-resume", {RESUME_LABEL: self.ref})
        for resource in resources:
            await self.add(resource.id, resource.type, lease=resume)
        log_event(
            log,
            "kept partial downloads for the next pull",
            level=logging.DEBUG,
            ref=self.ref,
            lease=resume,
            resources=len(resources),
        )

    async def _resume_leases(self) -> list[str]:
        return await self.leases.ids(f'labels."{RESUME_LABEL}"=={_quote(self.ref)}')

    async def _delete(self, lease_id: str, *, sync: bool = False) -> None:
        try:
            await self.leases.delete(lease_id, sync=sync)
        except (ContainerdError, ContainerdUnavailable) as err:
            if isinstance(err, ContainerdError) and err.status is Status.NOT_FOUND:
                return
            log_event(
                log,
                "could not delete lease; it expires by itself",
                level=logging.WARNING,
                lease=lease_id,
                error=str(err),
            )


__all__ = ["EXPIRE_LABEL", "PULL_LABEL", "RESUME_LABEL", "PullLease"]
