"""A maximum received gRPC message size, which grpclib lacks.

grpclib reads a message by its 5-byte prefix and then `recv_data(length)`,
acknowledging HTTP/2 flow control as bytes arrive, so a client can stream a
message of any size into memory before it is decoded. Every server stream's
`Buffer` is given a subclass whose `read` refuses a length over the limit
before a byte of the body is taken: the client gets RESOURCE_EXHAUSTED with
the message grpc-go (containerd, kubelet) uses, and what it already sent is
at most one flow-control window. The cost per call is one class assignment
and one comparison per read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from grpclib import GRPCError
from grpclib.const import Status
from grpclib.protocol import Buffer
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Handler

from cri_shim.logs import log_event

log = logging.getLogger(__name__)

DEFAULT_MAX_RECV_MESSAGE_SIZE = 16 * 1024 * 1024


def bounded_buffer_class(limit: int) -> type[Buffer]:
    """A Buffer whose reads of more than `limit` bytes (a message body) are refused."""

    class BoundedBuffer(Buffer):
        max_message_size = limit

        def read(self, size: int) -> Coroutine[Any, Any, bytes]:
            if size > limit:
                log_event(
                    log,
                    "grpc message refused: larger than server.max_recv_message_size",
                    level=logging.WARNING,
                    size=size,
                    limit=limit,
                )
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED,
                    f"grpc: received message larger than max ({size} vs. {limit})",
                )
            return Buffer.read(self, size)

    return BoundedBuffer


class BoundedHandler(Handler):
    """grpclib's per-connection handler, bounding each new stream's messages."""

    buffer_class: type[Buffer] = Buffer

    def accept(self, stream: H2Stream, headers: Any, release_stream: Callable[[], Any]) -> None:
        stream.buffer.__class__ = self.buffer_class
        super().accept(stream, headers, release_stream)


__all__ = [
    "DEFAULT_MAX_RECV_MESSAGE_SIZE",
    "BoundedHandler",
    "bounded_buffer_class",
]
