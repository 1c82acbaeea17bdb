"""The image side of the shim: pulls, removals, the in-memory store, fs usage.

Image records are kept in containerd the way its CRI plugin keeps them, so
either can read what the other wrote: one record per tag, one per repo digest
and one named by the image id (`sha256:<config digest>`), all pointing at the
same target and labelled `io.cri-containerd.image=managed` (plus
`io.cri-containerd.pinned=pinned` for the sandbox image). Concurrent pulls of
one reference share one download.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from grpclib.const import Status

from cri_shim.concurrency import InFlight, run_all
from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.images import Images
from cri_shim.errors import ContainerdError, ContainerdUnavailable, invalid_argument
from cri_shim.gen.containerd import types as ctypes
from cri_shim.gen.containerd.services.images import v1 as images_v1
from cri_shim.images.content import ContentStore
from cri_shim.images.echoes import WriteEchoes
from cri_shim.images.errors import pull_error
from cri_shim.images.pull import Puller
from cri_shim.images.store import (
    MANAGED_LABEL,
    MANAGED_VALUE,
    PINNED_LABEL,
    PINNED_VALUE,
    ImageContent,
    ImageRecord,
    ImageStore,
)
from cri_shim.images.unpack import SNAPSHOTTER, Unpacker
from cri_shim.images.usage import FsUsage, SnapshotUsage
from cri_shim.logs import log_event
from cri_shim.registry import platforms
from cri_shim.registry.client import MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, RegistryClient
from cri_shim.registry.errors import UnsupportedManifestError
from cri_shim.registry.reference import Reference, ReferenceError, parse_reference
from cri_shim.registry.types import (
    INDEX_MEDIA_TYPES,
    Credentials,
    Descriptor,
    ResolvedImage,
    host_platform,
)
from cri_shim.settings import RegistrySettings

log = logging.getLogger(__name__)

LOAD_CONCURRENCY = 8
MAX_INDEX_DEPTH = 2


def _descriptor(target: ctypes.Descriptor | None) -> Descriptor | None:
    if target is None or not target.digest:
        return None
    return Descriptor(target.media_type, target.digest, target.size)


def _ctypes_descriptor(desc: Descriptor) -> ctypes.Descriptor:
    return ctypes.Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size)


def _flight_key(ref: Reference, credentials: Credentials | None) -> str:
    """Same reference with the same credentials: one download. Different credentials
    get their own pull, so one caller's auth failure never becomes another's."""
    if credentials is None or credentials.empty:
        return str(ref)
    secret = "\0".join(
        (
            credentials.username,
            credentials.password,
            credentials.identity_token,
            credentials.registry_token,
        )
    )
    return f"{ref}#{hashlib.sha256(secret.encode()).hexdigest()[:16]}"


PullObserver = Callable[[str, int, float], None]


class ImageManager:
    def __init__(
        self,
        settings: RegistrySettings,
        sandbox_image: str,
        client: ContainerdClient,
        *,
        registry: RegistryClient | None = None,
        on_pull: PullObserver | None = None,
    ) -> None:
        self.client = client
        self.records = Images(client)
        # Told of every finished pull (ref, bytes downloaded, seconds): metrics.
        self.on_pull = on_pull
        self.store = ImageStore()
        self.registry = registry or RegistryClient(settings)
        self.content = ContentStore(client, timeout=settings.stall_timeout)
        self.unpacker = Unpacker(client, SNAPSHOTTER)
        self.puller = Puller(client, self.registry, self.content, self.unpacker)
        self.usage = SnapshotUsage(client, SNAPSHOTTER)
        self._flights: InFlight[ImageRecord] = InFlight()
        # The events of the shim's own record writes, which need no reading back.
        self.echoes = WriteEchoes()
        self._load_lock = asyncio.Lock()
        # Store changes made while a load reads containerd, replayed on its result.
        self._journal: list[Callable[[], None]] | None = None
        try:
            self._sandbox_image = str(parse_reference(sandbox_image))
        except ReferenceError:
            self._sandbox_image = sandbox_image

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the store; a containerd that is down now is loaded on reconnect."""
        try:
            await self.load()
        except (ContainerdError, ContainerdUnavailable) as err:
            log_event(
                log,
                "could not load images from containerd yet",
                level=logging.WARNING,
                error=str(err),
            )

    async def stop(self) -> None:
        flights = self._flights.running()
        for task in flights:
            task.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
        await self.registry.close()

    async def reload(self) -> None:
        """For ContainerdHealth.on_reconnect: containerd may have changed while away."""
        try:
            await self.load()
        except (ContainerdError, ContainerdUnavailable) as err:
            log_event(log, "image reload failed", level=logging.WARNING, error=str(err))

    async def on_image_event(self, name: str, deleted: bool) -> None:
        """An image record changed in containerd, maybe by another client: the store
        follows at once, as containerd's CRI does (its UpdateImage). The record is
        read back rather than trusted from the event, so a stale event finds the
        current state; a record that is not the CRI's yet is adopted. The echo of
        a write the shim made itself is not read back: the store holds it already."""
        if deleted:
            self.echoes.forget(name)
            self._discard(name)
            return
        if self.echoes.claim(name):
            return
        try:
            image = await self.records.get(name)
        except ContainerdError as err:
            if err.status is not Status.NOT_FOUND:
                raise
            image = None
        target = _descriptor(image.target) if image is not None else None
        if image is None or target is None:
            self._discard(name)
            return
        content = await self._readable_content(target, name)
        if content is None:
            return
        pinned = image.labels.get(PINNED_LABEL) == PINNED_VALUE
        self._set(name, content, pinned)
        if image.labels.get(MANAGED_LABEL) != MANAGED_VALUE:
            names = set(self.store.names_of(content.id))
            for added, added_content, added_pinned in await self._adopt(
                name, target, content, pinned, names
            ):
                self._set(added, added_content, added_pinned)

    async def _readable_content(self, target: Descriptor, name: str) -> ImageContent | None:
        """The image's content, or None (logged) when containerd's copy is unreadable:
        one broken image must not hide the others."""
        try:
            return await self._read_content(target)
        except (ContainerdError, ValueError, UnsupportedManifestError) as err:
            log_event(
                log,
                "skipping image whose content is unreadable",
                level=logging.WARNING,
                image=name,
                target=target.digest,
                error=str(err),
            )
            return None

    # ------------------------------------------------------------ store upkeep

    def _set(self, name: str, content: ImageContent, pinned: bool) -> None:
        self.store.set(name, content, pinned=pinned)
        if self._journal is not None:
            self._journal.append(lambda: self.store.set(name, content, pinned=pinned))

    def _discard(self, name: str) -> None:
        self.store.discard(name)
        if self._journal is not None:
            self._journal.append(lambda: self.store.discard(name))

    async def load(self) -> None:
        """Rebuild the store from containerd's image records (Images.List, Content.Read)."""
        async with self._load_lock:
            started = time.monotonic()
            self.echoes.clear()
            journal: list[Callable[[], None]] = []
            self._journal = journal
            try:
                entries = await self._read_all()
            finally:
                self._journal = None
            self.store.replace_all(entries)
            for change in journal:
                change()
            log_event(
                log,
                "image store loaded",
                images=len(self.store),
                records=len(entries),
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )

    async def _read_all(self) -> list[tuple[str, ImageContent, bool]]:
        listed = await self.records.all()
        semaphore = asyncio.Semaphore(LOAD_CONCURRENCY)
        contents: dict[str, asyncio.Task[ImageContent | None]] = {}

        async def content_for(target: Descriptor, name: str) -> ImageContent | None:
            async with semaphore:
                return await self._readable_content(target, name)

        for image in listed:
            target = _descriptor(image.target)
            if target is not None and target.digest not in contents:
                contents[target.digest] = asyncio.create_task(content_for(target, image.name))
        await asyncio.gather(*contents.values())
        entries: list[tuple[str, ImageContent, bool]] = []
        names = {image.name for image in listed}
        for image in listed:
            target = _descriptor(image.target)
            content = contents[target.digest].result() if target is not None else None
            if target is None or content is None:
                continue
            pinned = image.labels.get(PINNED_LABEL) == PINNED_VALUE
            entries.append((image.name, content, pinned))
            if image.labels.get(MANAGED_LABEL) != MANAGED_VALUE:
                entries += await self._adopt(image.name, target, content, pinned, names)
        return entries

    async def _adopt(
        self, name: str, target: Descriptor, content: ImageContent, pinned: bool, names: set[str]
    ) -> list[tuple[str, ImageContent, bool]]:
        """An image created outside the CRI (`ctr -n k8s.io images import`) gets the
        id record and managed label containerd's CRI plugin would give it."""
        labels = {MANAGED_LABEL: MANAGED_VALUE}
        added: list[tuple[str, ImageContent, bool]] = []
        try:
            if content.id not in names:
                await self._create_record(content.id, target, labels, lease=None)
                names.add(content.id)
                added.append((content.id, content, False))
            await self._create_record(name, target, labels, lease=None)
        except ContainerdError as err:
            log_event(
                log, "could not adopt image", level=logging.WARNING, image=name, error=str(err)
            )
        else:
            log_event(log, "adopted image created outside the CRI", image=name, id=content.id)
        return added

    async def _read_json(self, digest: str, limit: int) -> tuple[bytes, Any]:
        data = await self.content.read(digest, limit=limit)
        return data, json.loads(data)

    async def _read_content(self, target: Descriptor) -> ImageContent:
        """Parse an image record's target down to the config, choosing this host's
        manifest from an index exactly as a pull does."""
        manifest = target
        _, body = await self._read_json(target.digest, MAX_MANIFEST_SIZE)
        for _ in range(MAX_INDEX_DEPTH + 1):
            is_index = manifest.media_type in INDEX_MEDIA_TYPES or (
                isinstance(body, dict) and isinstance(body.get("manifests"), list)
            )
            if not is_index:
                break
            entries = [
                Descriptor.from_json(item, f"index entry {i}")
                for i, item in enumerate(body.get("manifests", []))
            ]
            chosen = platforms.select(entries, host_platform())
            if chosen is None:
                raise ValueError(f"index {manifest.digest} has no manifest for {host_platform()}")
            manifest = chosen
            _, body = await self._read_json(manifest.digest, MAX_MANIFEST_SIZE)
        if not isinstance(body, dict):
            raise ValueError(f"manifest {manifest.digest} is not a JSON object")
        config = Descriptor.from_json(body.get("config"), "config")
        layers = tuple(
            Descriptor.from_json(item, f"layer {i}")
            for i, item in enumerate(body.get("layers") or [])
        )
        config_bytes = await self.content.read(config.digest, limit=MAX_CONFIG_SIZE)
        return ImageContent.build(target, manifest, config, config_bytes, layers)

    # ------------------------------------------------------------ records

    async def _create_record(
        self, name: str, target: Descriptor, labels: dict[str, str], *, lease: str | None
    ) -> bool:
        """Create or update one image record as containerd's CRI plugin does
        (createImageReference); returns whether the record ends up pinned."""
        image = images_v1.Image(name=name, labels=dict(labels), target=_ctypes_descriptor(target))
        try:
            with self.echoes.expecting(name):
                await self.records.create(image, lease=lease)
            return labels.get(PINNED_LABEL) == PINNED_VALUE
        except ContainerdError as err:
            if err.status is not Status.ALREADY_EXISTS:
                raise
        old = await self.records.get(name)
        if (
            old is not None
            and old.target is not None
            and old.target.digest == target.digest
            and old.labels.get(MANAGED_LABEL) == MANAGED_VALUE
            and (PINNED_LABEL not in labels or old.labels.get(PINNED_LABEL) == labels[PINNED_LABEL])
        ):
            return old.labels.get(PINNED_LABEL) == PINNED_VALUE
        with self.echoes.expecting(name):
            await self.records.update(
                image,
                ["target", f"labels.{MANAGED_LABEL}", f"labels.{PINNED_LABEL}"],
                lease=lease,
            )
        return labels.get(PINNED_LABEL) == PINNED_VALUE

    def _record_names(self, resolved: ResolvedImage, content: ImageContent) -> list[str]:
        """The id record first (so the image is findable by id as soon as it has a
        name), then the tag (when pulled by tag), then the repo digest."""
        names = [content.id]
        ref = resolved.reference
        if ref.digest is None and ref.tag is not None:
            names.append(str(ref))
        names.append(resolved.repo_digest)
        return names

    # ------------------------------------------------------------ pull

    def is_sandbox_image(self, ref: Reference) -> bool:
        return str(ref) == self._sandbox_image

    async def pull(
        self, image: str, credentials: Credentials | None = None, *, pinned: bool = False
    ) -> ImageRecord:
        """Pull `image` (or join a pull of it already running) and return it."""
        try:
            ref = parse_reference(image)
        except ReferenceError as err:
            raise invalid_argument(str(err)) from err
        key = _flight_key(ref, credentials)
        record = await self._flights.join(
            key,
            lambda: self._pull(ref, image, credentials, pinned),
            on_join=lambda: log_event(log, "joining image pull in progress", ref=str(ref)),
            name=f"pull {ref}",
        )
        if pinned and not record.pinned:
            record = await self._pin(record)
        return record

    async def _pull(
        self, ref: Reference, image: str, credentials: Credentials | None, pinned: bool
    ) -> ImageRecord:
        started = time.monotonic()
        log_event(log, "pulling image", ref=str(ref))
        try:
            resolved = await self.registry.resolve(ref, credentials)
            try:
                content = ImageContent.build(
                    resolved.target,
                    resolved.manifest,
                    resolved.config,
                    resolved.config_bytes,
                    resolved.layers,
                )
            except ValueError as err:
                raise UnsupportedManifestError(
                    f"{resolved.name}: {err}", reference=resolved.name
                ) from err
            pin = pinned or self.is_sandbox_image(ref)

            async def record(lease: str) -> None:
                await self._record_pull(resolved, content, pin, lease)

            downloaded = await self.puller.pull(resolved, content, credentials, then=record)
        except Exception as err:
            mapped = pull_error(err, image)
            if mapped is None:
                raise
            log_event(
                log,
                "image pull failed",
                level=logging.WARNING,
                ref=str(ref),
                code=type(mapped).__name__,
                error=mapped.message,
            )
            raise mapped from err
        found = self.store.get(content.id)
        if found is None:  # removed in the meantime
            raise ContainerdError("Images.Get", Status.NOT_FOUND, f"image {ref} was removed")
        elapsed = time.monotonic() - started
        if self.on_pull is not None:
            self.on_pull(str(ref), downloaded, elapsed)
        log_event(
            log,
            "pulled image",
            downloaded_bytes=downloaded,
            ref=str(ref),
            id=content.id,
            digest=resolved.target.digest,
            size=content.size,
            endpoint=resolved.endpoint,
            duration_ms=round(elapsed * 1000, 1),
        )
        return found

    async def _record_pull(
        self, resolved: ResolvedImage, content: ImageContent, pinned: bool, lease: str
    ) -> None:
        labels = {MANAGED_LABEL: MANAGED_VALUE}
        if pinned:
            labels[PINNED_LABEL] = PINNED_VALUE

        async def record(name: str) -> None:
            is_pinned = await self._create_record(name, resolved.target, labels, lease=lease)
            self._set(name, content, is_pinned)

        # The id record first; then the tag and the repo digest at once.
        first, *others = self._record_names(resolved, content)
        await record(first)
        await run_all(*(record(name) for name in others))

    async def _pin(self, record: ImageRecord) -> ImageRecord:
        for name in record.references:
            # The update carries the record's target although the mask leaves it alone:
            # containerd 2.x dereferences it regardless (a nil target crashes the daemon).
            current = await self.records.get(name)
            target = current.target if current is not None else None
            with self.echoes.expecting(name):
                await self.records.update(
                    images_v1.Image(name=name, labels={PINNED_LABEL: PINNED_VALUE}, target=target),
                    [f"labels.{PINNED_LABEL}"],
                )
            self._set(name, record.content, True)
        return self.store.get(record.id) or record

    async def ensure_image(self, ref: str, *, pinned: bool = False) -> ImageRecord:
        """The local image `ref` names, pulled first when there is none (sandbox image)."""
        record = self.store.get(ref)
        if record is None:
            return await self.pull(ref, pinned=pinned)
        if pinned and not record.pinned:
            record = await self._pin(record)
        return record

    # ------------------------------------------------------------ remove, usage

    async def remove(self, ref_or_id: str) -> ImageRecord | None:
        """Delete every record of the image; nothing to do when it is absent.
        The last delete is synchronous so containerd collects the content now."""
        record = self.store.get(ref_or_id)
        if record is None:
            return None
        names = [n for n in record.references if n != record.id] + [record.id]

        async def delete(name: str, sync: bool) -> None:
            try:
                await self.records.delete(name, sync=sync)
            except ContainerdError as err:
                if err.status is not Status.NOT_FOUND:
                    raise
            self._discard(name)

        # The names other than the id go at once (one round trip's wait, not one
        # each); the id record last, synchronously.
        await run_all(*(delete(name, False) for name in names[:-1]))
        await delete(record.id, True)
        log_event(log, "removed image", id=record.id, names=",".join(names))
        return record

    async def fs_usage(self) -> FsUsage:
        return await self.usage.usage()


EnsureImage = Callable[[str], Awaitable[ImageRecord]]

__all__ = ["EnsureImage", "ImageManager"]
