"""Port forwarding (portforward.k8s.io): client connections to ports inside a pod.

Over SPDY each forwarded connection is a pair of client-opened streams, `data`
and `error`, carrying the same `port` and `requestID` headers (older clients
send no requestID; the pair is then found from the stream ids, as kubelet
does). When both are there the server connects to localhost:port inside the
pod's network namespace and relays bytes both ways. A connection that cannot
be made is reported as text on the error stream. Over WebSocket (v4 channels)
the ports come from the PortForward request and each has a data and an error
channel, each opened with the port as two little-endian bytes.

Closing: when the pod closes its side the client gets FIN on both streams;
when the client half-closes, the pod's socket is shut down for writing and
whatever the pod still sends is relayed until it closes, or until it has
said nothing for `HALF_CLOSE_IDLE` seconds. A reset stream or a dropped
connection ends the relay at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cri_shim.concurrency import cancel_and_wait
from cri_shim.logs import log_event
from cri_shim.network.netns import open_connection_in_netns
from cri_shim.store.sandboxes import SandboxState, SandboxStore
from cri_shim.streaming.remotecommand import InputSource, OutputSink
from cri_shim.streaming.spdy import Headers, SpdyConnection, SpdyStream, header

log = logging.getLogger(__name__)

PROTOCOL_V1 = "portforward.k8s.io"
SPDY_PROTOCOLS = (PROTOCOL_V1,)
PORT_HEADER = "port"
REQUEST_ID_HEADER = "requestid"
STREAM_TYPE_HEADER = "streamtype"
STREAM_DATA = "data"
STREAM_ERROR = "error"

STREAM_CREATION_TIMEOUT = 30.0
HALF_CLOSE_IDLE = 10.0
READ_CHUNK = 64 * 1024
CONNECT_TIMEOUT = 10.0

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connector = Callable[[int], Awaitable[Connection]]


class PortForwardError(Exception):
    """The pod's port cannot be reached; the text goes to the client's error stream."""


def parse_port(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise ValueError(f"unable to parse {text!r} as a port") from None
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"port {text!r} must be between 1 and 65535")
    return port


def stream_filter(headers: Headers) -> str | None:
    """Which streams a port-forward connection accepts (kubelet's checks)."""
    text = header(headers, PORT_HEADER)
    if not text:
        return f"{PORT_HEADER!r} header is required"
    try:
        parse_port(text)
    except ValueError as err:
        return str(err)
    kind = header(headers, STREAM_TYPE_HEADER)
    if kind not in (STREAM_DATA, STREAM_ERROR):
        return f"invalid stream type {kind!r}"
    return None


class PodConnector:
    """Connects to localhost:port as the pod sees it (its network namespace)."""

    def __init__(self, sandboxes: SandboxStore) -> None:
        self.sandboxes = sandboxes

    def for_pod(self, sandbox_id: str) -> Connector:
        async def connect(port: int) -> Connection:
            sandbox = self.sandboxes.by_id.find(sandbox_id)
            if sandbox is None:
                raise PortForwardError(f"pod sandbox {sandbox_id} not found")
            if sandbox.state is not SandboxState.READY:
                raise PortForwardError(f"pod sandbox {sandbox.id} is not ready")
            netns = "" if sandbox.host_network else sandbox.netns_path
            failures = []
            # localhost as kubelet means it: IPv4 first, then IPv6.
            for family, address in (("IPv4", "127.0.0.1"), ("IPv6", "::1")):
                try:
                    return await _connect(netns, address, port)
                except (OSError, TimeoutError) as err:
                    failures.append(f"{family}: {_describe(err)}")
            where = f"the network namespace of pod sandbox {sandbox.id}" if netns else "the host"
            raise PortForwardError(
                f"failed to connect to localhost:{port} inside {where}: {', '.join(failures)}"
            )

        return connect


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno:
        return os.strerror(err.errno).lower()
    return str(err) or type(err).__name__


async def _connect(netns: str, address: str, port: int) -> Connection:
    if netns:
        return await open_connection_in_netns(netns, address, port, timeout=CONNECT_TIMEOUT)
    return await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT)


class DataEnd:
    """One end of a forwarded connection's data, seen from the relay."""

    def __init__(self, source: InputSource, sink: OutputSink, aborted: Callable[[], bool]) -> None:
        self.source = source
        self.sink = sink
        self.aborted = aborted


async def relay(end: DataEnd, conn: Connection, **fields: Any) -> None:
    """Bytes both ways between the client's data stream and the pod's socket."""
    reader, writer = conn
    last_from_pod = time.monotonic()
    client_done = asyncio.Event()

    async def to_pod() -> None:
        try:
            while chunk := await end.source.read():
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            client_done.set()
        if not end.aborted() and writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()  # the client's half-close, passed on

    async def to_client() -> None:
        nonlocal last_from_pod
        try:
            while chunk := await reader.read(READ_CHUNK):
                last_from_pod = time.monotonic()
                await end.sink.write(chunk)
        except (ConnectionError, OSError):
            return
        with contextlib.suppress(ConnectionError):
            await end.sink.close()

    async def linger(task: asyncio.Task[None]) -> None:
        """After the client's half-close the pod gets HALF_CLOSE_IDLE seconds per reply chunk."""
        await client_done.wait()
        while not task.done():
            idle = time.monotonic() - last_from_pod
            if idle >= HALF_CLOSE_IDLE:
                task.cancel()
                return
            await asyncio.wait({task}, timeout=HALF_CLOSE_IDLE - idle)

    inbound = asyncio.create_task(to_pod())
    outbound = asyncio.create_task(to_client())
    watchdog = asyncio.create_task(linger(outbound))
    try:
        await asyncio.wait({outbound}, return_when=asyncio.ALL_COMPLETED)
        if not end.aborted():
            # The pod is done: let the client finish its side (it closes promptly).
            await asyncio.wait({inbound}, timeout=1.0)
    finally:
        await cancel_and_wait([inbound, outbound, watchdog])
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        log_event(log, "port-forward connection closed", level=logging.DEBUG, **fields)


# SPDY


class _StreamSink:
    def __init__(self, stream: SpdyStream) -> None:
        self.stream = stream

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    async def close(self) -> None:
        await self.stream.close()


@dataclass
class _Pair:
    request_id: str
    data: SpdyStream | None = None
    error: SpdyStream | None = None
    complete: asyncio.Event = field(default_factory=asyncio.Event)


def _request_id(stream: SpdyStream) -> str:
    request_id = stream.header(REQUEST_ID_HEADER)
    if request_id:
        return request_id
    # Clients before requestID: the error stream is opened first, data two ids later.
    offset = 2 if stream.header(STREAM_TYPE_HEADER) == STREAM_DATA else 0
    return str(stream.id - offset)


async def serve_spdy(
    conn: SpdyConnection,
    connect: Connector,
    *,
    creation_timeout: float = STREAM_CREATION_TIMEOUT,
    **fields: Any,
) -> None:
    """Accept stream pairs until the connection ends; every relay ends with it."""
    pairs: dict[str, _Pair] = {}
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def expire(pair: _Pair) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pair.complete.wait(), creation_timeout)
        if not pair.complete.is_set():
            message = f"timed out waiting for the streams of request {pair.request_id}"
            log_event(log, "port-forward stream pair incomplete", level=logging.WARNING, **fields)
            for stream in (pair.error, pair.data):
                if stream is not None:
                    with contextlib.suppress(ConnectionError):
                        if stream is pair.error:
                            await stream.write(message.encode())
                    await stream.reset()
        pairs.pop(pair.request_id, None)

    try:
        while (stream := await conn.accept()) is not None:
            request_id = _request_id(stream)
            pair = pairs.get(request_id)
            if pair is None:
                pair = pairs[request_id] = _Pair(request_id)
                spawn(expire(pair))
            kind = stream.header(STREAM_TYPE_HEADER)
            if getattr(pair, kind) is not None:
                message = (
                    f"error processing stream for request {request_id}: "
                    f"{kind} stream already assigned"
                )
                log_event(log, "port-forward duplicate stream", level=logging.WARNING, **fields)
                if pair.error is not None:
                    with contextlib.suppress(ConnectionError):
                        await pair.error.write(message.encode())
                await stream.reset()
                continue
            # The error stream only carries our messages; what the peer sends on it is dropped.
            stream.discard_input = kind == STREAM_ERROR
            setattr(pair, kind, stream)
            if pair.data is not None and pair.error is not None:
                pair.complete.set()
                spawn(_forward(pair.data, pair.error, connect, request_id=request_id, **fields))
    finally:
        await cancel_and_wait(tasks)
        await conn.close()


async def _forward(data: SpdyStream, error: SpdyStream, connect: Connector, **fields: Any) -> None:
    port = parse_port(data.header(PORT_HEADER))
    try:
        conn = await connect(port)
    except PortForwardError as err:
        log_event(log, "port-forward failed", level=logging.INFO, port=port, error=err, **fields)
        with contextlib.suppress(ConnectionError):
            await error.write(f"error forwarding port {port} to pod: {err}".encode())
        await error.close()
        await data.reset()
        return
    try:
        await relay(
            DataEnd(data, _StreamSink(data), lambda: data.was_reset), conn, port=port, **fields
        )
    finally:
        if data.was_reset:
            await error.reset()
        else:
            await data.close()
            await error.close()
