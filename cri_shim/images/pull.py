"""One image pull, from a resolved reference to blobs and snapshots in containerd.

The registry client resolves the reference and streams blobs; this writes them
into containerd's content store under a lease with the GC labels containerd's
own puller sets, downloads layers in parallel (up to
`registry.max_concurrent_downloads`), and unpacks each one as soon as it and
its parents are in. Layers whose chain is already unpacked are not downloaded
at all, as containerd does. Image records are the caller's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cri_shim.concurrency import run_all, stop_task
from cri_shim.containerd.client import ContainerdClient
from cri_shim.images.content import ContentStore
from cri_shim.images.lease import PullLease
from cri_shim.images.store import ImageContent
from cri_shim.images.unpack import Unpacker
from cri_shim.keyed_locks import KeyedLocks
from cri_shim.logs import log_event
from cri_shim.registry.client import RegistryClient
from cri_shim.registry.errors import DigestMismatchError
from cri_shim.registry.types import Credentials, Descriptor, ResolvedImage

log = logging.getLogger(__name__)

GC_CONTENT_PREFIX = "containerd.io/gc.ref.content."
UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
DISTRIBUTION_SOURCE = "containerd.io/distribution.source."
# How often a running pull logs its progress.
PROGRESS_INTERVAL = 5.0


def snapshot_gc_label(snapshotter: str) -> str:
    return f"containerd.io/gc.ref.snapshot.{snapshotter}"


@dataclass
class PullProgress:
    """Counters a running pull updates; logged every few seconds and per layer."""

    ref: str
    bytes_total: int
    layers_total: int
    bytes_done: int = 0
    layers_done: int = 0
    layers_unpacked: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, count: int) -> None:
        self.bytes_done += count

    def fields(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "layers_done": self.layers_done,
            "layers_total": self.layers_total,
            "layers_unpacked": self.layers_unpacked,
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }


def index_child_labels(index_bytes: bytes, manifest_digest: str) -> dict[str, str]:
    """`m.<i>` for every entry of the index, in order, as containerd labels it
    (only the chosen platform's manifest is fetched; the others dangle harmlessly).
    The chosen manifest is labelled too when it sits in a nested index, so GC
    always reaches it."""
    labels: dict[str, str] = {}
    try:
        entries = json.loads(index_bytes).get("manifests") or []
    except (ValueError, AttributeError):
        entries = []
    for entry in entries:
        digest = entry.get("digest") if isinstance(entry, dict) else None
        if isinstance(digest, str) and digest:
            labels[f"{GC_CONTENT_PREFIX}m.{len(labels)}"] = digest
    if manifest_digest not in labels.values():
        labels[f"{GC_CONTENT_PREFIX}m.{len(labels)}"] = manifest_digest
    return labels


async def _all_or_nothing(jobs: list[Awaitable[None]]) -> None:
    """Run jobs concurrently; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task in done and not task.cancelled():
                error = task.exception()
                if error is not None:
                    raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Puller:
    def __init__(
        self,
        client: ContainerdClient,
        registry: RegistryClient,
        content: ContentStore,
        unpacker: Unpacker,
        *,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.client = client
        self.registry = registry
        self.content = content
        self.unpacker = unpacker
        self.progress_interval = progress_interval
        # Two pulls sharing a blob (different images, same base layer) write it once.
        self._blob_locks = KeyedLocks()
        self._chain_locks = KeyedLocks()

    async def pull(
        self,
        resolved: ResolvedImage,
        content: ImageContent,
        credentials: Credentials | None,
        *,
        then: Callable[[str], Awaitable[None]],
    ) -> int:
        """Store and unpack everything `resolved` needs, then run `then(lease id)`
        (the image records) while the lease still holds it all. Returns the
        layer bytes downloaded (layers already unpacked are not fetched)."""
        lease = PullLease(self.client)
        await lease.create(resolved.name)
        failed = True
        try:
            downloaded = await self._pull(resolved, content, credentials, lease)
            await then(lease.id)
            failed = False
        finally:
            await asyncio.shield(lease.release(failed=failed))
        return downloaded

    async def _pull(
        self,
        resolved: ResolvedImage,
        image: ImageContent,
        credentials: Credentials | None,
        lease: PullLease,
    ) -> int:
        ref = resolved.reference
        source = {DISTRIBUTION_SOURCE + ref.domain: ref.path}
        # Small documents first, as containerd's puller walks the image; the three
        # are independent (the lease holds each), so they are stored at once.
        documents: list[Awaitable[None]] = []
        if resolved.index is not None and resolved.index_bytes is not None:
            index_labels = index_child_labels(resolved.index_bytes, resolved.manifest.digest)
            documents.append(
                self._store_bytes(
                    resolved.index, resolved.index_bytes, {**index_labels, **source}, lease
                )
            )
        manifest_labels = {GC_CONTENT_PREFIX + "config": resolved.config.digest, **source}
        for i, layer in enumerate(resolved.layers):
            manifest_labels[f"{GC_CONTENT_PREFIX}l.{i}"] = layer.digest
        documents.append(
            self._store_bytes(resolved.manifest, resolved.manifest_bytes, manifest_labels, lease)
        )
        config_labels = dict(source)
        if image.chain_id:
            config_labels[snapshot_gc_label(self.unpacker.snapshotter)] = image.chain_id
        documents.append(
            self._store_bytes(resolved.config, resolved.config_bytes, config_labels, lease)
        )
        await run_all(*documents)
        return await self._layers(resolved, image, credentials, lease, source)

    async def _first_missing_chain(self, image: ImageContent, lease: PullLease) -> int:
        """Index of the first layer whose chain is not unpacked (len(layers) when all are)."""
        for i, chain_id in enumerate(image.chain_ids):
            if not await self.unpacker.committed(chain_id):
                if i > 0:
                    await lease.add(image.chain_ids[i - 1], self.unpacker.lease_type)
                return i
        if image.chain_ids:
            await lease.add(image.chain_id, self.unpacker.lease_type)
        return len(image.chain_ids)

    async def _layers(
        self,
        resolved: ResolvedImage,
        image: ImageContent,
        credentials: Credentials | None,
        lease: PullLease,
        source: dict[str, str],
    ) -> int:
        first = await self._first_missing_chain(image, lease)
        needed = list(range(first, len(image.layers)))
        progress = PullProgress(
            ref=resolved.name,
            bytes_total=sum(image.layers[i].size for i in needed),
            layers_total=len(needed),
        )
        if not needed:
            log_event(log, "image already unpacked", level=logging.DEBUG, ref=resolved.name)
            return 0
        log_event(log, "pulling image layers", **progress.fields())
        semaphore = asyncio.Semaphore(self.registry.max_concurrent_downloads)
        downloads: dict[int, asyncio.Future[None]] = {}

        async def download(i: int) -> None:
            layer = image.layers[i]
            async with semaphore:
                await self._store_stream(resolved, layer, credentials, source, lease, progress)
            progress.layers_done += 1
            log_event(
                log, "layer downloaded", layer=layer.digest, size=layer.size, **progress.fields()
            )

        async def unpack() -> None:
            for i in needed:
                await downloads[i]
                await self._unpack_layer(image, i, lease)
                progress.layers_unpacked += 1

        for i in needed:
            downloads[i] = asyncio.ensure_future(download(i))
        reporter = asyncio.create_task(
            self._report(progress), name=f"pull-progress {resolved.name}"
        )
        try:
            await _all_or_nothing([*downloads.values(), unpack()])
        finally:
            await stop_task(reporter)
        log_event(log, "image layers pulled and unpacked", **progress.fields())
        return progress.bytes_done

    async def _report(self, progress: PullProgress) -> None:
        while True:
            await asyncio.sleep(self.progress_interval)
            log_event(log, "image pull progress", **progress.fields())

    async def _unpack_layer(self, image: ImageContent, i: int, lease: PullLease) -> None:
        layer, diff_id, chain_id = image.layers[i], image.diff_ids[i], image.chain_ids[i]
        parent = image.chain_ids[i - 1] if i > 0 else ""
        async with self._chain_locks.hold(chain_id):
            if await self.unpacker.committed(chain_id):
                await lease.add(chain_id, self.unpacker.lease_type)
            else:
                await self.unpacker.apply(layer, diff_id, chain_id, parent, lease=lease.id)
        await self.content.update_labels(
            layer.digest, {UNCOMPRESSED_LABEL: diff_id}, lease=lease.id
        )

    @contextlib.asynccontextmanager
    async def _blob(self, desc: Descriptor) -> AsyncIterator[None]:
        async with self._blob_locks.hold(desc.digest):
            yield

    async def _existing(self, desc: Descriptor, labels: dict[str, str], lease: PullLease) -> bool:
        """Hold and label a blob containerd already has; False when it has not."""
        info = await self.content.info(desc.digest)
        if info is None:
            return False
        await lease.add(desc.digest, "content")
        await self.content.ensure_labels(info, labels, lease=lease.id)
        return True

    async def _store_bytes(
        self, desc: Descriptor, data: bytes, labels: dict[str, str], lease: PullLease
    ) -> None:
        async def source(offset: int) -> AsyncIterator[bytes]:
            yield data[offset:]

        async with self._blob(desc):
            if await self._existing(desc, labels, lease):
                return
            written = await self.content.write(desc, source, labels=labels, lease=lease.id)
            if not written:
                await self._existing(desc, labels, lease)

    async def _store_stream(
        self,
        resolved: ResolvedImage,
        layer: Descriptor,
        credentials: Credentials | None,
        labels: dict[str, str],
        lease: PullLease,
        progress: PullProgress,
    ) -> None:
        def source(offset: int) -> AsyncIterator[bytes]:
            return self.registry.blob_stream(resolved, layer, credentials, offset=offset)

        async with self._blob(layer):
            if await self._existing(layer, labels, lease):
                progress.add(layer.size)
                return
            fetched = 0

            def count(size: int) -> None:
                nonlocal fetched
                fetched += size
                progress.add(size)

            try:
                written = await self.content.write(
                    layer, source, labels=labels, lease=lease.id, progress=count
                )
            except DigestMismatchError:
                # The ingest was discarded: nothing to resume, so no lease is kept.
                raise
            except BaseException:
                # A partial ingest exists: keep the lease so the next attempt resumes it.
                lease.keep = lease.keep or fetched > 0
                raise
            if not written:
                await self._existing(layer, labels, lease)


def iter_blobs(resolved: ResolvedImage) -> Iterator[Descriptor]:
    """Every blob a pull of `resolved` stores (for tests and diagnostics)."""
    if resolved.index is not None:
        yield resolved.index
    yield resolved.manifest
    yield resolved.config
    yield from resolved.layers


__all__ = ["PullProgress", "Puller", "iter_blobs", "snapshot_gc_label"]
