"""Plain data the registry client hands to the containerd side: descriptors,
platforms, credentials and a resolved image.

Everything here is frozen and free of I/O so it can be logged, cached and
passed between tasks without surprises.
"""

from __future__ import annotations

import base64
import binascii
import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cri_shim.registry.reference import Reference

# OCI image spec media types.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDISTRIBUTABLE_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"

# Docker image manifest v2 schema 2 media types.
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

# Docker schema 1: refused, with a message saying so.
DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED_MANIFEST = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
SCHEMA1_MEDIA_TYPES = frozenset({DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED_MANIFEST})
LAYER_MEDIA_TYPES = frozenset(
    {
        OCI_LAYER,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_LAYER_NONDISTRIBUTABLE,
        OCI_LAYER_NONDISTRIBUTABLE_GZIP,
        DOCKER_LAYER,
        DOCKER_LAYER_GZIP,
        DOCKER_FOREIGN_LAYER,
    }
)

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def from_json(cls, data: Any) -> Platform | None:
        """The `platform` object of an index entry (or an image config), if it has one."""
        if not isinstance(data, Mapping):
            return None
        os_name, arch = data.get("os"), data.get("architecture")
        if not isinstance(os_name, str) or not isinstance(arch, str):
            return None
        variant = data.get("variant", "")
        os_version = data.get("os.version", "")
        return cls(
            os_name,
            arch,
            variant if isinstance(variant, str) else "",
            os_version if isinstance(os_version, str) else "",
        )


# uname -m -> (GOARCH, variant), the names registries use.
_GOARCH: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "loongarch64": ("loong64", ""),
    "mips64": ("mips64", ""),
}


def host_platform() -> Platform:
    """This machine as an image platform: linux plus Go's name for the CPU."""
    machine = _platform.machine().lower()
    arch, variant = _GOARCH.get(machine, (machine, ""))
    return Platform("linux", arch, variant)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    # Not part of the hash: descriptors stay usable as dict keys and set members.
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        """An OCI descriptor object; `where` names it in the error when malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} is not a descriptor object")
        media_type, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not digest:
            raise ValueError(f"{where} has no digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{where} ({digest}) has no valid size")
        if not isinstance(media_type, str):
            media_type = ""
        raw_annotations = data.get("annotations")
        annotations = _EMPTY
        if isinstance(raw_annotations, Mapping):
            annotations = MappingProxyType(
                {str(k): str(v) for k, v in raw_annotations.items() if isinstance(v, str)}
            )
        raw_urls = data.get("urls")
        urls = (
            tuple(u for u in raw_urls if isinstance(u, str)) if isinstance(raw_urls, list) else ()
        )
        return cls(
            media_type, digest, size, annotations, Platform.from_json(data.get("platform")), urls
        )


@dataclass(frozen=True)
class Credentials:
    """What a pull authenticates with; secrets never appear in repr or logs."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @classmethod
    def from_auth_field(
        cls, auth: str, *, identity_token: str = "", registry_token: str = ""
    ) -> Credentials:
        """Decode a CRI/docker `auth` field: base64 of `user:password`."""
        try:
            decoded = base64.b64decode(auth.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as err:
            raise ValueError("auth is not base64 of 'user:password'") from err
        username, sep, password = decoded.partition(":")
        if not sep:
            raise ValueError("auth is not base64 of 'user:password' (no ':')")
        return cls(username, password, identity_token, registry_token)

    @classmethod
    def from_cri(
        cls,
        *,
        username: str = "",
        password: str = "",
        auth: str = "",
        identity_token: str = "",
        registry_token: str = "",
    ) -> Credentials | None:
        """From a CRI AuthConfig's fields, like containerd: username/password win over
        `auth`; None when the request carried nothing."""
        if username:
            return cls(username, password, identity_token, registry_token)
        if auth:
            return cls.from_auth_field(
                auth, identity_token=identity_token, registry_token=registry_token
            )
        if identity_token or registry_token:
            return cls(identity_token=identity_token, registry_token=registry_token)
        return None

    @property
    def empty(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)


@dataclass(frozen=True)
class ResolvedImage:
    """An image reference resolved to the platform manifest to unpack, with its config.

    `target` is what a containerd image record should point at: the index when
    the reference named one, otherwise the manifest.
    """

    reference: Reference
    name: str
    index: Descriptor | None
    index_bytes: bytes | None = field(repr=False)
    manifest: Descriptor
    manifest_bytes: bytes = field(repr=False)
    config: Descriptor
    config_bytes: bytes = field(repr=False)
    layers: tuple[Descriptor, ...]
    target: Descriptor
    endpoint: str

    @property
    def repo_digest(self) -> str:
        """`repository@digest` of the target, as CRI reports in `repo_digests`."""
        return str(self.reference.with_digest(self.target.digest))


__all__ = [
    "CONFIG_MEDIA_TYPES",
    "DOCKER_CONFIG",
    "DOCKER_FOREIGN_LAYER",
    "DOCKER_LAYER",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "DOCKER_SCHEMA1_MANIFEST",
    "DOCKER_SCHEMA1_SIGNED_MANIFEST",
    "INDEX_MEDIA_TYPES",
    "LAYER_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_NONDISTRIBUTABLE",
    "OCI_LAYER_NONDISTRIBUTABLE_GZIP",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "SCHEMA1_MEDIA_TYPES",
    "Credentials",
    "Descriptor",
    "Platform",
    "ResolvedImage",
    "host_platform",
]
