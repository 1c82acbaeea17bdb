"""The registry client's transport: sessions, TLS, mirrors in order, auth
(basic and bearer tokens), bodies read with a stall timeout. `manifests` and
`blobs` build on it; `client.RegistryClient` is the whole client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
from multidict import CIMultiDict

from cri_shim import __version__
from cri_shim.logs import log_event
from cri_shim.registry.auth import Authorizer, describe_credentials, parse_challenges
from cri_shim.registry.digest import verify_bytes
from cri_shim.registry.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    PullStalledError,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
    UnsupportedManifestError,
)
from cri_shim.registry.hosts import Endpoint, RegistryHosts, TlsConfig
from cri_shim.registry.reference import Reference
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


def _resolve_priority(failure: RegistryError) -> int:
    """containerd's resolver ranks what each host said: an error answer (401, 403,
    5xx, ...) over not-found over no answer at all (unreachable, TLS, stalled)."""
    if isinstance(failure, ImageNotFoundError):
        return 2
    if isinstance(failure, RegistryUnavailableError) and not failure.http_status:
        return 1
    if isinstance(failure, PullStalledError):
        return 1
    return 3


def _combine(failures: Sequence[RegistryError], what: str) -> RegistryError:
    """One error for a request every endpoint failed, of the type containerd's resolver
    would return: the first failure of the highest rank (`_resolve_priority`), an
    auth failure first among error answers; the message names every endpoint."""
    if len(failures) == 1:
        return failures[0]
    top = max(_resolve_priority(f) for f in failures)
    ranked = [f for f in failures if _resolve_priority(f) == top]
    chosen = next((f for f in ranked if isinstance(f, RegistryAuthError)), ranked[0])
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


class RegistryTransport:
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
            raise RegistryUnavailableError(
                message, host=endpoint.host, reference=name, http_status=resp.status
            )
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
