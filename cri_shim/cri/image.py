"""CRI image RPCs: ListImages, StreamImages, ImageStatus, PullImage, RemoveImage,
ImageFsInfo.

Queries are answered from the in-memory image store; pulls and removals go
through the image manager, which keeps containerd and the store in step. The
answers have the shape containerd's CRI plugin gives (absent image: no error
and no image; verbose status: the image config as JSON under "info").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cri_shim.errors import invalid_argument, require
from cri_shim.gen.runtime import v1 as cri
from cri_shim.images.manager import ImageManager
from cri_shim.images.store import ImageContent, ImageRecord
from cri_shim.registry.reference import ReferenceError, parse_reference
from cri_shim.registry.types import Credentials
from cri_shim.store.encoded import (
    BatchLimits,
    EncodedImageStatusResponse,
    EncodedListImagesResponse,
    EncodedStreamImagesResponse,
    batches,
    framed,
    message_field,
    prebuilt,
)
from cri_shim.store.verbose import go_json


def to_cri_image(record: ImageRecord) -> cri.Image:
    uid = record.uid
    return cri.Image(
        id=record.id,
        repo_tags=record.repo_tags,
        repo_digests=record.repo_digests,
        size=record.size,
        uid=cri.Int64Value(value=uid) if uid is not None else None,
        username=record.username,
        # No spec: containerd's CRI plugin leaves it unset, and kubelet reads it nil-safely.
        pinned=record.pinned,
    )


_CONFIG_FIELDS = (
    "User",
    "ExposedPorts",
    "Env",
    "Entrypoint",
    "Cmd",
    "Volumes",
    "WorkingDir",
    "Labels",
    "StopSignal",
    "ArgsEscaped",
)
_HISTORY_FIELDS = ("created", "created_by", "author", "comment", "empty_layer")


def _present(data: Mapping[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """Go's omitempty: the fields that are set and not empty."""
    return {f: data[f] for f in fields if data.get(f) not in (None, "", [], {}, False)}


def oci_image_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The image config as containerd reports it: decoded into the OCI `Image` type and
    encoded again, so Docker-only keys (container_config, Hostname...) are dropped."""
    spec = _present(config, ("created", "author"))
    spec["architecture"] = config.get("architecture", "")
    spec["os"] = config.get("os", "")
    spec.update(_present(config, ("os.version", "os.features", "variant")))
    inner = config.get("config")
    spec["config"] = _present(inner, _CONFIG_FIELDS) if isinstance(inner, Mapping) else {}
    rootfs = config.get("rootfs")
    rootfs = rootfs if isinstance(rootfs, Mapping) else {}
    spec["rootfs"] = {"type": rootfs.get("type", ""), "diff_ids": rootfs.get("diff_ids")}
    history = config.get("history")
    if isinstance(history, list) and history:
        spec["history"] = [
            _present(entry, _HISTORY_FIELDS) for entry in history if isinstance(entry, Mapping)
        ]
    return spec


def verbose_info(record: ImageRecord) -> dict[str, str]:
    """containerd's verboseImageInfo, field for field: the chain id and the image config."""
    info = {"chainID": record.chain_id, "imageSpec": oci_image_spec(record.config)}
    return {"info": go_json(info)}


@dataclass
class _EncodedStatus:
    """An image's ImageStatus answers, valid while its content and names are these."""

    content: ImageContent
    references: tuple[str, ...]
    pinned: bool
    by_verbose: dict[bool, bytes] = field(default_factory=dict)


def credentials_from(auth: cri.AuthConfig | None) -> Credentials | None:
    if auth is None:
        return None
    try:
        return Credentials.from_cri(
            username=auth.username,
            password=auth.password,
            auth=auth.auth,
            identity_token=auth.identity_token,
            registry_token=auth.registry_token,
        )
    except ValueError as err:
        raise invalid_argument(f"auth: {err}") from err


def _spec_image(spec: cri.ImageSpec | None) -> str:
    return spec.image if spec is not None else ""


def name_matcher(wanted: str) -> Callable[[str], bool]:
    """Whether an image name matches a ListImages filter as `crictl images NAME` users
    expect: the repository as typed (`busybox`, `e2e-test-images/busybox`) matches
    every registry's repository ending in those path components, a name with a
    registry host (`registry.k8s.io/e2e-test-images/busybox`) that repository only;
    a tag or digest in the filter must match too, else any tag does."""
    name, _, digest = wanted.partition("@")
    colon = name.rfind(":")
    tag = name[colon + 1 :] if colon > name.rfind("/") else ""
    path = name[:colon] if tag else name
    first, sep, _ = path.partition("/")
    with_host = bool(sep) and (any(c in first for c in ".:") or first == "localhost")
    try:
        typed = parse_reference(path)
    except ReferenceError:
        return lambda _name: False

    def matches(candidate: str) -> bool:
        try:
            ref = parse_reference(candidate)
        except ReferenceError:
            return False
        if with_host:
            if ref.repository != typed.repository:
                return False
        elif ref.path != path and not ref.path.endswith("/" + path):
            return False
        if digest:
            return ref.digest == digest
        return not tag or ref.tag == tag

    return matches


class ImageHandlers:
    def __init__(self, manager: ImageManager, limits: BatchLimits | None = None) -> None:
        self.manager = manager
        self.limits = limits or BatchLimits()
        self._status_cache: dict[str, _EncodedStatus] = {}
        # Each image's `Image` message framed as field 1 (where it sits in both
        # ListImagesResponse and ImageStatusResponse), and the unfiltered list
        # body, kept while the store's generation stays: kubelet asks these every
        # few seconds and betterproto2 encodes in pure Python.
        self._generation = -1
        self._framed: dict[str, bytes] = {}
        self._all_framed: bytes | None = None

    def _current(self) -> None:
        generation = self.manager.store.generation
        if generation != self._generation:
            self._generation = generation
            self._framed = {}
            self._all_framed = None

    def _framed_image(self, record: ImageRecord) -> bytes:
        self._current()
        data = self._framed.get(record.id)
        if data is None:
            data = message_field(1, bytes(to_cri_image(record)))
            self._framed[record.id] = data
        return data

    def _records(self, filter_: cri.ImageFilter | None) -> list[ImageRecord]:
        wanted = _spec_image(filter_.image) if filter_ is not None else ""
        records = list(self.manager.store.list())
        if not wanted:
            return records
        exact = self.manager.store.get(wanted)
        matches = name_matcher(wanted)
        return [
            r
            for r in records
            if (exact is not None and r.id == exact.id)
            or any(matches(name) for name in [*r.repo_tags, *r.repo_digests])
        ]

    async def list_images(self, request: cri.ListImagesRequest) -> cri.ListImagesResponse:
        filter_image = _spec_image(request.filter.image) if request.filter is not None else ""
        self._current()
        body = None if filter_image else self._all_framed
        if body is None:
            body = b"".join([self._framed_image(r) for r in self._records(request.filter)])
            if not filter_image:
                self._all_framed = body
        return prebuilt(EncodedListImagesResponse, body)

    async def stream_images(
        self, request: cri.StreamImagesRequest
    ) -> AsyncIterator[cri.StreamImagesResponse]:
        """ListImages in bounded batches, each image encoded once."""
        images = [to_cri_image(r) for r in self._records(request.filter)]
        for body in batches(framed(images), self.limits):
            yield prebuilt(EncodedStreamImagesResponse, body)

    async def image_status(self, request: cri.ImageStatusRequest) -> cri.ImageStatusResponse:
        """Encoded once per image, names and pin state (the verbose info is the
        whole image config as JSON); a pull, tag or removal changes the key."""
        record = self.manager.store.get(_spec_image(request.image))
        if record is None:
            return cri.ImageStatusResponse()
        if not request.verbose:
            return prebuilt(EncodedImageStatusResponse, self._framed_image(record))
        cached = self._status_cache.get(record.id)
        if (
            cached is None
            or cached.content is not record.content
            or cached.references != record.references
            or cached.pinned != record.pinned
        ):
            if len(self._status_cache) > 2 * len(self.manager.store) + 16:
                self._status_cache.clear()  # drop images that are gone
            cached = _EncodedStatus(record.content, record.references, record.pinned)
            self._status_cache[record.id] = cached
        body = cached.by_verbose.get(request.verbose)
        if body is None:
            body = bytes(
                cri.ImageStatusResponse(
                    image=to_cri_image(record),
                    info=verbose_info(record) if request.verbose else {},
                )
            )
            cached.by_verbose[request.verbose] = body
        return prebuilt(EncodedImageStatusResponse, body)

    async def pull_image(self, request: cri.PullImageRequest) -> cri.PullImageResponse:
        image = require(_spec_image(request.image), "image.image")
        record = await self.manager.pull(image, credentials_from(request.auth))
        # cri-api: image_ref must equal the Image.id ImageStatus reports.
        return cri.PullImageResponse(image_ref=record.id)

    async def remove_image(self, request: cri.RemoveImageRequest) -> cri.RemoveImageResponse:
        await self.manager.remove(require(_spec_image(request.image), "image.image"))
        return cri.RemoveImageResponse()

    async def image_fs_info(self, request: cri.ImageFsInfoRequest) -> cri.ImageFsInfoResponse:
        usage = await self.manager.fs_usage()
        filesystem = cri.FilesystemUsage(
            timestamp=usage.timestamp_ns,
            fs_id=cri.FilesystemIdentifier(mountpoint=usage.mountpoint),
            used_bytes=cri.UInt64Value(value=usage.used_bytes),
            inodes_used=cri.UInt64Value(value=usage.inodes_used),
        )
        # Images and writable layers share the snapshotter's disk here.
        return cri.ImageFsInfoResponse(
            image_filesystems=[filesystem], container_filesystems=[filesystem]
        )


__all__ = [
    "ImageHandlers",
    "credentials_from",
    "oci_image_spec",
    "to_cri_image",
    "verbose_info",
]
