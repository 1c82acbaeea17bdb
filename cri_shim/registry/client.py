"""The OCI distribution client the image service pulls with.

`resolve` turns a reference into the platform manifest and config to unpack
(fetching and verifying the small JSON documents); `blob_stream` streams a
layer without buffering it so the caller can write it straight into
containerd's content store. Each request goes to the configured endpoints in
order (mirrors first, the registry last) and moves on when one fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
from multidict import CIMultiDict

from cri_shim import __version__
from cri_shim.logs import log_event
from cri_shim.registry import platforms
from cri_shim.registry.auth import Authorizer, describe_credentials, parse_challenges
from cri_shim.registry.digest import DigestVerifier, compute_digest, verify_bytes
from cri_shim.registry.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    PlatformNotFoundError,
    PullStalledError,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
    UnsupportedManifestError,
)
from cri_shim.registry.hosts import Endpoint, RegistryHosts, TlsConfig
from cri_shim.registry.reference import Reference, validate_digest
from cri_shim.registry.types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA1_MEDIA_TYPES,
    Credentials,
    Descriptor,
    Platform,
    ResolvedImage,
    host_platform,
)
from cri_shim.settings import RegistrySettings

log = logging.getLogger("cri_shim.registry")

T = TypeVar("T")

# `*/*` last, as containerd does, so a schema 1 manifest comes back and can be refused clearly.
ACCEPT_MANIFESTS = ", ".join(
    (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST, "*/*")
)
USER_AGENT = f"cri-shim/{__version__}"
# distribution refuses manifests over 4 MiB; anything bigger is not a manifest.
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 32 << 20
MAX_INDEX_DEPTH = 2
CHUNK_SIZE = 1 << 20


class BlobInterruptedError(RegistryError):
    """The connection broke after `received` bytes of the blob; resume with that offset."""

    def __init__(self, message: str, *, received: int, host: str = "", reference: str = "") -> None:
        super().__init__(message, host=host, reference=reference)
        self.received = received


def _config_credentials(endpoint: Endpoint) -> Credentials | None:
    auth = endpoint.auth
    if auth is None:
        return None
    try:
        creds = Credentials.from_cri(
            username=auth.username,
            password=auth.password,
            auth=auth.auth,
            identity_token=auth.identitytoken,
        )
    except ValueError as err:
        raise RegistryError(
            f"registry.configs.{endpoint.host!r}.auth: {err}", host=endpoint.host
        ) from err
    return creds


def _make_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """Blocking (reads CA and key files): run in a thread."""
    context = ssl.create_default_context()
    for ca in tls.ca_files:
        context.load_verify_locations(cafile=ca)
    for cert, key in tls.client_pairs:
        context.load_cert_chain(cert, key or None)
    if tls.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _describe(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _same_error(template: RegistryError, message: str) -> RegistryError:
    """An error of `template`'s type (and status) carrying a new message."""
    if isinstance(template, RegistryAuthError):
        return RegistryAuthError(
            message,
            status_code=template.status_code,
            host=template.host,
            reference=template.reference,
        )
    if isinstance(template, BlobInterruptedError):
        return BlobInterruptedError(
            message, received=template.received, host=template.host, reference=template.reference
        )
    return type(template)(message, host=template.host, reference=template.reference)


def _combine(failures: Sequence[RegistryError], what: str) -> RegistryError:
    """One error for a request every endpoint failed: all 404 is not-found; otherwise
    an auth failure, else the first real failure (as containerd does), names the type."""
    if len(failures) == 1:
        return failures[0]
    if all(isinstance(f, ImageNotFoundError) for f in failures):
        chosen = failures[-1]
    else:
        chosen = next((f for f in failures if isinstance(f, RegistryAuthError)), None) or next(
            f for f in failures if not isinstance(f, ImageNotFoundError)
        )
    detail = "; ".join(str(f) for f in failures)
    return _same_error(chosen, f"{what} failed on all {len(failures)} endpoints: {detail}")


def _media_type(body: Any, content_type: str, expected: Descriptor | None) -> str:
    """The manifest's media type: its own `mediaType`, else the response's, else by shape."""
    declared = body.get("mediaType") if isinstance(body, dict) else None
    if isinstance(declared, str) and declared:
        return declared
    if content_type in INDEX_MEDIA_TYPES | MANIFEST_MEDIA_TYPES | SCHEMA1_MEDIA_TYPES:
        return content_type
    if expected is not None and expected.media_type:
        return expected.media_type
    if isinstance(body, dict):
        if isinstance(body.get("manifests"), list):
            return OCI_INDEX
        if isinstance(body.get("config"), dict) and isinstance(body.get("layers"), list):
            return OCI_MANIFEST
    return content_type


class RegistryClient:
    """Pulls over the OCI distribution API with mirrors, auth and TLS from `RegistrySettings`.

    One per process: it owns the token cache and learned http/https schemes.
    """

    def __init__(
        self, settings: RegistrySettings, *, session: aiohttp.ClientSession | None = None
    ) -> None:
        if settings.stall_timeout <= 0:
            raise ValueError("registry.stall_timeout must be positive")
        self.settings = settings
        self.hosts = RegistryHosts(settings)
        self._session = session
        self._own_session = session is None
        self._auth = Authorizer()
        self._ssl: dict[TlsConfig, ssl.SSLContext] = {}
        # host -> "http"/"https" for endpoints whose scheme we had to discover.
        self._schemes: dict[str, str] = {}

    @property
    def stall_timeout(self) -> float:
        return self.settings.stall_timeout

    @property
    def max_concurrent_downloads(self) -> int:
        """How many layers of one image the caller should fetch at once."""
        return max(1, self.settings.max_concurrent_downloads)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),
                connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=60),
            )
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    # ------------------------------------------------------------------ resolve

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

    # ------------------------------------------------------------------ blobs

    async def blob_stream(
        self,
        image: ResolvedImage,
        descriptor: Descriptor,
        credentials: Credentials | None = None,
        *,
        offset: int = 0,
    ) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset` on, in chunks as they arrive.

        Starts at the endpoint that resolved the image; another endpoint is tried
        only while nothing has been yielded. Raises PullStalledError when no byte
        arrives for `stall_timeout` seconds, BlobInterruptedError when the
        connection breaks mid-blob (resume from `.received`). The caller verifies
        the digest (see DigestVerifier).
        """
        if offset < 0 or (descriptor.size >= 0 and offset > descriptor.size):
            raise ValueError(f"offset {offset} outside blob {descriptor.digest}")
        creds = None if credentials is None or credentials.empty else credentials
        ref = image.reference
        name = image.name
        endpoints = await self._endpoints(ref)
        order = self._pull_order(endpoints, self._endpoint_by_url(endpoints, image.endpoint))
        if not order:
            raise RegistryError(
                f"no endpoint configured for {ref.domain} may pull blobs of {name}",
                host=ref.domain,
                reference=name,
            )
        if offset == descriptor.size:
            return
        failures: list[RegistryError] = []
        for position, endpoint in enumerate(order):
            try:
                endpoint, resp, skip = await self._open_blob(
                    endpoint, ref, descriptor, creds, offset
                )
            except UnsupportedManifestError:
                raise
            except RegistryError as err:
                failures.append(err)
                self._log_fallback(err, endpoint, order, position, name)
                continue
            received = offset
            complete = yielded = False
            try:
                while True:
                    chunk = await self._read_chunk(
                        resp,
                        endpoint,
                        name,
                        functools.partial(_pulling_blob, descriptor, name, received),
                        functools.partial(_blob_broken, endpoint, descriptor, name, received),
                    )
                    if not chunk:
                        break
                    if skip:
                        # The server ignored our Range header: drop what we already have.
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                        if not chunk:
                            continue
                    received += len(chunk)
                    if received > descriptor.size >= 0:
                        raise DigestMismatchError(
                            f"registry {endpoint.host} sent more than the {descriptor.size} "
                            f"bytes of blob {descriptor.digest} of {name}",
                            host=endpoint.host,
                            reference=name,
                        )
                    yielded = True
                    yield chunk
                if received < descriptor.size:
                    raise BlobInterruptedError(
                        f"registry {endpoint.host} ended blob {descriptor.digest} of {name} "
                        f"after {received} of {descriptor.size} bytes",
                        received=received,
                        host=endpoint.host,
                        reference=name,
                    )
                complete = True
            except RegistryError as err:
                if yielded:
                    raise  # the caller has bytes from this endpoint; it decides what next
                failures.append(err)
                self._log_fallback(err, endpoint, order, position, name)
                continue
            finally:
                if complete:
                    resp.release()
                else:
                    resp.close()
            return
        raise _combine(failures, f"fetching blob {descriptor.digest} of {name}")

    async def _open_blob(
        self,
        endpoint: Endpoint,
        ref: Reference,
        descriptor: Descriptor,
        creds: Credentials | None,
        offset: int,
    ) -> tuple[Endpoint, aiohttp.ClientResponse, int]:
        """(endpoint used, open 200/206 response, bytes to skip at its start)."""
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        name = str(ref)
        endpoint, resp = await self._open(
            endpoint, "GET", f"/{ref.path}/blobs/{descriptor.digest}", ref, creds, headers=headers
        )
        try:
            if resp.status == 404:
                raise ImageNotFoundError(
                    f"registry {endpoint.host} has no blob {descriptor.digest} of {name}",
                    host=endpoint.host,
                    reference=name,
                )
            self._check_status(resp, endpoint, f"blob {descriptor.digest}", name)
            skip = 0
            remaining = descriptor.size - offset
            if offset and resp.status == 200:
                skip, remaining = offset, descriptor.size
            elif offset and resp.status == 206:
                content_range = resp.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {offset}-"):
                    raise RegistryError(
                        f"registry {endpoint.host} answered range {content_range!r} to a request "
                        f"for blob {descriptor.digest} from byte {offset}",
                        host=endpoint.host,
                        reference=name,
                    )
            if (
                resp.content_length is not None
                and descriptor.size >= 0
                and resp.content_length != remaining
            ):
                raise DigestMismatchError(
                    f"registry {endpoint.host} offers {resp.content_length} bytes for blob "
                    f"{descriptor.digest} of {name}, expected {remaining}",
                    host=endpoint.host,
                    reference=name,
                )
        except BaseException:
            resp.close()
            raise
        return endpoint, resp, skip

    # ------------------------------------------------------------------ pieces

    async def _endpoints(self, ref: Reference) -> list[Endpoint]:
        return await self.hosts.endpoints(ref.domain)

    @staticmethod
    def _endpoint_by_url(endpoints: Sequence[Endpoint], url: str) -> Endpoint | None:
        for endpoint in endpoints:
            if endpoint.url == url or endpoint.url.partition("://")[2] == url.partition("://")[2]:
                return endpoint
        return None

    @staticmethod
    def _pull_order(endpoints: Sequence[Endpoint], first: Endpoint | None) -> list[Endpoint]:
        """Endpoints that may serve content, the one that answered last first."""
        order = [e for e in endpoints if "pull" in e.capabilities]
        if first is not None:
            key = first.url.partition("://")[2]
            order = [first] + [e for e in order if e.url.partition("://")[2] != key]
        return order

    async def _first(
        self,
        endpoints: Sequence[Endpoint],
        what: str,
        attempt: Callable[[Endpoint], Awaitable[T]],
    ) -> T:
        """`attempt` on each endpoint in turn until one succeeds."""
        failures: list[RegistryError] = []
        for position, endpoint in enumerate(endpoints):
            try:
                return await attempt(endpoint)
            except UnsupportedManifestError:
                raise  # the content itself is unusable; another copy would be the same
            except RegistryError as err:
                failures.append(err)
                self._log_fallback(err, endpoint, endpoints, position, what)
        raise _combine(failures, what)

    @staticmethod
    def _log_fallback(
        err: RegistryError,
        endpoint: Endpoint,
        endpoints: Sequence[Endpoint],
        position: int,
        what: str,
    ) -> None:
        if position + 1 < len(endpoints):
            log_event(
                log,
                "registry endpoint failed, trying the next one",
                level=logging.WARNING,
                endpoint=endpoint.url,
                next=endpoints[position + 1].url,
                what=what,
                error=str(err),
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

    async def _get_small_blob(
        self,
        endpoint: Endpoint,
        ref: Reference,
        descriptor: Descriptor,
        creds: Credentials | None,
    ) -> tuple[Endpoint, bytes]:
        """A blob read into memory (the config), verified."""
        name = str(ref)
        endpoint, resp, _ = await self._open_blob(endpoint, ref, descriptor, creds, 0)
        try:
            body = await self._read_small(
                resp, endpoint, descriptor.size, f"blob {descriptor.digest}", name
            )
        finally:
            resp.release()
        self._verify(body, descriptor, endpoint, f"blob {descriptor.digest}", name)
        return endpoint, body

    @staticmethod
    def _verify(
        body: bytes, descriptor: Descriptor, endpoint: Endpoint, what: str, name: str
    ) -> None:
        if descriptor.size < 0:
            descriptor = dataclasses.replace(descriptor, size=len(body))
        try:
            verify_bytes(body, descriptor, host=endpoint.host, reference=name)
        except DigestMismatchError as err:
            raise DigestMismatchError(
                f"registry {endpoint.host} sent a {what} of {name} that does not match its "
                f"digest: {err}",
                host=endpoint.host,
                reference=name,
            ) from err

    def _check_status(
        self, resp: aiohttp.ClientResponse, endpoint: Endpoint, what: str, name: str
    ) -> None:
        if resp.status in (200, 206):
            return
        message = f"registry {endpoint.host} answered HTTP {resp.status} for {what} of {name}"
        if resp.status >= 500 or resp.status in (408, 429):
            raise RegistryUnavailableError(message, host=endpoint.host, reference=name)
        raise RegistryError(message, host=endpoint.host, reference=name)

    async def _read_chunk(
        self,
        resp: aiohttp.ClientResponse,
        endpoint: Endpoint,
        name: str,
        doing: Callable[[], str],
        broken: Callable[[aiohttp.ClientError], RegistryError],
    ) -> bytes:
        """The next chunk of a body (b"" at its end). Silence for `stall_timeout`
        fails the pull as stalled; a connection that breaks becomes `broken(err)`."""
        try:
            async with asyncio.timeout(self.stall_timeout):
                return await resp.content.read(CHUNK_SIZE)
        except TimeoutError as err:
            raise PullStalledError(
                f"registry {endpoint.host} sent nothing for {self.stall_timeout:g}s {doing()}",
                host=endpoint.host,
                reference=name,
            ) from err
        except aiohttp.ClientError as err:
            raise broken(err) from err

    async def _read_small(
        self,
        resp: aiohttp.ClientResponse,
        endpoint: Endpoint,
        limit: int,
        what: str,
        name: str,
    ) -> bytes:
        """Read a whole (small) body, bounded in size and in time between bytes."""
        if resp.content_length is not None and resp.content_length > limit:
            raise UnsupportedManifestError(
                f"registry {endpoint.host} offers {resp.content_length} bytes for {what} of "
                f"{name}; more than the {limit} expected",
                host=endpoint.host,
                reference=name,
            )
        parts: list[bytes] = []
        total = 0
        while True:
            chunk = await self._read_chunk(
                resp,
                endpoint,
                name,
                lambda: f"while sending {what} of {name}",
                lambda err: RegistryUnavailableError(
                    f"registry {endpoint.host} broke off {what} of {name}: {_describe(err)}",
                    host=endpoint.host,
                    reference=name,
                ),
            )
            if not chunk:
                return b"".join(parts)
            total += len(chunk)
            if total > limit:
                raise DigestMismatchError(
                    f"registry {endpoint.host} sent more than {limit} bytes for {what} of {name}",
                    host=endpoint.host,
                    reference=name,
                )
            parts.append(chunk)

    @staticmethod
    def _json(body: bytes, what: str, name: str, host: str) -> Any:
        try:
            return json.loads(body)
        except ValueError as err:
            raise UnsupportedManifestError(
                f"{what} of {name} from {host} is not valid JSON: {err}", host=host, reference=name
            ) from err

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

    # ------------------------------------------------------------------ HTTP

    def _learned(self, endpoint: Endpoint) -> Endpoint:
        scheme = self._schemes.get(endpoint.host) if endpoint.http_fallback else None
        return endpoint.with_scheme(scheme) if scheme else endpoint

    async def _open(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        ref: Reference,
        creds: Credentials | None,
        *,
        headers: Mapping[str, str],
    ) -> tuple[Endpoint, aiohttp.ClientResponse]:
        """Send an authorised request; the response is open and not a 401/403.

        Transport failures become RegistryUnavailableError, silence PullStalledError.
        An endpoint of unknown scheme is tried over https, then plain http.
        """
        name = str(ref)
        endpoint = self._learned(endpoint)
        try:
            if endpoint.http_fallback:
                try:
                    return await self._discover(
                        endpoint, "https", method, path, ref, creds, headers
                    )
                except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as err:
                    log_event(
                        log,
                        "https failed, trying plain http",
                        level=logging.DEBUG,
                        host=endpoint.host,
                        error=_describe(err),
                    )
                endpoint = endpoint.with_scheme("http")
                return await self._discover(endpoint, "http", method, path, ref, creds, headers)
            return endpoint, await self._authorised(endpoint, method, path, ref, creds, headers)
        except aiohttp.ConnectionTimeoutError as err:
            raise RegistryUnavailableError(
                f"registry {endpoint.host} did not accept a connection within "
                f"{endpoint.dial_timeout:g}s ({name})",
                host=endpoint.host,
                reference=name,
            ) from err
        except TimeoutError as err:
            raise PullStalledError(
                f"registry {endpoint.host} did not answer {method} {path} within "
                f"{self.stall_timeout:g}s ({name})",
                host=endpoint.host,
                reference=name,
            ) from err
        except aiohttp.ClientError as err:
            raise RegistryUnavailableError(
                f"registry {endpoint.host} unreachable for {name}: {_describe(err)}",
                host=endpoint.host,
                reference=name,
            ) from err
        except (OSError, ssl.SSLError) as err:
            raise RegistryUnavailableError(
                f"registry {endpoint.host} TLS setup failed for {name}: {_describe(err)}",
                host=endpoint.host,
                reference=name,
            ) from err

    async def _discover(
        self,
        endpoint: Endpoint,
        scheme: str,
        method: str,
        path: str,
        ref: Reference,
        creds: Credentials | None,
        headers: Mapping[str, str],
    ) -> tuple[Endpoint, aiohttp.ClientResponse]:
        """One try at `scheme`; any HTTP answer (even a refusal) proves the scheme works."""
        endpoint = endpoint.with_scheme(scheme)
        try:
            resp = await self._authorised(endpoint, method, path, ref, creds, headers)
        except RegistryAuthError:
            self._schemes[endpoint.host] = scheme
            raise
        self._schemes[endpoint.host] = scheme
        return endpoint, resp

    async def _ssl_for(self, endpoint: Endpoint) -> ssl.SSLContext | bool:
        if endpoint.scheme != "https" or endpoint.tls.is_default:
            return True
        context = self._ssl.get(endpoint.tls)
        if context is None:
            context = await asyncio.to_thread(_make_ssl_context, endpoint.tls)
            self._ssl[endpoint.tls] = context
        return context

    async def _authorised(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        ref: Reference,
        creds: Credentials | None,
        headers: Mapping[str, str],
    ) -> aiohttp.ClientResponse:
        name = str(ref)
        effective = creds if creds is not None else _config_credentials(endpoint)
        scope = f"repository:{ref.path}:pull"
        ssl_context = await self._ssl_for(endpoint)
        auth = await self._auth.prepare(
            self.session,
            endpoint.host,
            scope,
            effective,
            ssl_context=ssl_context,
            timeout=self.stall_timeout,
            reference=name,
        )
        resp = await self._send(endpoint, method, path, ref, headers, auth, ssl_context)
        if resp.status == 401:
            raw = resp.headers.getall("WWW-Authenticate", [])
            resp.release()
            challenge = self._auth.learn(endpoint.host, parse_challenges(raw))
            if challenge is None:
                raise RegistryAuthError(
                    f"registry {endpoint.host} wants an authentication scheme cri-shim does not "
                    f"speak ({', '.join(raw) or 'no WWW-Authenticate header'}) for {name}",
                    status_code=401,
                    host=endpoint.host,
                    reference=name,
                )
            self._auth.forget(endpoint.host, scope, effective)
            retry = await self._auth.answer(
                self.session,
                endpoint.host,
                challenge,
                scope,
                effective,
                ssl_context=ssl_context,
                timeout=self.stall_timeout,
                reference=name,
            )
            if retry is None or (retry == auth and challenge.scheme == "basic"):
                raise self._auth_error(endpoint, 401, effective, name)
            resp = await self._send(endpoint, method, path, ref, headers, retry, ssl_context)
            if resp.status == 401:
                resp.release()
                raise self._auth_error(endpoint, 401, effective, name)
        if resp.status == 403:
            resp.release()
            raise self._auth_error(endpoint, 403, effective, name)
        return resp

    @staticmethod
    def _auth_error(
        endpoint: Endpoint, status: int, creds: Credentials | None, name: str
    ) -> RegistryAuthError:
        host = endpoint.host
        if status == 403:
            message = (
                f"registry {host} denied access to {name} with "
                f"{describe_credentials(creds)} ({status})"
            )
        elif creds is None or creds.empty:
            message = (
                f"registry {host} requires authentication to pull {name} "
                f"(or the repository does not exist) ({status})"
            )
        else:
            message = (
                f"registry {host} refused {describe_credentials(creds)} ({status}) pulling {name}"
            )
        return RegistryAuthError(message, status_code=status, host=host, reference=name)

    async def _send(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        ref: Reference,
        headers: Mapping[str, str],
        auth: str | None,
        ssl_context: ssl.SSLContext | bool,
    ) -> aiohttp.ClientResponse:
        all_headers: CIMultiDict[str] = CIMultiDict(endpoint.headers)
        all_headers["User-Agent"] = USER_AGENT
        all_headers.update(headers)
        if auth is not None:
            all_headers["Authorization"] = auth
        params = {"ns": ref.domain} if endpoint.mirror else None
        url = endpoint.url + path
        async with asyncio.timeout(self.stall_timeout):
            resp = await self.session.request(
                method,
                url,
                params=params,
                headers=all_headers,
                ssl=ssl_context,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=endpoint.dial_timeout),
            )
        log_event(
            log,
            "registry request",
            level=logging.DEBUG,
            host=endpoint.host,
            method=method,
            path=path,
            ref=str(ref),
            status=resp.status,
        )
        return resp


__all__ = [
    "ACCEPT_MANIFESTS",
    "BlobInterruptedError",
    "DigestVerifier",
    "RegistryClient",
]


def _pulling_blob(descriptor: Descriptor, name: str, received: int) -> str:
    return (
        f"while pulling blob {descriptor.digest} of {name} "
        f"({received} of {descriptor.size} bytes received)"
    )


def _blob_broken(
    endpoint: Endpoint, descriptor: Descriptor, name: str, received: int, err: aiohttp.ClientError
) -> RegistryError:
    return BlobInterruptedError(
        f"registry {endpoint.host} broke off blob {descriptor.digest} of "
        f"{name} after {received} of {descriptor.size} bytes: "
        f"{_describe(err)}",
        received=received,
        host=endpoint.host,
        reference=name,
    )
