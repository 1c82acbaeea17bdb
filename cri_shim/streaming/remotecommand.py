"""Kubernetes' remote command protocol (exec and attach), independent of transport.

A client opens typed streams: `error` (where the server writes the outcome),
`stdin`, `stdout`, `stderr` and, with a TTY from v3 on, `resize` (a sequence of
`{"Width":w,"Height":h}` JSON objects). Versions differ in what they add:

- channel.k8s.io (v1): the server also half-closes stdin at once (kept for
  compatibility; the known bugs of v1 are the client's);
- v2.channel.k8s.io: fixes v1;
- v3.channel.k8s.io: terminal resize;
- v4.channel.k8s.io: the outcome is a Kubernetes Status as JSON, with the
  exit code as an `ExitCode` cause, instead of a bare error message;
- v5.channel.k8s.io (WebSocket only): the client may half-close a channel.

The session itself (run a process, or join a container's stdio) is given
`RemoteStreams` and returns a `StreamStatus`; this module turns that into what
the negotiated version writes on the error stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cri_shim.logs import log_event
from cri_shim.streaming.spdy import RstStatus, SpdyConnection, SpdyStream, StreamClosed

log = logging.getLogger(__name__)

PROTOCOL_V1 = "channel.k8s.io"
PROTOCOL_V2 = "v2.channel.k8s.io"
PROTOCOL_V3 = "v3.channel.k8s.io"
PROTOCOL_V4 = "v4.channel.k8s.io"
PROTOCOL_V5 = "v5.channel.k8s.io"
# Preferred first, as kubelet lists them.
SPDY_PROTOCOLS = (PROTOCOL_V4, PROTOCOL_V3, PROTOCOL_V2, PROTOCOL_V1)

STREAM_TYPE_HEADER = "streamtype"
STREAM_ERROR = "error"
STREAM_STDIN = "stdin"
STREAM_STDOUT = "stdout"
STREAM_STDERR = "stderr"
STREAM_RESIZE = "resize"

STREAM_CREATION_TIMEOUT = 30.0
# Seconds the outcome may take to reach a client before the connection is closed anyway.
FINISH_GRACE = 10.0
# Resize messages are tiny; anything bigger is not a terminal size.
MAX_RESIZE_MESSAGE = 4096


@dataclass(frozen=True)
class StreamOptions:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int


class InputSource(Protocol):
    async def read(self) -> bytes:
        """Next bytes from the client; b"" when it closed its side."""
        ...


class OutputSink(Protocol):
    async def write(self, data: bytes) -> None:
        """Raises ConnectionError once the client is gone."""
        ...

    async def close(self) -> None: ...


@dataclass
class RemoteStreams:
    stdin: InputSource | None
    stdout: OutputSink | None
    stderr: OutputSink | None
    tty: bool
    resize: AsyncIterator[TerminalSize] | None = None


# outcome


@dataclass(frozen=True)
class StreamStatus:
    """What ends up on the error stream: success, an exit code, or an internal error."""

    success: bool
    message: str = ""
    reason: str = ""
    exit_code: int | None = None
    code: int = 0

    @classmethod
    def ok(cls) -> StreamStatus:
        return cls(success=True)

    @classmethod
    def exited(cls, exit_code: int, cmd: list[str] | None = None) -> StreamStatus:
        if exit_code == 0:
            return cls.ok()
        detail = f"error executing command {_go_list(cmd or [])}, exit code {exit_code}"
        return cls(
            success=False,
            message=f"command terminated with non-zero exit code: {detail}",
            reason="NonZeroExitCode",
            exit_code=exit_code,
        )

    @classmethod
    def internal_error(cls, message: str) -> StreamStatus:
        return cls(
            success=False,
            message=f"Internal error occurred: {message}",
            reason="InternalError",
            code=500,
        )

    def to_json(self) -> bytes:
        """v4: a Kubernetes Status, with the same fields kubelet fills."""
        body: dict[str, Any] = {"status": "Success" if self.success else "Failure"}
        if self.message:
            body["message"] = self.message
        if self.reason:
            body["reason"] = self.reason
        if self.exit_code is not None:
            body["details"] = {"causes": [{"reason": "ExitCode", "message": str(self.exit_code)}]}
        if self.code:
            body["code"] = self.code
        return json.dumps(body, separators=(",", ":")).encode()

    def to_v1(self) -> bytes:
        """v1-v3: nothing on success, else the bare message."""
        return b"" if self.success else self.message.encode()


def _go_list(items: list[str]) -> str:
    """How Go prints a []string (the message kubelet builds names the command this way)."""
    return "[" + " ".join(items) + "]"


def encode_status(protocol: str, status: StreamStatus) -> bytes:
    if protocol in (PROTOCOL_V4, PROTOCOL_V5, "v4.base64.channel.k8s.io"):
        return status.to_json()
    return status.to_v1()


async def terminal_sizes(source: InputSource) -> AsyncIterator[TerminalSize]:
    """Decode the resize stream: JSON objects back to back, as Go's json.Encoder writes them."""
    decoder = json.JSONDecoder()
    buffer = ""
    pending = b""
    while True:
        chunk = await source.read()
        if not chunk:
            return
        pending += chunk
        try:
            buffer += pending.decode("utf-8")
            pending = b""
        except UnicodeDecodeError:
            if len(pending) > MAX_RESIZE_MESSAGE:
                return
            continue
        while True:
            text = buffer.lstrip()
            if not text:
                buffer = ""
                break
            try:
                value, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                if len(text) > MAX_RESIZE_MESSAGE:
                    return  # not JSON at all: stop listening to this stream
                buffer = text
                break
            buffer = text[end:]
            size = _terminal_size(value)
            if size is not None:
                yield size


def _terminal_size(value: Any) -> TerminalSize | None:
    if not isinstance(value, dict):
        return None
    width, height = value.get("Width", 0), value.get("Height", 0)
    if not isinstance(width, int) or not isinstance(height, int):
        return None
    if not (0 < width <= 0xFFFF and 0 < height <= 0xFFFF):
        return None
    return TerminalSize(width, height)


Session = Callable[[RemoteStreams], Awaitable[StreamStatus]]


async def run_session(
    session: Session,
    streams: RemoteStreams,
    closed: asyncio.Event,
    *,
    failure: str,
    **fields: Any,
) -> StreamStatus | None:
    """Run the session until it ends, or until the client is gone (`closed`).

    A failure inside the session becomes an InternalError status; None means
    the client went away and the session was cancelled (nothing to report).
    """
    task: asyncio.Task[StreamStatus] = asyncio.ensure_future(session(streams))
    gone = asyncio.create_task(closed.wait())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            log_event(log, "client went away; session cancelled", **fields)
    if task.cancelled():
        return None
    err = task.exception()
    if err is None:
        return task.result()
    log_event(log, failure, level=logging.WARNING, error=err, **fields)
    return StreamStatus.internal_error(f"{failure}: {err}")


# SPDY


class SpdySink:
    """An outgoing SPDY stream as an OutputSink."""

    def __init__(self, stream: SpdyStream) -> None:
        self.stream = stream

    async def write(self, data: bytes) -> None:
        if data:
            await self.stream.write(data)

    async def close(self) -> None:
        await self.stream.close()


@dataclass
class _SpdyStreams:
    error: SpdyStream | None = None
    stdin: SpdyStream | None = None
    stdout: SpdyStream | None = None
    stderr: SpdyStream | None = None
    resize: SpdyStream | None = None


async def _collect_streams(
    conn: SpdyConnection, expected: int, *, resize: bool, timeout: float
) -> _SpdyStreams:
    found = _SpdyStreams()
    received = 0

    async def collect() -> None:
        nonlocal received
        while received < expected:
            stream = await conn.accept()
            if stream is None:
                raise ConnectionError(conn.error or "connection closed")
            kind = stream.header(STREAM_TYPE_HEADER)
            if kind in (STREAM_ERROR, STREAM_STDIN, STREAM_STDOUT, STREAM_STDERR) or (
                kind == STREAM_RESIZE and resize
            ):
                # The error, stdout and stderr streams only carry our output.
                stream.discard_input = kind in (STREAM_ERROR, STREAM_STDOUT, STREAM_STDERR)
                setattr(found, kind, stream)
                received += 1
            else:
                log_event(log, "unexpected stream type", level=logging.WARNING, stream_type=kind)
                await stream.reset(RstStatus.REFUSED_STREAM)

    await asyncio.wait_for(collect(), timeout)
    # Every stream the session uses is here: any further one is refused, not queued.
    conn.refuse_new_streams()
    return found


async def serve_spdy(
    conn: SpdyConnection,
    protocol: str,
    options: StreamOptions,
    session: Session,
    *,
    failure: str,
    creation_timeout: float = STREAM_CREATION_TIMEOUT,
    **fields: Any,
) -> None:
    """Exec or attach over an upgraded SPDY connection, then close it."""
    resize = options.tty and protocol not in (PROTOCOL_V1, PROTOCOL_V2)
    expected = 1 + options.stdin + options.stdout + options.stderr + resize
    try:
        found = await _collect_streams(conn, expected, resize=resize, timeout=creation_timeout)
    except (TimeoutError, ConnectionError) as err:
        log_event(
            log,
            "client did not create its streams",
            level=logging.WARNING,
            protocol=protocol,
            error=err or "timed out",
            **fields,
        )
        await conn.close()
        return
    if protocol == PROTOCOL_V1 and found.stdin is not None:
        # What kubelet's v1 handler does; the client only reads the error stream after it.
        await found.stdin.close()
    streams = RemoteStreams(
        stdin=found.stdin,
        stdout=SpdySink(found.stdout) if found.stdout is not None else None,
        stderr=SpdySink(found.stderr) if found.stderr is not None else None,
        tty=options.tty,
        resize=terminal_sizes(found.resize) if found.resize is not None else None,
    )

    async def finish(status: StreamStatus | None) -> None:
        if status is not None and found.error is not None:
            payload = encode_status(protocol, status)
            with contextlib.suppress(StreamClosed):
                if payload:
                    await found.error.write(payload)
        for stream in (found.stdout, found.stderr, found.error):
            if stream is not None:
                await stream.close()

    try:
        status = await run_session(session, streams, conn.closed, failure=failure, **fields)
        # A client that stopped reading does not get to keep the connection open.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finish(status), FINISH_GRACE)
    finally:
        await conn.close()
