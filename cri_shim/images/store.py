"""The in-memory view of containerd's image records that ListImages and
ImageStatus answer from, so kubelet's frequent image queries cost no
containerd round-trip.

containerd keeps one record per name (a tag, a repo digest, or the image id
`sha256:<config digest>`), each pointing at a target descriptor. The store
groups names by image id and keeps what was parsed once from the manifest and
config (layers, chain id, size, user). It is filled from containerd at start
and on reconnect, and updated by pulls and removals; lookups accept what
containerd's CRI plugin accepts: an id, a short id prefix, a name in any
normalisable spelling (`busybox`), or a repo digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cri_shim.registry.reference import ReferenceError, is_digest_id, parse_reference
from cri_shim.registry.types import Descriptor

MANAGED_LABEL = "io.cri-containerd.image"
MANAGED_VALUE = "managed"
PINNED_LABEL = "io.cri-containerd.pinned"
PINNED_VALUE = "pinned"


def chain_ids(diff_ids: Iterable[str]) -> tuple[str, ...]:
    """OCI chain ids: the snapshot names of each layer stack (identity.ChainIDs)."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            joined = f"{chains[-1]} {diff_id}".encode()
            chains.append("sha256:" + hashlib.sha256(joined).hexdigest())
    return tuple(chains)


def config_diff_ids(config: Mapping[str, Any]) -> tuple[str, ...]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, Mapping) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise ValueError("image config has no rootfs.diff_ids list")
    return tuple(diff_ids)


def config_user(config: Mapping[str, Any]) -> str:
    inner = config.get("config")
    user = inner.get("User") if isinstance(inner, Mapping) else None
    return user if isinstance(user, str) else ""


@dataclass(frozen=True)
class ImageContent:
    """What an image id stands for, parsed once from its target, manifest and config."""

    id: str  # the config digest
    target: Descriptor  # what the records point at: the index, or the manifest
    manifest: Descriptor
    config_descriptor: Descriptor
    config: dict[str, Any]
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    chain_ids: tuple[str, ...]
    size: int

    @classmethod
    def build(
        cls,
        target: Descriptor,
        manifest: Descriptor,
        config_descriptor: Descriptor,
        config_bytes: bytes,
        layers: tuple[Descriptor, ...],
    ) -> ImageContent:
        """Raises ValueError when the config is not an image config we can unpack."""
        config = json.loads(config_bytes)
        if not isinstance(config, dict):
            raise ValueError("image config is not a JSON object")
        diff_ids = config_diff_ids(config)
        if len(diff_ids) != len(layers):
            raise ValueError(
                f"manifest lists {len(layers)} layers but the config {len(diff_ids)} diff ids"
            )
        # What containerd's image.Size walks: the target, one platform manifest
        # (when the target is an index), the config and every compressed layer.
        size = manifest.size + config_descriptor.size + sum(layer.size for layer in layers)
        if target.digest != manifest.digest:
            size += target.size
        return cls(
            id=config_descriptor.digest,
            target=target,
            manifest=manifest,
            config_descriptor=config_descriptor,
            config=config,
            layers=layers,
            diff_ids=diff_ids,
            chain_ids=chain_ids(diff_ids),
            size=size,
        )

    @property
    def chain_id(self) -> str:
        """The top snapshot: what a container's rootfs is prepared from."""
        return self.chain_ids[-1] if self.chain_ids else ""


def split_names(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(repo tags, repo digests) as CRI reports them; the id record is neither."""
    tags: list[str] = []
    digests: list[str] = []
    for name in names:
        if is_digest_id(name):
            continue
        try:
            ref = parse_reference(name)
        except ReferenceError:
            continue
        if ref.digest is not None:
            digests.append(str(ref.with_digest(ref.digest)))
        else:
            tags.append(str(ref))
    return sorted(tags), sorted(digests)


@dataclass(frozen=True)
class ImageRecord:
    """One image as CRI sees it: an id with every containerd record naming it."""

    content: ImageContent
    references: tuple[str, ...]
    pinned: bool

    @property
    def id(self) -> str:
        return self.content.id

    @property
    def chain_id(self) -> str:
        return self.content.chain_id

    @property
    def config(self) -> dict[str, Any]:
        return self.content.config

    @property
    def size(self) -> int:
        return self.content.size

    @property
    def target(self) -> Descriptor:
        return self.content.target

    @property
    def repo_tags(self) -> list[str]:
        return split_names(self.references)[0]

    @property
    def repo_digests(self) -> list[str]:
        return split_names(self.references)[1]

    @property
    def user(self) -> str:
        return config_user(self.content.config)

    @property
    def uid(self) -> int | None:
        """The image USER when numeric (`1000` or `1000:1000`), as containerd reports it."""
        user = self.user.split(":", 1)[0]
        try:
            return int(user, 10) if user else None
        except ValueError:
            return None

    @property
    def username(self) -> str:
        user = self.user.split(":", 1)[0]
        return "" if not user or self.uid is not None else user


# Memoized lookups per generation (kubelet asks by a handful of names; a caller
# asking by endless made-up names must not grow the memo without bound).
_MAX_LOOKUPS_KEPT = 4096


@dataclass(frozen=True)
class _Name:
    id: str
    pinned: bool


class ImageStore:
    """Names and image contents; every method is synchronous and O(1) or O(images)."""

    def __init__(self) -> None:
        self._names: dict[str, _Name] = {}
        self._contents: dict[str, ImageContent] = {}
        # Told the ids whose names changed: containers report their image's current
        # repo tag and digest, as containerd's ContainerStatus does.
        self.listeners: list[Callable[[set[str]], None]] = []
        # Bumped on every change; what is derived from the store (records, lookups,
        # the handlers' encoded replies) is memoized until it moves.
        self.generation = 0
        self._listed: tuple[ImageRecord, ...] | None = None
        self._looked_up: dict[str, ImageRecord | None] = {}

    def _changed(self, ids: set[str]) -> None:
        self.generation += 1
        self._listed = None
        self._looked_up = {}
        for listener in self.listeners:
            listener(ids)

    def __len__(self) -> int:
        return len(self._contents)

    def replace_all(self, entries: Iterable[tuple[str, ImageContent, bool]]) -> None:
        """Swap in a freshly loaded view (start-up, containerd reconnect)."""
        names: dict[str, _Name] = {}
        contents: dict[str, ImageContent] = {}
        for name, content, pinned in entries:
            names[name] = _Name(content.id, pinned)
            contents[content.id] = content
        changed = {entry.id for entry in self._names.values()} | set(contents)
        self._names, self._contents = names, contents
        self._changed(changed)

    def set(self, name: str, content: ImageContent, *, pinned: bool) -> None:
        """`name` now points at `content` (a tag may move from another image)."""
        previous = self._names.get(name)
        self._names[name] = _Name(content.id, pinned)
        self._contents[content.id] = content
        changed = {content.id}
        if previous is not None and previous.id != content.id:
            self._forget_unnamed(previous.id)
            changed.add(previous.id)
        self._changed(changed)

    def discard(self, name: str) -> None:
        previous = self._names.pop(name, None)
        if previous is not None:
            self._forget_unnamed(previous.id)
            self._changed({previous.id})

    def _forget_unnamed(self, image_id: str) -> None:
        if not any(entry.id == image_id for entry in self._names.values()):
            self._contents.pop(image_id, None)

    def names_of(self, image_id: str) -> list[str]:
        return sorted(name for name, entry in self._names.items() if entry.id == image_id)

    def is_pinned_name(self, name: str) -> bool:
        entry = self._names.get(name)
        return entry is not None and entry.pinned

    def _record(self, image_id: str) -> ImageRecord | None:
        content = self._contents.get(image_id)
        if content is None:
            return None
        names = [(n, e) for n, e in self._names.items() if e.id == image_id]
        return ImageRecord(
            content=content,
            references=tuple(sorted(n for n, _ in names)),
            pinned=any(e.pinned for _, e in names),
        )

    def list(self) -> list[ImageRecord]:
        if self._listed is None:
            self._listed = self._list()
        return list(self._listed)

    def _list(self) -> tuple[ImageRecord, ...]:
        grouped: dict[str, list[tuple[str, _Name]]] = {}
        for name, entry in self._names.items():
            grouped.setdefault(entry.id, []).append((name, entry))
        records = []
        for image_id, names in grouped.items():
            content = self._contents.get(image_id)
            if content is None:
                continue
            records.append(
                ImageRecord(
                    content=content,
                    references=tuple(sorted(n for n, _ in names)),
                    pinned=any(e.pinned for _, e in names),
                )
            )
        return tuple(sorted(records, key=lambda r: r.id))

    def resolve_id(self, ref_or_id: str) -> str | None:
        """The image id `ref_or_id` names, the way containerd's CRI LocalResolve finds it."""
        text = ref_or_id.strip()
        if not text:
            return None
        if is_digest_id(text):
            return text if text in self._contents else None
        try:
            name = str(parse_reference(text))
        except ReferenceError:
            name = ""
        entry = self._names.get(name) if name else None
        if entry is not None:
            return entry.id
        return self._by_prefix(text)

    def _by_prefix(self, text: str) -> str | None:
        """A unique id prefix (`3f57d9401f8d`, `sha256:3f57`), like digestset.Lookup."""
        hex_part = text.removeprefix("sha256:")
        if not hex_part or any(c not in "0123456789abcdef" for c in hex_part):
            return None
        matches = [i for i in self._contents if i.removeprefix("sha256:").startswith(hex_part)]
        return matches[0] if len(matches) == 1 else None

    def get(self, ref_or_id: str) -> ImageRecord | None:
        try:
            return self._looked_up[ref_or_id]
        except KeyError:
            pass
        image_id = self.resolve_id(ref_or_id)
        record = self._record(image_id) if image_id is not None else None
        if len(self._looked_up) < _MAX_LOOKUPS_KEPT:
            self._looked_up[ref_or_id] = record
        return record


__all__ = [
    "MANAGED_LABEL",
    "MANAGED_VALUE",
    "PINNED_LABEL",
    "PINNED_VALUE",
    "ImageContent",
    "ImageRecord",
    "ImageStore",
    "chain_ids",
    "split_names",
]
