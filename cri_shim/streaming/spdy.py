"""SPDY/3.1, the framing kubelet and crictl use for exec, attach and port-forward.

Two layers. The codec turns bytes into frames and back: the eight control
frames and DATA, header blocks compressed with zlib over the SPDY/3
dictionary, one compression context per direction that lives as long as the
connection. `SpdyConnection` keeps the streams of one connection: it replies
to the peer's SYN_STREAMs, echoes its PINGs, delivers DATA to the stream it
belongs to and sends our frames one at a time, so the compression context
sees header blocks in wire order.

Flow control: the peers we serve (Go's moby/spdystream, inside kubelet and
client-go) never send WINDOW_UPDATE, so honouring the peer's window would
stall every stream after 64 KiB. We therefore send without regard to the
window, as spdystream does, but we do grant window for what we consume, so a
strict SPDY/3.1 peer keeps sending. Back-pressure comes from TCP: a stream
holding more than `STREAM_BUFFER` unread bytes, or a connection holding more
than `CONNECTION_BUFFER`, stops the connection's reader.

What one peer can make us hold is bounded: a DATA frame is delivered in
pieces of at most `DATA_PIECE` bytes as they arrive (never buffered whole),
a connection has at most `MAX_STREAMS` open streams and `MAX_PENDING_STREAMS`
not yet taken by its handler (more get RST_STREAM(REFUSED_STREAM), as do
streams after a handler's `refuse_new_streams()`), and unknown control frames
are capped at `MAX_UNKNOWN_CONTROL_PER_SECOND`; the reader yields to the event
loop every `YIELD_EVERY` frames so one flooding client cannot starve others.

Malformed input of any kind raises `ProtocolError` out of the decoder; the
connection answers with GOAWAY(PROTOCOL_ERROR) and closes, and nothing else
in the server is affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from cri_shim.concurrency import cancel_and_wait
from cri_shim.logs import log_event
from cri_shim.streaming.transport import ByteChannel, InboundBuffer, close_when_idle

log = logging.getLogger(__name__)

VERSION = 3
MAX_FRAME_LENGTH = 0xFFFFFF  # 24-bit length field
MAX_STREAM_ID = 0x7FFFFFFF
INITIAL_WINDOW = 64 * 1024
# Our own limits on what a peer may make us hold.
MAX_CONTROL_PAYLOAD = 1024 * 1024
MAX_HEADER_BLOCK = 256 * 1024
MAX_HEADER_PAIRS = 1024
# Payload of each DATA frame we send.
DATA_CHUNK = 32 * 1024
# Unread bytes one stream may hold before the connection's reader waits for it.
STREAM_BUFFER = 4 * 1024 * 1024
# Unread bytes all streams of one connection may hold together.
CONNECTION_BUFFER = 8 * 1024 * 1024
# A DATA frame larger than this is delivered in pieces as its bytes arrive.
DATA_PIECE = 64 * 1024
# Streams one connection may have open, and opened but not yet taken by its handler
# (port-forward opens two per forwarded TCP connection).
MAX_STREAMS = 1024
MAX_PENDING_STREAMS = 128
# Control frames of unknown type a peer may send per second before the connection ends.
MAX_UNKNOWN_CONTROL_PER_SECOND = 100
# Frames handled between two yields to the event loop.
YIELD_EVERY = 32
# Seconds a closing connection waits to send its GOAWAY to a peer that does not read.
CLOSE_GRACE = 2.0

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02


class FrameType(enum.IntEnum):
    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(enum.IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    FRAME_TOO_LARGE = 11


class GoAwayStatus(enum.IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class ProtocolError(Exception):
    """The peer sent something that is not SPDY/3.1; the connection must end."""


# The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00,
# section 2.6.10.1): length-prefixed words, then one run of literal text.
_DICTIONARY_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding "
    "accept-language accept-ranges age allow authorization cache-control connection "
    "content-base content-encoding content-language content-length content-location "
    "content-md5 content-range content-type date etag expect expires from host if-match "
    "if-modified-since if-none-match if-range if-unmodified-since last-modified location "
    "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after "
    "server te trailer transfer-encoding upgrade user-agent vary via warning "
    "www-authenticate method get status |200 OK| version HTTP/1.1 url public set-cookie "
    "keep-alive origin"
)
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
    "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
    "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
    "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct "
    "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
    "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,"
    "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)


def _build_dictionary() -> bytes:
    words: list[str] = []
    for part in _DICTIONARY_WORDS.split("|"):
        # Words are space separated, except the one that contains a space (`|200 OK|`).
        words += part.split() if not part.startswith("200") else [part]
    out = bytearray()
    for word in words:
        raw = word.encode("ascii")
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out) + _DICTIONARY_TAIL.encode("ascii")


DICTIONARY = _build_dictionary()

Headers = Mapping[str, tuple[str, ...]]


def make_headers(**values: str) -> dict[str, tuple[str, ...]]:
    """Headers from keyword arguments (`streamType="error"` -> `streamtype: error`)."""
    return {name.lower(): (value,) for name, value in values.items()}


def header(headers: Headers, name: str) -> str:
    """First value of a header, or "" (names are case-insensitive, stored lowercase)."""
    values = headers.get(name.lower())
    return values[0] if values else ""


# frames


@dataclass(frozen=True, slots=True)
class DataFrame:
    stream_id: int
    data: bytes = b""
    flags: int = 0


@dataclass(frozen=True, slots=True)
class SynStream:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    associated_id: int = 0
    priority: int = 0
    slot: int = 0
    flags: int = 0


@dataclass(frozen=True, slots=True)
class SynReply:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    flags: int = 0


@dataclass(frozen=True, slots=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class Settings:
    entries: tuple[tuple[int, int, int], ...] = ()  # (flags, id, value)
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Ping:
    ping_id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    last_good_stream_id: int
    status: int = GoAwayStatus.OK


@dataclass(frozen=True, slots=True)
class HeadersFrame:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    flags: int = 0


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    stream_id: int
    delta: int


@dataclass(frozen=True, slots=True)
class UnknownControl:
    """A control frame of a type SPDY/3.1 does not define (reported only on request)."""

    kind: int


Frame = (
    DataFrame
    | SynStream
    | SynReply
    | RstStream
    | Settings
    | Ping
    | GoAway
    | HeadersFrame
    | WindowUpdate
)


# header blocks


def encode_header_block(headers: Headers) -> bytes:
    """Uncompressed name/value block; several values of one name are NUL-joined."""
    out = bytearray(struct.pack(">I", len(headers)))
    for name, values in headers.items():
        raw_name = name.lower().encode("utf-8")
        raw_value = "\0".join(values).encode("utf-8")
        out += struct.pack(">I", len(raw_name)) + raw_name
        out += struct.pack(">I", len(raw_value)) + raw_value
    return bytes(out)


def decode_header_block(raw: bytes) -> dict[str, tuple[str, ...]]:
    """Parse an uncompressed block; names are lower-cased and repeated names merged."""
    view = memoryview(raw)
    if len(view) < 4:
        raise ProtocolError("header block too short")
    (count,) = struct.unpack_from(">I", view, 0)
    if count > MAX_HEADER_PAIRS:
        raise ProtocolError(f"header block has {count} pairs")
    offset = 4
    headers: dict[str, tuple[str, ...]] = {}

    def take() -> bytes:
        nonlocal offset
        if offset + 4 > len(view):
            raise ProtocolError("header block truncated")
        (length,) = struct.unpack_from(">I", view, offset)
        offset += 4
        if length > len(view) - offset:
            raise ProtocolError("header block truncated")
        value = bytes(view[offset : offset + length])
        offset += length
        return value

    for _ in range(count):
        name = take()
        value = take()
        if not name:
            raise ProtocolError("empty header name")
        try:
            text_name = name.decode("utf-8").lower()
            values = tuple(value.decode("utf-8").split("\0"))
        except UnicodeDecodeError as err:
            raise ProtocolError("header block is not UTF-8") from err
        headers[text_name] = headers.get(text_name, ()) + values
    if offset != len(view):
        raise ProtocolError("trailing bytes after header block")
    return headers


class HeaderCompressor:
    """One direction's zlib context: every block sync-flushed, the stream never ended."""

    def __init__(self) -> None:
        self._zlib = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, zdict=DICTIONARY
        )

    def compress(self, headers: Headers) -> bytes:
        block = encode_header_block(headers)
        return self._zlib.compress(block) + self._zlib.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(zdict=DICTIONARY)

    def decompress(self, data: bytes) -> dict[str, tuple[str, ...]]:
        try:
            raw = self._zlib.decompress(data, MAX_HEADER_BLOCK)
        except zlib.error as err:
            raise ProtocolError(f"bad compressed header block: {err}") from err
        if self._zlib.unconsumed_tail:
            raise ProtocolError("header block too large")
        if self._zlib.eof:
            raise ProtocolError("header compression stream ended")
        return decode_header_block(raw)


# encoder


def _control(frame_type: FrameType, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_LENGTH:
        raise ValueError("control frame payload too large")
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload)) + payload


def encode_data(stream_id: int, data: bytes, flags: int = 0) -> bytes:
    if not 0 < stream_id <= MAX_STREAM_ID or len(data) > MAX_FRAME_LENGTH:
        raise ValueError("bad DATA frame")
    return struct.pack(">II", stream_id, (flags << 24) | len(data)) + data


class FrameEncoder:
    """Frames to bytes, with this direction's header compression context."""

    def __init__(self) -> None:
        self._compressor = HeaderCompressor()

    def encode(self, frame: Frame) -> bytes:
        if isinstance(frame, DataFrame):
            return encode_data(frame.stream_id, frame.data, frame.flags)
        if isinstance(frame, SynStream):
            block = self._compressor.compress(frame.headers)
            fixed = struct.pack(
                ">IIBB",
                frame.stream_id & MAX_STREAM_ID,
                frame.associated_id & MAX_STREAM_ID,
                (frame.priority & 0x7) << 5,
                frame.slot & 0xFF,
            )
            return _control(FrameType.SYN_STREAM, frame.flags, fixed + block)
        if isinstance(frame, SynReply):
            block = self._compressor.compress(frame.headers)
            payload = struct.pack(">I", frame.stream_id & MAX_STREAM_ID) + block
            return _control(FrameType.SYN_REPLY, frame.flags, payload)
        if isinstance(frame, HeadersFrame):
            block = self._compressor.compress(frame.headers)
            payload = struct.pack(">I", frame.stream_id & MAX_STREAM_ID) + block
            return _control(FrameType.HEADERS, frame.flags, payload)
        if isinstance(frame, RstStream):
            payload = struct.pack(">II", frame.stream_id & MAX_STREAM_ID, frame.status)
            return _control(FrameType.RST_STREAM, 0, payload)
        if isinstance(frame, Settings):
            payload = struct.pack(">I", len(frame.entries)) + b"".join(
                struct.pack(">II", (flags << 24) | (ident & 0xFFFFFF), value)
                for flags, ident, value in frame.entries
            )
            return _control(FrameType.SETTINGS, frame.flags, payload)
        if isinstance(frame, Ping):
            return _control(FrameType.PING, 0, struct.pack(">I", frame.ping_id))
        if isinstance(frame, GoAway):
            payload = struct.pack(">II", frame.last_good_stream_id & MAX_STREAM_ID, frame.status)
            return _control(FrameType.GOAWAY, 0, payload)
        payload = struct.pack(">II", frame.stream_id & MAX_STREAM_ID, frame.delta & MAX_STREAM_ID)
        return _control(FrameType.WINDOW_UPDATE, 0, payload)


# decoder


class FrameDecoder:
    """Bytes to frames, incrementally: `feed()` what arrives, iterate complete frames.

    Anything malformed raises ProtocolError; after that the decoder (and its
    compression context) must not be used again. Control frames of unknown
    type are skipped, as SPDY/3 requires (or yielded as `UnknownControl` with
    `report_unknown`, so a connection can rate-limit them). A DATA frame of
    more than `data_piece` bytes comes out in pieces as its bytes arrive,
    FIN on the last, so a 16 MiB frame is never held whole.
    """

    def __init__(
        self,
        *,
        max_control_payload: int = MAX_CONTROL_PAYLOAD,
        data_piece: int = DATA_PIECE,
        report_unknown: bool = False,
    ) -> None:
        self._buffer = bytearray()
        self._decompressor = HeaderDecompressor()
        self._max_control = max_control_payload
        self._data_piece = data_piece
        self._report_unknown = report_unknown
        # A large DATA frame being delivered in pieces: its stream, flags, bytes still to come.
        self._data_stream = 0
        self._data_flags = 0
        self._data_left = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self._next()
            if frame is None:
                return
            if frame is not _SKIPPED:
                yield frame  # type: ignore[misc]

    def _piece(self) -> DataFrame | None:
        """The next piece of a DATA frame being delivered in pieces, once some bytes are here."""
        buffer = self._buffer
        if not buffer:
            return None
        take = min(len(buffer), self._data_left, self._data_piece)
        payload = bytes(buffer[:take])
        del buffer[:take]
        self._data_left -= take
        last = self._data_left == 0
        return DataFrame(self._data_stream, payload, self._data_flags if last else 0)

    def _next(self) -> Frame | object | None:
        if self._data_left:
            return self._piece()
        buffer = self._buffer
        if len(buffer) < 8:
            return None
        first, second = struct.unpack_from(">II", buffer, 0)
        flags = second >> 24
        length = second & 0xFFFFFF
        control = bool(first & 0x80000000)
        if control and length > self._max_control:
            raise ProtocolError(f"control frame of {length} bytes")
        if not control and length > self._data_piece:
            stream_id = first & MAX_STREAM_ID
            if stream_id == 0:
                raise ProtocolError("DATA frame for stream 0")
            del buffer[:8]
            self._data_stream, self._data_flags, self._data_left = stream_id, flags, length
            return self._piece() or _SKIPPED
        if len(buffer) < 8 + length:
            return None
        payload = bytes(buffer[8 : 8 + length])
        del buffer[: 8 + length]
        if not control:
            stream_id = first & MAX_STREAM_ID
            if stream_id == 0:
                raise ProtocolError("DATA frame for stream 0")
            return DataFrame(stream_id, payload, flags)
        version = (first >> 16) & 0x7FFF
        if version != VERSION:
            raise ProtocolError(f"unsupported SPDY version {version}")
        return self._control_frame(first & 0xFFFF, flags, payload)

    def _stream_id(self, payload: bytes, minimum: int) -> int:
        if len(payload) < minimum:
            raise ProtocolError("control frame too short")
        stream_id: int = struct.unpack_from(">I", payload, 0)[0] & MAX_STREAM_ID
        if stream_id == 0:
            raise ProtocolError("stream id 0")
        return stream_id

    def _control_frame(self, kind: int, flags: int, payload: bytes) -> Frame | object:
        if kind == FrameType.SYN_STREAM:
            stream_id = self._stream_id(payload, 10)
            associated, priority, slot = struct.unpack_from(">IBB", payload, 4)
            headers = self._decompressor.decompress(payload[10:])
            return SynStream(
                stream_id, headers, associated & MAX_STREAM_ID, priority >> 5, slot, flags
            )
        if kind == FrameType.SYN_REPLY:
            stream_id = self._stream_id(payload, 4)
            return SynReply(stream_id, self._decompressor.decompress(payload[4:]), flags)
        if kind == FrameType.HEADERS:
            stream_id = self._stream_id(payload, 4)
            return HeadersFrame(stream_id, self._decompressor.decompress(payload[4:]), flags)
        if kind == FrameType.RST_STREAM:
            if len(payload) != 8:
                raise ProtocolError("RST_STREAM must be 8 bytes")
            stream_id = self._stream_id(payload, 8)
            status = struct.unpack_from(">I", payload, 4)[0]
            if status == 0:
                raise ProtocolError("RST_STREAM with status 0")
            return RstStream(stream_id, status)
        if kind == FrameType.SETTINGS:
            if len(payload) < 4:
                raise ProtocolError("SETTINGS too short")
            (count,) = struct.unpack_from(">I", payload, 0)
            if len(payload) != 4 + 8 * count:
                raise ProtocolError("SETTINGS length does not match its entries")
            entries = []
            for index in range(count):
                word, value = struct.unpack_from(">II", payload, 4 + 8 * index)
                entries.append((word >> 24, word & 0xFFFFFF, value))
            return Settings(tuple(entries), flags)
        if kind == FrameType.PING:
            if len(payload) != 4:
                raise ProtocolError("PING must be 4 bytes")
            return Ping(struct.unpack_from(">I", payload, 0)[0])
        if kind == FrameType.GOAWAY:
            if len(payload) != 8:
                raise ProtocolError("GOAWAY must be 8 bytes")
            last, status = struct.unpack_from(">II", payload, 0)
            return GoAway(last & MAX_STREAM_ID, status)
        if kind == FrameType.WINDOW_UPDATE:
            if len(payload) != 8:
                raise ProtocolError("WINDOW_UPDATE must be 8 bytes")
            stream_id, delta = struct.unpack_from(">II", payload, 0)
            return WindowUpdate(stream_id & MAX_STREAM_ID, delta & MAX_STREAM_ID)
        return UnknownControl(kind) if self._report_unknown else _SKIPPED


_SKIPPED = object()


# connection and streams


class StreamClosed(ConnectionError):
    """Write on a stream we already finished, or that was reset, or whose connection ended."""


class SpdyStream:
    """One stream: read what the peer sends until its FIN, write until ours."""

    def __init__(self, conn: SpdyConnection, stream_id: int, headers: Headers) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self.inbound = InboundBuffer(STREAM_BUFFER)
        self.remote_closed = False  # FIN or RST from the peer, or connection gone
        self.local_closed = False  # FIN or RST sent by us
        self.was_reset = False
        # Set by handlers for streams they only write to: what the peer sends is dropped.
        self.discard_input = False
        self._unacked = 0  # bytes consumed since we last granted window
        self.replied: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def header(self, name: str) -> str:
        return header(self.headers, name)

    # peer -> us

    def _deliver(self, data: bytes) -> None:
        if not self.remote_closed and not self.discard_input and data:
            self.inbound.put(data)
            self.conn._buffered += len(data)

    def _finish_remote(self) -> None:
        self.remote_closed = True
        self.inbound.end()

    def _reset(self, *, discard: bool = True) -> None:
        self.was_reset = True
        self.local_closed = True
        if discard:
            # Nobody will read it: dropped, so it cannot pin the connection's budget.
            self.conn._consumed(self.inbound.discard())
        self._finish_remote()
        if not self.replied.done():
            self.replied.set_exception(StreamClosed(f"stream {self.id} was reset"))

    async def read(self) -> bytes:
        """Next data from the peer; b"" after its FIN, a reset or the connection's end."""
        data = await self.inbound.get()
        if not data:
            return b""
        self.conn._consumed(len(data))
        self._unacked += len(data)
        if self._unacked >= INITIAL_WINDOW // 2 and not self.remote_closed:
            grant, self._unacked = self._unacked, 0
            await self.conn._send_quietly(WindowUpdate(self.id, grant))
        return data

    async def read_all(self, limit: int = 16 * 1024 * 1024) -> bytes:
        out = bytearray()
        while chunk := await self.read():
            out += chunk
            if len(out) > limit:
                raise ProtocolError(f"stream {self.id} sent more than {limit} bytes")
        return bytes(out)

    # us -> peer

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), DATA_CHUNK):
            if self.local_closed:
                raise StreamClosed(f"stream {self.id} is closed")
            await self.conn._send(DataFrame(self.id, bytes(view[start : start + DATA_CHUNK])))

    async def close(self) -> None:
        """Half-close: tell the peer we send nothing more (an empty DATA frame with FIN)."""
        if self.local_closed:
            return
        self.local_closed = True
        await self.conn._send_quietly(DataFrame(self.id, b"", FLAG_FIN))
        self.conn._maybe_forget(self)

    async def reset(self, status: int = RstStatus.CANCEL) -> None:
        if self.was_reset:
            return
        send = not (self.local_closed and self.remote_closed)
        self._reset()
        if send:
            await self.conn._send_quietly(RstStream(self.id, status))
        self.conn._forget(self)


# A stream the connection should accept: returns why not, or None to accept.
StreamFilter = Callable[[Headers], str | None]


class SpdyConnection:
    """The streams of one SPDY connection, either end.

    The server side (`server=True`) accepts the peer's streams through
    `accept()` (replying to each at once, as kubelet does, unless `filter`
    rejects it); the client side opens streams with `open_stream()`.
    """

    def __init__(
        self,
        channel: ByteChannel,
        *,
        server: bool,
        filter: StreamFilter | None = None,
        idle_timeout: float | None = None,
        name: str = "",
    ) -> None:
        self._channel = channel
        self.server = server
        self._filter = filter
        self.idle_timeout = idle_timeout
        self.name = name
        self._encoder = FrameEncoder()
        self._decoder = FrameDecoder(report_unknown=True)
        self._streams: dict[int, SpdyStream] = {}
        self._incoming: asyncio.Queue[SpdyStream | None] = asyncio.Queue()
        self._next_stream_id = 2 if server else 1
        self._next_ping_id = 2 if server else 1
        self._last_peer_stream = 0
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._send_lock = asyncio.Lock()
        self._goaway_sent = False
        self.goaway_received = False
        self.closed = asyncio.Event()
        self.error: str = ""
        self._last_activity = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        # Unread bytes of all streams, and an event set whenever some were taken.
        self._buffered = 0
        self._room = asyncio.Event()
        self._refusing = False
        self._unknown_window = 0.0
        self._unknown_count = 0

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._read_loop(), name=f"spdy-read {self.name}"))
        if self.idle_timeout:
            watch = asyncio.create_task(self._idle_watch(), name=f"spdy-idle {self.name}")
            self._tasks.append(watch)

    @property
    def streams(self) -> dict[int, SpdyStream]:
        return self._streams

    # sending

    async def _send(self, frame: Frame) -> None:
        async with self._send_lock:
            if self.closed.is_set():
                raise StreamClosed("connection closed")
            data = self._encoder.encode(frame)
            try:
                await self._channel.write(data)
            except (ConnectionError, OSError) as err:
                self._lost(f"write failed: {err}")
                raise StreamClosed("connection closed") from err
        self._last_activity = time.monotonic()

    async def _send_quietly(self, frame: Frame) -> None:
        """Best effort: control frames about a connection that may already be gone."""
        with contextlib.suppress(StreamClosed):
            await self._send(frame)

    def _forget(self, stream: SpdyStream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]

    def _consumed(self, size: int) -> None:
        if size:
            self._buffered -= size
            self._room.set()

    def refuse_new_streams(self) -> None:
        """The handler has every stream it needs: later SYN_STREAMs get RST_STREAM."""
        self._refusing = True

    def _maybe_forget(self, stream: SpdyStream) -> None:
        if stream.local_closed and stream.remote_closed:
            self._forget(stream)

    # streams

    async def accept(self) -> SpdyStream | None:
        """The next stream the peer opened; None once the connection ended."""
        if self.closed.is_set() and self._incoming.empty():
            return None
        return await self._incoming.get()

    async def open_stream(self, headers: Headers, timeout: float = 30.0) -> SpdyStream:
        """Client side: SYN_STREAM, then wait for the peer's SYN_REPLY."""
        async with self._send_lock:
            if self.closed.is_set() or self.goaway_received:
                raise StreamClosed("connection closed")
            stream_id = self._next_stream_id
            self._next_stream_id += 2
            stream = SpdyStream(self, stream_id, headers)
            self._streams[stream_id] = stream
            try:
                await self._channel.write(self._encoder.encode(SynStream(stream_id, headers)))
            except (ConnectionError, OSError) as err:
                self._lost(f"write failed: {err}")
                raise StreamClosed("connection closed") from err
        await asyncio.wait_for(asyncio.shield(stream.replied), timeout)
        return stream

    async def ping(self, timeout: float = 10.0) -> float:
        """Round-trip time of one PING."""
        ping_id = self._next_ping_id
        self._next_ping_id += 2
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = waiter
        started = time.monotonic()
        try:
            await self._send(Ping(ping_id))
            await asyncio.wait_for(waiter, timeout)
        finally:
            self._pings.pop(ping_id, None)
        return time.monotonic() - started

    # receiving

    async def _read_loop(self) -> None:
        reason = "peer closed the connection"
        try:
            while True:
                data = await self._channel.read()
                if not data:
                    break
                self._last_activity = time.monotonic()
                self._decoder.feed(data)
                for handled, frame in enumerate(self._decoder, 1):
                    if isinstance(frame, UnknownControl):
                        self._count_unknown()
                    else:
                        await self._dispatch(frame)
                    if handled % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # let other connections and the CRI calls run
        except ProtocolError as err:
            reason = f"protocol error: {err}"
            log_event(log, "spdy protocol error", level=logging.WARNING, conn=self.name, error=err)
            await self._send_goaway(GoAwayStatus.PROTOCOL_ERROR)
        except (ConnectionError, OSError) as err:
            reason = f"connection error: {err}"
        except asyncio.CancelledError:
            reason = "closed"
            raise
        finally:
            self._lost(reason)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._channel.close())

    def _count_unknown(self) -> None:
        now = time.monotonic()
        if now - self._unknown_window >= 1.0:
            self._unknown_window, self._unknown_count = now, 0
        self._unknown_count += 1
        if self._unknown_count > MAX_UNKNOWN_CONTROL_PER_SECOND:
            raise ProtocolError(
                f"more than {MAX_UNKNOWN_CONTROL_PER_SECOND} unknown control frames in a second"
            )

    async def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, DataFrame):
            stream = self._streams.get(frame.stream_id)
            if stream is None or stream.remote_closed:
                return  # gone already (reset, or never existed): dropped, as spdystream does
            # The consumer is behind: stop reading the socket until it catches up.
            while (
                not stream.discard_input
                and not stream.remote_closed
                and (stream.inbound.full or self._buffered > CONNECTION_BUFFER)
            ):
                self._room.clear()
                await self._room.wait()
            stream._deliver(frame.data)
            if frame.flags & FLAG_FIN:
                stream._finish_remote()
                self._maybe_forget(stream)
        elif isinstance(frame, SynStream):
            await self._on_syn_stream(frame)
        elif isinstance(frame, SynReply):
            stream = self._streams.get(frame.stream_id)
            if stream is not None and not stream.replied.done():
                stream.replied.set_result(None)
                if frame.flags & FLAG_FIN:
                    stream._finish_remote()
                    self._maybe_forget(stream)
        elif isinstance(frame, RstStream):
            stream = self._streams.pop(frame.stream_id, None)
            if stream is not None:
                stream._reset(discard=False)  # what arrived before the RST can still be read
        elif isinstance(frame, HeadersFrame):
            stream = self._streams.get(frame.stream_id)
            if stream is not None and frame.flags & FLAG_FIN:
                stream._finish_remote()
                self._maybe_forget(stream)
        elif isinstance(frame, Ping):
            if frame.ping_id % 2 != self._next_ping_id % 2:
                await self._send_quietly(frame)  # the peer's ping: echo it
            else:
                waiter = self._pings.get(frame.ping_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        elif isinstance(frame, GoAway):
            self.goaway_received = True
            self._incoming.put_nowait(None)
        # SETTINGS and WINDOW_UPDATE: nothing to do (see the module docstring).

    async def _on_syn_stream(self, frame: SynStream) -> None:
        stream_id = frame.stream_id
        peer_parity = 1 if self.server else 0
        if stream_id % 2 != peer_parity or stream_id <= self._last_peer_stream:
            await self._send_quietly(RstStream(stream_id, RstStatus.PROTOCOL_ERROR))
            return
        self._last_peer_stream = stream_id
        if (
            self.goaway_received
            or self._goaway_sent
            or self._refusing
            or len(self._streams) >= MAX_STREAMS
            or self._incoming.qsize() >= MAX_PENDING_STREAMS
        ):
            log_event(
                log,
                "spdy stream refused",
                level=logging.DEBUG,
                conn=self.name,
                stream=stream_id,
                open_streams=len(self._streams),
            )
            await self._send_quietly(RstStream(stream_id, RstStatus.REFUSED_STREAM))
            return
        rejection = self._filter(frame.headers) if self._filter is not None else None
        if rejection is not None:
            log_event(
                log, "spdy stream rejected", level=logging.DEBUG, conn=self.name, reason=rejection
            )
            await self._send_quietly(RstStream(stream_id, RstStatus.CANCEL))
            return
        stream = SpdyStream(self, stream_id, frame.headers)
        stream.replied.set_result(None)
        self._streams[stream_id] = stream
        if frame.flags & FLAG_FIN:
            stream._finish_remote()
        if frame.flags & FLAG_UNIDIRECTIONAL:
            stream.local_closed = True
        await self._send_quietly(SynReply(stream_id, {}))
        self._incoming.put_nowait(stream)

    async def _idle_watch(self) -> None:
        assert self.idle_timeout is not None
        await close_when_idle(
            self.name,
            "spdy connection",
            self.idle_timeout,
            self.closed,
            lambda: self._last_activity,
            self.close,
        )

    # ending

    def _lost(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.error = reason
        self.closed.set()
        for stream in list(self._streams.values()):
            stream._reset(discard=False)  # handlers may still read what arrived
        self._streams.clear()
        self._room.set()
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_exception(StreamClosed("connection closed"))
        self._incoming.put_nowait(None)

    async def _send_goaway(self, status: int) -> None:
        if self._goaway_sent or self.closed.is_set():
            return
        self._goaway_sent = True
        await self._send_quietly(GoAway(self._last_peer_stream, status))

    async def close(self, status: int = GoAwayStatus.OK) -> None:
        """GOAWAY, then close the channel; every stream ends and every task stops.

        A peer that stopped reading cannot hold this up: the GOAWAY gets
        `CLOSE_GRACE` seconds to go out, then the channel is closed anyway.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._send_goaway(status), CLOSE_GRACE)
        self._lost("closed")
        await self._channel.close()
        await cancel_and_wait(self._tasks)

    async def wait_closed(self) -> None:
        await self.closed.wait()
