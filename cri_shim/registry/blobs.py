"""Blobs: layers streamed with resume and fallback across mirrors, small blobs
(configs) read whole."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator

import aiohttp

from cri_shim.registry.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    RegistryError,
    UnsupportedManifestError,
)
from cri_shim.registry.hosts import Endpoint
from cri_shim.registry.reference import Reference
from cri_shim.registry.transport import (
    BlobInterruptedError,
    RegistryTransport,
    _blob_broken,
    _combine,
    _pulling_blob,
)
from cri_shim.registry.types import (
    Credentials,
    Descriptor,
    ResolvedImage,
)

log = logging.getLogger("cri_shim.registry")


class RegistryBlobs(RegistryTransport):
    """Blob downloads over the transport."""

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
