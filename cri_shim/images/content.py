"""containerd's content store, as the image code uses it: Info, Read, label
updates, and streaming a blob in through containerd's Write protocol
(`containerd/content.py` speaks it): resume from what a previous attempt
stored, wait for another writer's lock, keep what arrived when the registry
connection breaks, and discard a download that does not match its digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping

from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.containerd.client import LEASE_HEADER, ContainerdClient, metadata_for
from cri_shim.containerd.content import Content, ContentWriter
from cri_shim.errors import ContainerdError, DeadlineExceeded
from cri_shim.gen.containerd.services.content import v1 as content_v1
from cri_shim.logs import log_event
from cri_shim.registry.client import BlobInterruptedError
from cri_shim.registry.errors import DigestMismatchError, PullStalledError
from cri_shim.registry.types import (
    CONFIG_MEDIA_TYPES,
    INDEX_MEDIA_TYPES,
    LAYER_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    Descriptor,
)

log = logging.getLogger(__name__)

# containerd accepts 16 MiB messages; 1 MiB writes keep memory flat and round-trips few.
WRITE_CHUNK = 1 << 20
# A broken registry connection is resumed from containerd's offset this many times.
RESUME_ATTEMPTS = 3

Source = Callable[[int], AsyncIterator[bytes]]
Progress = Callable[[int], None]


def ref_key(desc: Descriptor) -> str:
    """The ingest ref containerd's own puller uses (remotes.MakeRefKey), so a
    concurrent containerd pull of the same blob meets the same lock."""
    media = desc.media_type
    if media in MANIFEST_MEDIA_TYPES:
        kind = "manifest"
    elif media in INDEX_MEDIA_TYPES:
        kind = "index"
    elif media in LAYER_MEDIA_TYPES or ".layer." in media or "rootfs.diff" in media:
        kind = "layer"
    elif media in CONFIG_MEDIA_TYPES:
        kind = "config"
    else:
        kind = "unknown"
    return f"{kind}-{desc.digest}"


class ContentStore:
    """Blob-level operations on containerd's content store for one namespace."""

    def __init__(self, client: ContainerdClient, *, timeout: float) -> None:
        self.content = Content(client)
        # Longest wait for any single containerd answer during a write.
        self.timeout = timeout

    async def info(self, digest: str) -> content_v1.Info | None:
        try:
            return await self.content.info(digest)
        except ContainerdError as err:
            if err.status is Status.NOT_FOUND:
                return None
            raise

    async def read(self, digest: str, *, limit: int) -> bytes:
        """A whole blob (manifests, configs); refuses anything over `limit` bytes."""
        return await self.content.read(digest, limit=limit)

    async def update_labels(
        self, digest: str, labels: Mapping[str, str], *, lease: str | None = None
    ) -> None:
        """Merge `labels` into the blob's labels (containerd's `labels.<key>` field paths)."""
        if not labels:
            return
        await self.content.update_labels(digest, labels, lease=lease)

    async def ensure_labels(
        self, info: content_v1.Info, labels: Mapping[str, str], *, lease: str | None = None
    ) -> None:
        """Add what is missing, merging comma-separated distribution sources."""
        wanted: dict[str, str] = {}
        for key, value in labels.items():
            current = info.labels.get(key)
            if key.startswith(DISTRIBUTION_SOURCE_PREFIX) and current:
                merged = merge_sources(current, value)
                if merged != current:
                    wanted[key] = merged
            elif current != value:
                wanted[key] = value
        await self.update_labels(info.digest, wanted, lease=lease)

    async def abort(self, ref: str) -> None:
        try:
            await self.content.abort(ref)
        except ContainerdError as err:
            if err.status is not Status.NOT_FOUND:
                raise

    async def write(
        self,
        desc: Descriptor,
        source: Source,
        *,
        labels: Mapping[str, str],
        lease: str | None,
        progress: Progress | None = None,
    ) -> bool:
        """Stream `desc`'s bytes from `source(offset)` into containerd and commit them.

        Resumes from whatever a previous attempt left under the same ref. Returns
        False when containerd already had the blob (nothing written).
        """
        ref = ref_key(desc)
        delay = 0.01
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                return await self._write_once(desc, ref, source, labels, lease, progress)
            except ContainerdError as err:
                if err.status is Status.ALREADY_EXISTS:
                    return False
                # Another writer (a concurrent pull, containerd's own) holds the ref:
                # wait for it like containerd's content.OpenWriter does.
                if err.status is not Status.UNAVAILABLE or "locked" not in err.detail:
                    raise
                if loop.time() >= deadline:
                    raise DeadlineExceeded(
                        f"blob {desc.digest} stayed locked by another writer for "
                        f"{self.timeout:g}s ({err.detail})",
                    ) from err
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 1.0)
            if await self.info(desc.digest) is not None:
                return False

    async def _write_once(
        self,
        desc: Descriptor,
        ref: str,
        source: Source,
        labels: Mapping[str, str],
        lease: str | None,
        progress: Progress | None,
    ) -> bool:
        async def session(writer: ContentWriter) -> bool:
            stat = await writer.stat(ref, desc.size, desc.digest)
            offset = stat if 0 < stat <= desc.size else 0
            if offset:
                log_event(
                    log,
                    "resuming blob write",
                    level=logging.DEBUG,
                    digest=desc.digest,
                    offset=offset,
                    size=desc.size,
                )
                if progress is not None:
                    progress(offset)
            offset = await self._stream_data(writer, desc, ref, source, offset, progress)
            try:
                await writer.commit(ref, desc.size, desc.digest, offset, labels)
            except ContainerdError as err:
                if err.status is Status.FAILED_PRECONDITION:
                    raise _CommitMismatch(err.detail) from err
                raise
            return True

        try:
            return await self.content.write(session, lease=lease, timeout=self.timeout)
        except _CommitMismatch as err:
            # What we stored does not hash to the digest: start from scratch next time.
            await self.abort(ref)
            raise DigestMismatchError(
                f"blob {desc.digest} does not match its digest after download "
                f"({err}); the partial download was discarded"
            ) from err

    async def _stream_data(
        self,
        writer: ContentWriter,
        desc: Descriptor,
        ref: str,
        source: Source,
        offset: int,
        progress: Progress | None,
    ) -> int:
        """WRITE everything from `offset` to the end; resumes a broken registry download."""
        pending = bytearray()
        position = offset
        first = True

        async def flush() -> None:
            nonlocal position, first
            if not pending and not first:
                return
            data = bytes(pending)
            pending.clear()
            # The first WRITE carries the resume offset; 0 makes containerd truncate
            # whatever a previous attempt left when we could not resume it.
            reached = await writer.write(ref, position, data, desc.digest)
            first = False
            if reached != position + len(data):
                raise ContainerdError(
                    "Content.Write",
                    Status.DATA_LOSS,
                    f"blob {desc.digest}: containerd is at offset {reached}, "
                    f"expected {position + len(data)}",
                )
            position = reached

        if position >= desc.size:
            await flush()
            return position
        attempts = 0
        while True:
            try:
                async for chunk in source(position + len(pending)):
                    pending += chunk
                    if progress is not None:
                        progress(len(chunk))
                    if len(pending) >= WRITE_CHUNK:
                        await flush()
            except asyncio.CancelledError:
                # Another layer failed (or the shim stops): keep what arrived, then go.
                with contextlib.suppress(Exception):
                    await asyncio.shield(flush())
                raise
            except (BlobInterruptedError, PullStalledError) as err:
                # Keep what did arrive: the next attempt (or the next pull) resumes there.
                with contextlib.suppress(ContainerdError, GRPCError):
                    await flush()
                attempts += 1
                if isinstance(err, PullStalledError) or attempts > RESUME_ATTEMPTS:
                    raise
                log_event(
                    log,
                    "blob download interrupted; resuming",
                    level=logging.WARNING,
                    digest=desc.digest,
                    offset=position,
                    size=desc.size,
                    attempt=attempts,
                    error=str(err),
                )
                continue
            await flush()
            return position


class _CommitMismatch(Exception):
    """containerd refused the commit: the bytes do not hash to the expected digest."""


DISTRIBUTION_SOURCE_PREFIX = "containerd.io/distribution.source."


def merge_sources(current: str, added: str) -> str:
    """containerd keeps every repository a blob came from, comma separated."""
    parts = [p for p in current.split(",") if p]
    for part in added.split(","):
        if part and part not in parts:
            parts.append(part)
    return ",".join(parts)


__all__ = [
    "DISTRIBUTION_SOURCE_PREFIX",
    "LEASE_HEADER",
    "ContentStore",
    "merge_sources",
    "metadata_for",
    "ref_key",
]
