"""The WebSocket flavours of exec, attach and port-forward.

Channel protocols (kubelet's wsstream): every message starts with a channel
number, then that channel's bytes. `channel.k8s.io` and its `v4.`/`v5.`
successors send raw bytes in binary messages; the `base64.` variants send
text messages whose first character is the channel as an ASCII digit and
whose rest is base64. v5 adds a close signal: the client sends `[255, n]` to
half-close channel n (its stdin). Remote commands use channels 0-4 (stdin,
stdout, stderr, error, resize); port-forward uses a data and an error channel
per requested port. The server announces readiness with an empty message on
the first output channel, and ends the session with a normal close.

SPDY tunnelling (`SPDY/3.1+portforward.k8s.io`, what crictl `-r websocket`
and kubectl use for port-forward): the binary messages together carry the
bytes of an ordinary SPDY connection, served exactly as over HTTP upgrade.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from cri_shim.concurrency import cancel_and_wait
from cri_shim.logs import log_event
from cri_shim.streaming import portforward, remotecommand
from cri_shim.streaming.remotecommand import RemoteStreams, Session, StreamOptions
from cri_shim.streaming.transport import InboundBuffer, close_when_idle

log = logging.getLogger(__name__)

CHANNEL_PROTOCOL = "channel.k8s.io"
BASE64_CHANNEL_PROTOCOL = "base64.channel.k8s.io"
V4_PROTOCOL = "v4.channel.k8s.io"
V4_BASE64_PROTOCOL = "v4.base64.channel.k8s.io"
V5_PROTOCOL = "v5.channel.k8s.io"
TUNNEL_PREFIX = "SPDY/3.1+"
TUNNEL_SUFFIX = ".k8s.io"
CLOSE_SIGNAL = 255

# "" is a client that asked for no subprotocol: plain binary channels.
REMOTECOMMAND_PROTOCOLS = (
    V5_PROTOCOL,
    V4_PROTOCOL,
    V4_BASE64_PROTOCOL,
    CHANNEL_PROTOCOL,
    BASE64_CHANNEL_PROTOCOL,
    "",
)
PORTFORWARD_PROTOCOLS = (V4_PROTOCOL, V4_BASE64_PROTOCOL, "")
BASE64_PROTOCOLS = frozenset({BASE64_CHANNEL_PROTOCOL, V4_BASE64_PROTOCOL})
# Largest message we accept: a tunnelled SPDY frame can be 16 MiB.
MAX_MESSAGE = 17 * 1024 * 1024
# Unread bytes one channel may hold before the reader waits for its consumer.
CHANNEL_BUFFER = 4 * 1024 * 1024

STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)


def is_websocket(request: web.Request) -> bool:
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    connection = "upgrade" in request.headers.get("Connection", "").lower()
    return upgrade and connection


def requested_protocols(request: web.Request) -> list[str]:
    values = request.headers.getall("Sec-WebSocket-Protocol", [])
    return [p.strip() for value in values for p in value.split(",") if p.strip()]


def negotiate(requested: list[str], supported: tuple[str, ...]) -> str | None:
    """The client's first protocol the server speaks; "" for a client that named none."""
    if not requested:
        return "" if "" in supported else None
    for protocol in requested:
        if protocol and protocol in supported:
            return protocol
    return None


def tunnelled_protocol(requested: list[str], supported: tuple[str, ...]) -> str | None:
    """`SPDY/3.1+<protocol>` the client offers for a protocol we speak over SPDY."""
    for protocol in requested:
        inner = protocol[len(TUNNEL_PREFIX) :]
        tunnelled = protocol.startswith(TUNNEL_PREFIX) and protocol.endswith(TUNNEL_SUFFIX)
        if tunnelled and inner in supported:
            return protocol
    return None


def refuse(requested: list[str], supported: tuple[str, ...]) -> web.Response:
    shown = [p for p in supported if p]
    return web.Response(
        status=403,
        text=f"requested protocol(s) are not supported: {requested}; supports {shown}",
    )


async def accept(request: web.Request, protocol: str) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(
        protocols=(protocol,) if protocol else (),
        autoping=True,
        max_msg_size=MAX_MESSAGE,
        compress=False,
    )
    await ws.prepare(request)
    return ws


class Channel:
    """One channel: what the client sent on it (InputSource) and a way to send on it."""

    def __init__(self, conn: ChannelConnection, number: int, *, readable: bool) -> None:
        self.conn = conn
        self.number = number
        self.readable = readable
        self.inbound = InboundBuffer(CHANNEL_BUFFER)

    def _deliver(self, data: bytes) -> None:
        if self.readable:
            self.inbound.put(data)

    def close_read(self) -> None:
        self.inbound.end()

    async def read(self) -> bytes:
        if not self.readable:
            return b""
        return await self.inbound.get()

    async def write(self, data: bytes) -> None:
        await self.conn.send(self.number, data)

    async def close(self) -> None:
        """Channels are not closed one by one towards the client: the session's end closes all."""


class ChannelConnection:
    """A WebSocket speaking kubelet's channel protocol."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        protocol: str,
        readable: list[bool],
        *,
        idle_timeout: float | None = None,
        name: str = "",
    ) -> None:
        self.ws = ws
        self.protocol = protocol
        self.base64 = protocol in BASE64_PROTOCOLS
        self.close_signal = protocol == V5_PROTOCOL
        self.channels = [Channel(self, n, readable=r) for n, r in enumerate(readable)]
        self.idle_timeout = idle_timeout
        self.name = name
        self.closed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._last_activity = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._read_loop(), name=f"ws-read {self.name}"))
        if self.idle_timeout:
            self._tasks.append(asyncio.create_task(self._idle_watch(), name=f"ws-idle {self.name}"))

    async def send(self, number: int, data: bytes) -> None:
        async with self._send_lock:
            if self.ws.closed or self.closed.is_set():
                raise ConnectionResetError("websocket closed")
            try:
                if self.base64:
                    await self.ws.send_str(chr(ord("0") + number) + base64.b64encode(data).decode())
                else:
                    await self.ws.send_bytes(bytes([number]) + data)
            except (ConnectionError, RuntimeError) as err:
                self._lost()
                raise ConnectionResetError(f"websocket send failed: {err}") from err
        self._last_activity = time.monotonic()

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                self._last_activity = time.monotonic()
                if message.type is WSMsgType.BINARY:
                    payload: bytes = message.data
                elif message.type is WSMsgType.TEXT:
                    payload = message.data.encode("utf-8", "replace")
                elif message.type in (WSMsgType.PING, WSMsgType.PONG):
                    continue
                else:
                    break
                if not payload:
                    continue
                if self.close_signal and payload[0] == CLOSE_SIGNAL:
                    if len(payload) != 2 or payload[1] >= len(self.channels):
                        log_event(log, "bad close signal", level=logging.WARNING, conn=self.name)
                        break
                    self.channels[payload[1]].close_read()
                    continue
                number = payload[0] - ord("0") if self.base64 else payload[0]
                if not 0 <= number < len(self.channels):
                    continue  # kubelet ignores frames for channels it does not have
                data = payload[1:]
                if self.base64:
                    try:
                        data = base64.b64decode(data, validate=True)
                    except (binascii.Error, ValueError):
                        log_event(log, "bad base64 frame", level=logging.WARNING, conn=self.name)
                        continue
                channel = self.channels[number]
                if channel.inbound.full:
                    await channel.inbound.drained()
                channel._deliver(data)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            self._lost()

    async def _idle_watch(self) -> None:
        assert self.idle_timeout is not None
        await close_when_idle(
            self.name,
            "websocket",
            self.idle_timeout,
            self.closed,
            lambda: self._last_activity,
            self.close,
        )

    def _lost(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for channel in self.channels:
            channel.close_read()

    async def close(self) -> None:
        """A normal close (the client reads it as the end of every channel)."""
        self._lost()
        with contextlib.suppress(ConnectionError, RuntimeError, asyncio.TimeoutError):
            await self.ws.close()
        await cancel_and_wait(self._tasks)


async def serve_remotecommand(
    ws: web.WebSocketResponse,
    protocol: str,
    options: StreamOptions,
    session: Session,
    *,
    failure: str,
    idle_timeout: float | None,
    **fields: Any,
) -> None:
    readable = [options.stdin, False, False, False, True]
    conn = ChannelConnection(ws, protocol, readable, idle_timeout=idle_timeout, name=str(fields))
    conn.start()
    try:
        first = STDOUT if options.stdout else STDERR if options.stderr else ERROR
        await conn.send(first, b"")  # ready: the streams exist
        channels = conn.channels
        streams = RemoteStreams(
            stdin=channels[STDIN] if options.stdin else None,
            stdout=channels[STDOUT] if options.stdout else None,
            stderr=channels[STDERR] if options.stderr and not options.tty else None,
            tty=options.tty,
            resize=remotecommand.terminal_sizes(channels[RESIZE]) if options.tty else None,
        )
        status = await remotecommand.run_session(
            session, streams, conn.closed, failure=failure, **fields
        )
        if status is not None:
            payload = remotecommand.encode_status(protocol, status)
            if payload:
                with contextlib.suppress(ConnectionError, TimeoutError):
                    await asyncio.wait_for(conn.send(ERROR, payload), remotecommand.FINISH_GRACE)
    except ConnectionError:
        pass
    finally:
        await conn.close()


async def serve_portforward(
    ws: web.WebSocketResponse,
    protocol: str,
    ports: list[int],
    connect: portforward.Connector,
    *,
    idle_timeout: float | None,
    **fields: Any,
) -> None:
    readable = [index % 2 == 0 for index in range(2 * len(ports))]
    conn = ChannelConnection(ws, protocol, readable, idle_timeout=idle_timeout, name=str(fields))
    conn.start()

    async def forward(index: int, port: int) -> None:
        data, error = conn.channels[2 * index], conn.channels[2 * index + 1]
        try:
            pod = await connect(port)
        except portforward.PortForwardError as err:
            log_event(log, "port-forward failed", port=port, error=err, **fields)
            with contextlib.suppress(ConnectionError):
                await error.write(f"error forwarding port {port} to pod: {err}".encode())
            return
        end = portforward.DataEnd(data, data, lambda: conn.closed.is_set())
        await portforward.relay(end, pod, port=port, **fields)

    try:
        for index, port in enumerate(ports):
            prefix = port.to_bytes(2, "little")
            await conn.channels[2 * index].write(prefix)
            await conn.channels[2 * index + 1].write(prefix)
        forwards = [asyncio.create_task(forward(i, p)) for i, p in enumerate(ports)]
        everything: asyncio.Future[list[Any]] = asyncio.gather(*forwards, return_exceptions=True)
        gone: asyncio.Future[Any] = asyncio.ensure_future(conn.closed.wait())
        try:
            await asyncio.wait([everything, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            everything.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await everything
    except ConnectionError:
        pass
    finally:
        await conn.close()
