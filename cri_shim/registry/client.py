"""The OCI distribution client the image service pulls with.

`resolve` turns a reference into the platform manifest and config to unpack
(fetching and verifying the small JSON documents); `blob_stream` streams a
layer without buffering it so the caller can write it straight into
containerd's content store. Each request goes to the configured endpoints in
order (mirrors first, the registry last) and moves on when one fails.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging

from cri_shim.logs import log_event
from cri_shim.registry import platforms
from cri_shim.registry.blobs import RegistryBlobs
from cri_shim.registry.digest import DigestVerifier, compute_digest
from cri_shim.registry.errors import (
    ImageNotFoundError,
    PlatformNotFoundError,
    RegistryError,
    UnsupportedManifestError,
)
from cri_shim.registry.hosts import Endpoint
from cri_shim.registry.reference import Reference, validate_digest
from cri_shim.registry.transport import (
    ACCEPT_MANIFESTS,
    MAX_CONFIG_SIZE,
    MAX_INDEX_DEPTH,
    MAX_MANIFEST_SIZE,
    BlobInterruptedError,
    _media_type,
)
from cri_shim.registry.types import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    SCHEMA1_MEDIA_TYPES,
    Credentials,
    Descriptor,
    Platform,
    ResolvedImage,
    host_platform,
)

log = logging.getLogger("cri_shim.registry")

__all__ = [
    "ACCEPT_MANIFESTS",
    "MAX_CONFIG_SIZE",
    "MAX_MANIFEST_SIZE",
    "BlobInterruptedError",
    "DigestVerifier",
    "RegistryClient",
]


class RegistryClient(RegistryBlobs):
    """Resolves references to manifests (indexes, platforms) and streams their blobs."""

    async def resolve(
        self,
        ref: Reference,
        credentials: Credentials | None = None,
        platform: Platform | None = None,
    ) -> ResolvedImage:
        """Fetch and verify the manifest (through an index for `platform`, this host's by
        default) and the config of `ref`."""
        creds = None if credentials is None or credentials.empty else credentials
        want = platform or host_platform()
        name = str(ref)
        endpoints = await self._endpoints(ref)
        capability = "resolve" if ref.digest is None else "pull"
        first = [
            e for e in endpoints if capability in e.capabilities or "resolve" in e.capabilities
        ]
        if not first:
            raise RegistryError(
                f"no endpoint configured for {ref.domain} may {capability} {name} "
                "(check the capabilities in its hosts.toml)",
                host=ref.domain,
                reference=name,
            )
        log_event(log, "resolving image", level=logging.DEBUG, ref=name, platform=str(want))
        expected = Descriptor("", ref.digest, -1) if ref.digest is not None else None
        endpoint, top, top_bytes = await self._first(
            first,
            f"resolving {name}",
            functools.partial(
                self._get_manifest, ref=ref, obj=ref.object, expected=expected, creds=creds
            ),
        )
        resolved_endpoint = endpoint
        index: Descriptor | None = None
        index_bytes: bytes | None = None
        manifest, manifest_bytes = top, top_bytes
        depth = 0
        while manifest.media_type in INDEX_MEDIA_TYPES:
            depth += 1
            if depth > MAX_INDEX_DEPTH:
                raise UnsupportedManifestError(
                    f"{name}: indexes nested more than {MAX_INDEX_DEPTH} deep",
                    host=endpoint.host,
                    reference=name,
                )
            entries = self._index_entries(manifest_bytes, name, endpoint.host)
            chosen = platforms.select(entries, want)
            if chosen is None:
                listed = ", ".join(
                    sorted({str(e.platform) for e in entries if e.platform is not None})
                )
                raise PlatformNotFoundError(
                    f"{name} has no image for platform {want} (it has: {listed or 'none'})",
                    host=endpoint.host,
                    reference=name,
                )
            if index is None:
                index, index_bytes = manifest, manifest_bytes
            endpoint, manifest, manifest_bytes = await self._first(
                self._pull_order(endpoints, endpoint),
                f"fetching manifest {chosen.digest} of {name}",
                functools.partial(
                    self._get_manifest, ref=ref, obj=chosen.digest, expected=chosen, creds=creds
                ),
            )
        if manifest.media_type not in MANIFEST_MEDIA_TYPES:
            raise UnsupportedManifestError(
                f"{name}: unsupported manifest media type {manifest.media_type!r}",
                host=endpoint.host,
                reference=name,
            )
        config, layers = self._manifest_parts(manifest_bytes, name, endpoint.host)
        if config.size > MAX_CONFIG_SIZE:
            raise UnsupportedManifestError(
                f"{name}: image config of {config.size} bytes is larger than the "
                f"{MAX_CONFIG_SIZE >> 20} MiB we accept",
                host=endpoint.host,
                reference=name,
            )
        endpoint, config_bytes = await self._first(
            self._pull_order(endpoints, endpoint),
            f"fetching config {config.digest} of {name}",
            functools.partial(self._get_small_blob, ref=ref, descriptor=config, creds=creds),
        )
        config_json = self._json(config_bytes, f"config {config.digest}", name, endpoint.host)
        if manifest.platform is None:
            manifest = dataclasses.replace(manifest, platform=Platform.from_json(config_json))
        log_event(
            log,
            "resolved image",
            level=logging.DEBUG,
            ref=name,
            digest=(index or manifest).digest,
            manifest=manifest.digest,
            platform=str(manifest.platform or ""),
            endpoint=resolved_endpoint.url,
        )
        return ResolvedImage(
            reference=ref,
            name=name,
            index=index,
            index_bytes=index_bytes,
            manifest=manifest,
            manifest_bytes=manifest_bytes,
            config=config,
            config_bytes=config_bytes,
            layers=layers,
            target=index or manifest,
            endpoint=resolved_endpoint.url,
        )

    async def _get_manifest(
        self,
        endpoint: Endpoint,
        ref: Reference,
        obj: str,
        expected: Descriptor | None,
        creds: Credentials | None,
    ) -> tuple[Endpoint, Descriptor, bytes]:
        """GET a manifest or index by tag or digest, verified against what named it."""
        name = str(ref)
        endpoint, resp = await self._open(
            endpoint,
            "GET",
            f"/{ref.path}/manifests/{obj}",
            ref,
            creds,
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        try:
            if resp.status == 404:
                raise ImageNotFoundError(
                    f"{name} not found at {endpoint.host} (manifest {obj} unknown)",
                    host=endpoint.host,
                    reference=name,
                )
            self._check_status(resp, endpoint, f"manifest {obj}", name)
            body = await self._read_small(
                resp, endpoint, MAX_MANIFEST_SIZE, f"manifest {obj}", name
            )
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            header_digest = resp.headers.get("Docker-Content-Digest", "")
        finally:
            resp.release()
        parsed = self._json(body, f"manifest {obj}", name, endpoint.host)
        media_type = _media_type(parsed, content_type, expected)
        if media_type in SCHEMA1_MEDIA_TYPES or (
            isinstance(parsed, dict) and parsed.get("schemaVersion") == 1
        ):
            raise UnsupportedManifestError(
                f"{name} is a Docker schema 1 image, which cri-shim (like containerd 2) does "
                "not pull; push it again with a current docker, buildah or crane",
                host=endpoint.host,
                reference=name,
            )
        if expected is not None:
            self._verify(body, expected, endpoint, f"manifest {obj}", name)
            digest = expected.digest
        elif header_digest:
            if validate_digest(header_digest) is not None:
                raise RegistryError(
                    f"registry {endpoint.host} sent an invalid Docker-Content-Digest "
                    f"{header_digest!r} for {name}",
                    host=endpoint.host,
                    reference=name,
                )
            digest = header_digest
            self._verify(body, Descriptor("", digest, -1), endpoint, f"manifest {obj}", name)
        else:
            digest = compute_digest(body)
        if expected is not None and expected.media_type:
            descriptor = dataclasses.replace(expected, media_type=media_type, size=len(body))
        else:
            descriptor = Descriptor(media_type, digest, len(body))
        log_event(
            log,
            "fetched manifest",
            level=logging.DEBUG,
            host=endpoint.host,
            ref=name,
            object=obj,
            digest=digest,
            media_type=media_type,
        )
        return endpoint, descriptor, body

    @staticmethod
    def _index_entries(body: bytes, name: str, host: str) -> list[Descriptor]:
        data = json.loads(body)
        manifests = data.get("manifests") if isinstance(data, dict) else None
        if not isinstance(manifests, list):
            raise UnsupportedManifestError(
                f"index of {name} from {host} has no manifests list", host=host, reference=name
            )
        entries: list[Descriptor] = []
        for i, item in enumerate(manifests):
            try:
                entry = Descriptor.from_json(item, f"index entry {i}")
            except ValueError as err:
                raise UnsupportedManifestError(
                    f"index of {name} from {host}: {err}", host=host, reference=name
                ) from err
            if entry.media_type in MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES or not entry.media_type:
                entries.append(entry)
        return entries

    @staticmethod
    def _manifest_parts(
        body: bytes, name: str, host: str
    ) -> tuple[Descriptor, tuple[Descriptor, ...]]:
        data = json.loads(body)
        try:
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            config = Descriptor.from_json(data.get("config"), "config")
            raw_layers = data.get("layers")
            if raw_layers is None:
                raw_layers = []
            if not isinstance(raw_layers, list):
                raise ValueError("layers is not a list")
            layers = tuple(
                Descriptor.from_json(item, f"layer {i}") for i, item in enumerate(raw_layers)
            )
            for desc in (config, *layers):
                problem = validate_digest(desc.digest)
                if problem is not None:
                    raise ValueError(problem)
        except ValueError as err:
            raise UnsupportedManifestError(
                f"manifest of {name} from {host}: {err}", host=host, reference=name
            ) from err
        return config, layers
