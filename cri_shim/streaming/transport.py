"""Byte channels a SPDY connection runs over.

SPDY needs nothing but an ordered byte stream in each direction. On the
server that is either an HTTP connection taken over after a `101 Switching
Protocols` reply, or the binary messages of a WebSocket (crictl's
`SPDY/3.1+portforward.k8s.io` tunnelling); tests and our Python client use
plain asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from cri_shim.logs import log_event

log = logging.getLogger(__name__)


class ByteChannel(Protocol):
    async def read(self) -> bytes:
        """The next bytes that arrived; b"" once the peer closed (or the channel broke)."""
        ...

    async def write(self, data: bytes) -> None:
        """Send bytes in order; raises ConnectionError once the channel is gone."""
        ...

    async def close(self) -> None:
        """Close both directions; idempotent."""
        ...


class InboundBuffer:
    """What a peer sent on one stream or channel and no reader has taken yet.

    Unbounded by itself: the connection's reader waits for `drained()` before
    delivering more once `full`, so back-pressure reaches the peer through TCP.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self.ended = False

    @property
    def full(self) -> bool:
        return self._size > self.limit

    async def drained(self) -> None:
        await self._drained.wait()

    def put(self, data: bytes) -> None:
        if data and not self.ended:
            self._chunks.append(data)
            self._size += len(data)
            if self.full:
                self._drained.clear()
            self._ready.set()

    def discard(self) -> int:
        """Drop what no reader took (the stream was reset); returns how many bytes."""
        dropped = self._size
        self._chunks.clear()
        self._size = 0
        self._drained.set()
        return dropped

    def end(self) -> None:
        """No more data will come; readers get what is left, then b""."""
        self.ended = True
        self._ready.set()
        self._drained.set()

    async def get(self) -> bytes:
        while not self._chunks:
            if self.ended:
                return b""
            self._ready.clear()
            await self._ready.wait()
        data = self._chunks.popleft()
        self._size -= len(data)
        if not self.full:
            self._drained.set()
        return data


class StreamChannel:
    """An asyncio (reader, writer) pair as a ByteChannel."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        try:
            return await self._reader.read(256 * 1024)
        except (ConnectionError, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("channel closed")
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


# Bytes taken from the socket and not yet read before the socket is paused.
_READ_HIGH_WATER = 1024 * 1024
# Seconds a closed connection may take to flush what it still has to send.
_FLUSH_GRACE = 5.0


class _RawParser:
    """What aiohttp calls with the bytes that follow an accepted upgrade."""

    def __init__(self, owner: UpgradedChannel) -> None:
        self._owner = owner

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._owner._arrived(data)
        return False, b""

    def feed_eof(self) -> None:
        self._owner._arrived(b"")


class UpgradedChannel:
    """The raw connection under an aiohttp request once `101` has been sent.

    This is how aiohttp's own WebSocketResponse takes a connection over: a
    parser installed on the request's protocol receives every later byte, and
    writes go straight to the transport with the protocol's drain. Reading is
    paused while more than `_READ_HIGH_WATER` bytes wait to be read, so a
    slow consumer pushes back on the peer instead of growing memory.
    """

    def __init__(self, request: web.Request) -> None:
        self._request = request
        protocol: Any = request.protocol
        self._protocol = protocol
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._closed = False
        self._peer_done = asyncio.Event()
        protocol.set_parser(_RawParser(self))

    def _arrived(self, data: bytes) -> None:
        if data and self._closed:
            return  # closing: the peer's last bytes are read and dropped
        if data:
            self._chunks.append(data)
            self._size += len(data)
            if self._size > _READ_HIGH_WATER and not self._paused:
                self._paused = True
                transport = self._request.transport
                if transport is not None:
                    transport.pause_reading()
        else:
            self._eof = True
            self._peer_done.set()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        while not self._chunks:
            if self._eof or self._closed:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._paused and self._size <= _READ_HIGH_WATER // 2:
            self._paused = False
            transport = self._request.transport
            if transport is not None and not self._closed:
                transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing() or self._closed:
            raise ConnectionResetError("connection closed")
        transport.write(data)
        # aiohttp's protocol implements asyncio flow control for its transport.
        await self._protocol._drain_helper()

    async def close(self) -> None:
        """Half-close, let the peer finish, then close.

        Closing a socket that still has unread bytes from the peer (its window
        updates, say) makes the kernel send RST, and the peer's kernel then
        drops whatever it had received but not yet handed to the client: the
        end of a large output. So: our FIN first, the peer's bytes drained
        until it closes too (at most `_FLUSH_GRACE` seconds), then close.
        """
        if self._closed:
            return
        self._closed = True
        self._chunks.clear()
        self._size = 0
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        transport = self._request.transport
        if transport is None:
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if not self._eof and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()  # sent once what is buffered has gone out
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._peer_done.wait(), _FLUSH_GRACE)
        transport.close()
        if transport.get_write_buffer_size():
            # close() waits to flush; a peer that stopped reading must not keep it open.
            asyncio.get_running_loop().call_later(_FLUSH_GRACE, transport.abort)


class WebSocketChannel:
    """The binary messages of a WebSocket as one byte stream (SPDY tunnelled in WebSocket)."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._lock = asyncio.Lock()

    async def read(self) -> bytes:
        from aiohttp import WSMsgType

        while True:
            try:
                message = await self._ws.receive()
            except (TimeoutError, ConnectionError, RuntimeError):
                return b""
            if message.type is WSMsgType.BINARY:
                data: bytes = message.data
                if data:
                    return data
                continue
            if message.type in (WSMsgType.PING, WSMsgType.PONG):
                continue
            # Text is not part of the tunnelling protocol; close, error, closed end it.
            return b""

    async def write(self, data: bytes) -> None:
        if self._ws.closed:
            raise ConnectionResetError("websocket closed")
        async with self._lock:
            await self._ws.send_bytes(data)

    async def close(self) -> None:
        if not self._ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._ws.close()


async def close_when_idle(
    name: str,
    what: str,
    idle_timeout: float,
    closed: asyncio.Event,
    last_activity: Callable[[], float],
    close: Callable[[], Awaitable[None]],
) -> None:
    """Close a connection once nothing moved on it for `idle_timeout` seconds
    (kubelet's streaming idle timeout); returns when it is closed either way."""
    while not closed.is_set():
        idle = time.monotonic() - last_activity()
        if idle >= idle_timeout:
            log_event(log, f"{what} idle; closing", conn=name, idle_s=round(idle))
            await close()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed.wait(), idle_timeout - idle)
