"""Our own client of the streaming server, speaking what kubelet/client-go speak.

SPDY: an HTTP/1.1 `POST` upgrade with `X-Stream-Protocol-Version` headers
(one per protocol offered, as client-go adds them), then client-side SPDY
streams opened in client-go's order (error, stdin, stdout, stderr, resize).
WebSocket: the channel protocols, the base64 variants and v5's close signal.
Port-forward: SPDY stream pairs, v4 WebSocket channels, and SPDY tunnelled in
WebSocket (`SPDY/3.1+portforward.k8s.io`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from cri_shim.streaming.spdy import SpdyConnection, SpdyStream, make_headers
from cri_shim.streaming.transport import StreamChannel

SPDY_REMOTECOMMAND = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
]


class UpgradeRefused(Exception):
    def __init__(self, status: int, headers: dict[str, list[str]], body: bytes) -> None:
        super().__init__(f"upgrade refused: {status} {body[:200]!r}")
        self.status = status
        self.headers = headers
        self.body = body


@dataclass
class HttpReply:
    status: int
    headers: dict[str, list[str]]
    body: bytes = b""

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower(), [])
        return values[0] if values else ""


async def _read_head(reader: asyncio.StreamReader) -> HttpReply:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return HttpReply(status, headers)


async def http_request(
    url: str,
    *,
    method: str = "POST",
    headers: Iterable[tuple[str, str]] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[HttpReply, asyncio.StreamReader, asyncio.StreamWriter]:
    """One raw HTTP/1.1 request; the connection stays open after a 101."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl_context if parts.scheme == "https" else None
    )
    lines = [f"{method} {parts.path} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += ["Content-Length: 0", "", ""]
    writer.write("\r\n".join(lines).encode())
    await writer.drain()
    reply = await _read_head(reader)
    if reply.status != 101:
        length = int(reply.header("content-length") or 0)
        if length:
            reply.body = await reader.readexactly(length)
        writer.close()
    return reply, reader, writer


async def spdy_connect(
    url: str, protocols: list[str], *, ssl_context: ssl.SSLContext | None = None
) -> tuple[SpdyConnection, str]:
    """Upgrade to SPDY/3.1; returns the client connection and the negotiated protocol."""
    headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    headers += [("X-Stream-Protocol-Version", p) for p in protocols]
    reply, reader, writer = await http_request(url, headers=headers, ssl_context=ssl_context)
    if reply.status != 101:
        raise UpgradeRefused(reply.status, reply.headers, reply.body)
    conn = SpdyConnection(StreamChannel(reader, writer), server=False, name="client")
    conn.start()
    return conn, reply.header("x-stream-protocol-version")


@dataclass
class CommandResult:
    stdout: bytes = b""
    stderr: bytes = b""
    error: bytes = b""  # raw error stream / channel
    protocol: str = ""

    @property
    def status(self) -> dict[str, object]:
        return json.loads(self.error) if self.error else {}

    @property
    def exit_code(self) -> int:
        """Exit code as client-go derives it from a v4 status (0 on success)."""
        status = self.status
        if not status or status.get("status") == "Success":
            return 0
        details = status.get("details")
        if isinstance(details, dict):
            for cause in details.get("causes", []):
                if cause.get("reason") == "ExitCode":
                    return int(cause["message"])
        raise AssertionError(f"not an exit status: {status}")


@dataclass
class SpdySession:
    """The streams of one remote command over SPDY, for tests that drive them by hand."""

    conn: SpdyConnection
    protocol: str
    error: SpdyStream
    stdin: SpdyStream | None = None
    stdout: SpdyStream | None = None
    stderr: SpdyStream | None = None
    resize: SpdyStream | None = None

    async def send_size(self, width: int, height: int) -> None:
        assert self.resize is not None
        await self.resize.write(json.dumps({"Width": width, "Height": height}).encode() + b"\n")

    async def collect(self) -> CommandResult:
        outputs = [self.stdout, self.stderr, self.error]

        async def read(stream: SpdyStream | None) -> bytes:
            return await stream.read_all(1 << 31) if stream is not None else b""

        stdout, stderr, error = await asyncio.gather(*(read(s) for s in outputs))
        return CommandResult(stdout, stderr, error, self.protocol)

    async def close(self) -> None:
        await self.conn.close()


async def open_spdy_command(
    url: str,
    *,
    protocols: list[str] | None = None,
    stdin: bool = False,
    stdout: bool = True,
    stderr: bool = True,
    tty: bool = False,
) -> SpdySession:
    conn, protocol = await spdy_connect(url, protocols or SPDY_REMOTECOMMAND)
    error = await conn.open_stream(make_headers(streamType="error"))
    session = SpdySession(conn, protocol, error)
    if stdin:
        session.stdin = await conn.open_stream(make_headers(streamType="stdin"))
    if stdout:
        session.stdout = await conn.open_stream(make_headers(streamType="stdout"))
    if stderr and not tty:
        session.stderr = await conn.open_stream(make_headers(streamType="stderr"))
    if tty and protocol not in ("channel.k8s.io", "v2.channel.k8s.io"):
        session.resize = await conn.open_stream(make_headers(streamType="resize"))
    return session


async def spdy_command(
    url: str,
    *,
    protocols: list[str] | None = None,
    stdin: bytes | None = None,
    stdout: bool = True,
    stderr: bool = True,
    tty: bool = False,
    sizes: Iterable[tuple[int, int]] = (),
    timeout: float = 120,
) -> CommandResult:
    """Run a remote command to the end: send stdin (then close it), collect everything."""
    session = await open_spdy_command(
        url, protocols=protocols, stdin=stdin is not None, stdout=stdout, stderr=stderr, tty=tty
    )

    async def run() -> CommandResult:
        for width, height in sizes:
            await session.send_size(width, height)
        if session.stdin is not None and stdin is not None:
            await session.stdin.write(stdin)
            await session.stdin.close()
        return await session.collect()

    try:
        # A hang is a failure, not a stuck test run.
        return await asyncio.wait_for(run(), timeout)
    finally:
        await session.close()


# WebSocket


@dataclass
class WsSession:
    """A remote command over a WebSocket channel protocol."""

    http: aiohttp.ClientSession
    ws: aiohttp.ClientWebSocketResponse
    protocol: str
    channels: dict[int, bytearray] = field(default_factory=dict)
    messages: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def base64(self) -> bool:
        return "base64" in self.protocol

    async def send(self, channel: int, data: bytes) -> None:
        if self.base64:
            await self.ws.send_str(chr(ord("0") + channel) + base64.b64encode(data).decode())
        else:
            await self.ws.send_bytes(bytes([channel]) + data)

    async def close_channel(self, channel: int) -> None:
        """v5's half-close of one of our channels (stdin)."""
        await self.ws.send_bytes(bytes([255, channel]))

    async def receive_all(self) -> CommandResult:
        async for message in self.ws:
            if message.type is aiohttp.WSMsgType.BINARY:
                raw: bytes = message.data
                channel, data = raw[0], raw[1:]
            elif message.type is aiohttp.WSMsgType.TEXT:
                channel, data = ord(message.data[0]) - ord("0"), base64.b64decode(message.data[1:])
            else:
                break
            self.messages.append((channel, data))
            self.channels.setdefault(channel, bytearray()).extend(data)
        get = self.channels.get
        return CommandResult(
            bytes(get(1, b"")), bytes(get(2, b"")), bytes(get(3, b"")), self.protocol
        )

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


async def open_ws(
    url: str, protocols: list[str]
) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    http = aiohttp.ClientSession()
    try:
        ws = await http.ws_connect(url, protocols=protocols, max_msg_size=0, autoping=True)
    except BaseException:
        await http.close()
        raise
    return http, ws


async def ws_command(
    url: str,
    *,
    protocol: str = "v5.channel.k8s.io",
    stdin: bytes | None = None,
    sizes: Iterable[tuple[int, int]] = (),
    timeout: float = 120,
) -> CommandResult:
    http, ws = await open_ws(url, [protocol] if protocol else [])
    session = WsSession(http, ws, ws.protocol or "")

    async def run() -> CommandResult:
        for width, height in sizes:
            await session.send(4, json.dumps({"Width": width, "Height": height}).encode())
        if stdin is not None:
            if stdin:
                await session.send(0, stdin)
            if session.protocol == "v5.channel.k8s.io":
                await session.close_channel(0)
        return await session.receive_all()

    try:
        return await asyncio.wait_for(run(), timeout)
    finally:
        await session.close()


# port-forward


class PortForwardClient:
    """Port-forward over SPDY (plain upgrade or tunnelled in a WebSocket)."""

    def __init__(self, conn: SpdyConnection, closer: AsyncIterator[None] | None = None) -> None:
        self.conn = conn
        self._next_request = 0
        self._closer = closer

    @classmethod
    async def connect(cls, url: str) -> PortForwardClient:
        conn, protocol = await spdy_connect(url, ["portforward.k8s.io"])
        assert protocol == "portforward.k8s.io"
        return cls(conn)

    @classmethod
    async def connect_tunnel(cls, url: str) -> PortForwardClient:
        http, ws = await open_ws(url, ["SPDY/3.1+portforward.k8s.io"])
        assert ws.protocol == "SPDY/3.1+portforward.k8s.io"
        conn = SpdyConnection(_ClientWsChannel(http, ws), server=False, name="tunnel-client")
        conn.start()
        return cls(conn)

    async def open(self, port: int) -> tuple[SpdyStream, SpdyStream]:
        """(data, error) streams of one forwarded connection, as client-go opens them."""
        request_id = str(self._next_request)
        self._next_request += 1
        error = await self.conn.open_stream(
            make_headers(streamType="error", port=str(port), requestID=request_id)
        )
        data = await self.conn.open_stream(
            make_headers(streamType="data", port=str(port), requestID=request_id)
        )
        return data, error

    async def close(self) -> None:
        await self.conn.close()


class _ClientWsChannel:
    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._http = http
        self._ws = ws
        self._lock = asyncio.Lock()

    async def read(self) -> bytes:
        while True:
            message = await self._ws.receive()
            if message.type is aiohttp.WSMsgType.BINARY:
                if message.data:
                    return bytes(message.data)
                continue
            return b""

    async def write(self, data: bytes) -> None:
        if self._ws.closed:
            raise ConnectionResetError("websocket closed")
        async with self._lock:
            await self._ws.send_bytes(data)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()
        await self._http.close()
