"""containerd's Content service, typed: the one place its requests are built.

Info, Read, label updates, Abort, and the Write protocol: a bidirectional
stream where STAT takes the ingest lock for a ref and reports how much of a
previous attempt is stored, WRITE appends at an offset, and COMMIT makes
containerd verify size and digest and publish the blob with its labels. Every
exchange is bounded in time, so a containerd that stops answering fails the
write instead of hanging it. What to write, resuming and retrying are the
image code's (`images/content.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from grpclib import GRPCError
from grpclib.client import Stream
from grpclib.const import Cardinality, Status

from cri_shim.containerd.client import ContainerdClient, metadata_for
from cri_shim.errors import ContainerdError, DeadlineExceeded
from cri_shim.gen.containerd.services.content import v1 as content_v1
from cri_shim.gen.google.protobuf import FieldMask

T = TypeVar("T")

WRITE_ROUTE = "/containerd.services.content.v1.Content/Write"


class Content:
    def __init__(self, client: ContainerdClient) -> None:
        self.client = client

    async def info(self, digest: str) -> content_v1.Info | None:
        reply = await self.client.call(
            "Content.Info", self.client.content.info(content_v1.InfoRequest(digest=digest))
        )
        return reply.info

    async def read(self, digest: str, *, limit: int) -> bytes:
        """A whole blob (manifests, configs); refuses anything over `limit` bytes."""
        parts: list[bytes] = []
        total = 0
        responses = self.client.content.read(content_v1.ReadContentRequest(digest=digest))
        async for part in self.client.stream("Content.Read", responses):
            total += len(part.data)
            if total > limit:
                raise ValueError(f"blob {digest} is larger than {limit} bytes")
            parts.append(part.data)
        return b"".join(parts)

    async def update_labels(
        self, digest: str, labels: Mapping[str, str], *, lease: str | None = None
    ) -> None:
        """Merge `labels` into the blob's labels (containerd's `labels.<key>` field paths)."""
        request = content_v1.UpdateRequest(
            info=content_v1.Info(digest=digest, labels=dict(labels)),
            update_mask=FieldMask(paths=[f"labels.{key}" for key in labels]),
        )
        await self.client.call(
            "Content.Update",
            self.client.content.update(request, metadata=metadata_for(self.client, lease)),
        )

    async def abort(self, ref: str) -> None:
        await self.client.call(
            "Content.Abort", self.client.content.abort(content_v1.AbortRequest(ref=ref))
        )

    async def write(
        self,
        session: Callable[[ContentWriter], Awaitable[T]],
        *,
        lease: str | None,
        timeout: float,
    ) -> T:
        """Run `session` on one Write stream (held by `lease`), each exchange
        bounded by `timeout`; containerd's failures come out as ours."""
        metadata = metadata_for(self.client, lease)

        async def call() -> T:
            async with self.client.content.channel.request(
                WRITE_ROUTE,
                Cardinality.STREAM_STREAM,
                content_v1.WriteContentRequest,
                content_v1.WriteContentResponse,
                metadata=metadata,
            ) as stream:
                await stream.send_request()
                return await session(ContentWriter(stream, timeout))

        return await self.client.call("Content.Write", call())


class ContentWriter:
    """One Content.Write stream, one message and answer at a time."""

    def __init__(self, stream: Stream[Any, Any], timeout: float) -> None:
        self.stream = stream
        self.timeout = timeout

    async def stat(self, ref: str, total: int, expected: str) -> int:
        """Take the ingest lock for `ref`; how many bytes containerd already holds."""
        reply = await self._exchange(
            content_v1.WriteContentRequest(
                action=content_v1.WriteAction.STAT, ref=ref, total=total, expected=expected
            ),
            f"content write status of {expected}",
        )
        return reply.offset

    async def write(self, ref: str, offset: int, data: bytes, what: str) -> int:
        """Write `data` at `offset` (0 truncates what is stored); containerd's new offset."""
        reply = await self._exchange(
            content_v1.WriteContentRequest(
                action=content_v1.WriteAction.WRITE, ref=ref, offset=offset, data=data
            ),
            f"content write of {what}",
        )
        return reply.offset

    async def commit(
        self, ref: str, total: int, expected: str, offset: int, labels: Mapping[str, str]
    ) -> None:
        """Verify size and digest and publish the blob; ends the stream."""
        await self._exchange(
            content_v1.WriteContentRequest(
                action=content_v1.WriteAction.COMMIT,
                ref=ref,
                total=total,
                expected=expected,
                offset=offset,
                labels=dict(labels),
            ),
            f"commit of {expected}",
            end=True,
        )

    async def _exchange(
        self, request: content_v1.WriteContentRequest, what: str, *, end: bool = False
    ) -> content_v1.WriteContentResponse:
        """Send one Write message and wait (bounded) for containerd's answer.

        containerd answers an error (or the end after COMMIT) with trailers and a
        stream reset while our side is still open; grpclib then reports the status
        only when the call's context exits, which is where it surfaces from here.
        COMMIT half-closes our side with the message, so its outcome arrives normally.
        """
        stream = self.stream
        try:
            async with asyncio.timeout(self.timeout):
                await stream.send_message(request, end=end)
                reply: content_v1.WriteContentResponse | None = await stream.recv_message()
                if reply is None:
                    await stream.recv_trailing_metadata()
                    raise ContainerdError(
                        "Content.Write", Status.UNKNOWN, f"stream ended during {what}"
                    )
                if end:
                    # containerd repeats its last answer before the trailers.
                    while await stream.recv_message() is not None:
                        pass
                    await stream.recv_trailing_metadata()
        except GRPCError as err:
            raise ContainerdError("Content.Write", err.status, err.message or "") from err
        except TimeoutError as err:
            raise DeadlineExceeded(
                f"containerd did not answer {what} within {self.timeout:g}s"
            ) from err
        return reply


__all__ = ["WRITE_ROUTE", "Content", "ContentWriter"]
