"""SPDY/3.1 codec and connection: exact bytes, round trips, hostile input."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cri_shim.streaming import spdy
from cri_shim.streaming.spdy import (
    DataFrame,
    FrameDecoder,
    FrameEncoder,
    GoAway,
    HeadersFrame,
    Ping,
    ProtocolError,
    RstStream,
    Settings,
    SpdyConnection,
    StreamClosed,
    SynReply,
    SynStream,
    WindowUpdate,
    make_headers,
)
from cri_shim.streaming.transport import StreamChannel

from .conftest import wait_for

# sha256 of the 1423-byte dictionary printed in the SPDY/3 draft (section 2.6.10.1)
DICTIONARY_SHA256 = "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"


def test_dictionary_is_the_spdy3_one() -> None:
    assert len(spdy.DICTIONARY) == 1423
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")
    assert hashlib.sha256(spdy.DICTIONARY).hexdigest() == DICTIONARY_SHA256


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (Ping(1), "80030006 00000004 00000001"),
        (GoAway(5, 0), "80030007 00000008 00000005 00000000"),
        (RstStream(3, spdy.RstStatus.CANCEL), "80030003 00000008 00000003 00000005"),
        (WindowUpdate(1, 65536), "80030009 00000008 00000001 00010000"),
        (DataFrame(1, b"hi", spdy.FLAG_FIN), "00000001 01000002 6869"),
        (Settings(((0, 7, 65536),)), "80030004 0000000c 00000001 00000007 00010000"),
    ],
)
def test_frames_have_the_exact_wire_format(frame: spdy.Frame, wire: str) -> None:
    raw = bytes.fromhex(wire.replace(" ", ""))
    assert FrameEncoder().encode(frame) == raw
    decoder = FrameDecoder()
    decoder.feed(raw)
    assert list(decoder) == [frame]


def test_header_blocks_use_one_zlib_context_per_direction() -> None:
    headers = make_headers(streamType="error")
    block = spdy.encode_header_block(headers)
    assert block == b"\0\0\0\x01" + b"\0\0\0\x0astreamtype" + b"\0\0\0\x05error"
    encoder = FrameEncoder()
    first = encoder.encode(SynStream(1, headers))
    second = encoder.encode(SynStream(3, headers))
    # An independent zlib reader with the dictionary sees the plain blocks...
    reader = zlib.decompressobj(zdict=spdy.DICTIONARY)
    assert reader.decompress(first[18:]) == block
    assert reader.decompress(second[18:]) == block
    # ... and the second block is shorter: it refers back to the first.
    assert len(second) < len(first)
    fixed = struct.unpack(">IIBB", first[8:18])
    assert fixed == (1, 0, 0, 0)


def test_several_values_and_case() -> None:
    raw = spdy.encode_header_block({"a": ("1", "2")})
    assert raw.endswith(b"1\x002")
    decoded = spdy.decode_header_block(
        b"\0\0\0\x02" + b"\0\0\0\x01A\0\0\0\x01x" + b"\0\0\0\x01a\0\0\0\x01y"
    )
    assert decoded == {"a": ("x", "y")}


def test_unknown_control_frames_are_skipped() -> None:
    decoder = FrameDecoder()
    decoder.feed(bytes.fromhex("8003000a 00000003 010203") + FrameEncoder().encode(Ping(7)))
    assert list(decoder) == [Ping(7)]


@pytest.mark.parametrize(
    "wire",
    [
        "80020006 00000004 00000001",  # SPDY/2
        "80030006 00000005 0000000100",  # PING of 5 bytes
        "80030003 00000008 00000001 00000000",  # RST_STREAM status 0
        "80030007 00000004 00000001",  # short GOAWAY
        "00000000 00000001 00",  # DATA on stream 0
        "80030001 0000000a 00000001 00000000 0000",  # SYN_STREAM without a header block
        "80030002 00000008 00000001 deadbeef",  # SYN_REPLY with garbage for zlib
        "80030004 00000004 00000009",  # SETTINGS claiming 9 entries
        "80030001 7fffffff",  # a control frame larger than we accept
    ],
)
def test_malformed_frames_are_protocol_errors(wire: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(bytes.fromhex(wire.replace(" ", "")) + b"\0" * 16)
    with pytest.raises(ProtocolError):
        list(decoder)


# property tests

names = st.from_regex(r"[a-z0-9][a-z0-9-]{0,15}", fullmatch=True)
values = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=30)
headers = st.dictionaries(names, st.lists(values, min_size=1, max_size=3).map(tuple), max_size=6)
stream_ids = st.integers(1, spdy.MAX_STREAM_ID)
frames = st.one_of(
    st.builds(DataFrame, stream_ids, st.binary(max_size=3000), st.sampled_from([0, 1])),
    st.builds(
        SynStream,
        stream_ids,
        headers,
        st.integers(0, spdy.MAX_STREAM_ID),
        st.integers(0, 7),
        st.integers(0, 255),
        st.sampled_from([0, 1, 2, 3]),
    ),
    st.builds(SynReply, stream_ids, headers, st.sampled_from([0, 1])),
    st.builds(RstStream, stream_ids, st.integers(1, 11)),
    st.builds(
        Settings,
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 0xFFFFFF), st.integers(0, 2**32 - 1)),
            max_size=4,
        ).map(tuple),
    ),
    st.builds(Ping, st.integers(1, 2**32 - 1)),
    st.builds(GoAway, st.integers(0, spdy.MAX_STREAM_ID), st.integers(0, 2)),
    st.builds(HeadersFrame, stream_ids, headers, st.sampled_from([0, 1])),
    st.builds(WindowUpdate, stream_ids, st.integers(1, spdy.MAX_STREAM_ID)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=12), st.data())
def test_round_trip_whatever_the_chunking(sent: list[spdy.Frame], data: st.DataObject) -> None:
    encoder = FrameEncoder()
    wire = b"".join(encoder.encode(frame) for frame in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = FrameDecoder()
    received: list[spdy.Frame] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        decoder.feed(wire[start:cut])
        start = cut
        received += list(decoder)
    assert received == sent
    assert decoder.pending == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(raw: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(raw)
    with contextlib.suppress(ProtocolError):
        list(decoder)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, min_size=1, max_size=6), st.data())
def test_corrupted_streams_never_raise_anything_but_protocol_error(
    sent: list[spdy.Frame], data: st.DataObject
) -> None:
    encoder = FrameEncoder()
    wire = bytearray(b"".join(encoder.encode(frame) for frame in sent))
    for _ in range(data.draw(st.integers(1, 5))):
        index = data.draw(st.integers(0, len(wire) - 1))
        wire[index] = data.draw(st.integers(0, 255))
    wire = wire[: data.draw(st.integers(0, len(wire)))]
    decoder = FrameDecoder()
    decoder.feed(bytes(wire))
    with contextlib.suppress(ProtocolError):
        list(decoder)


# connections over a socket pair


async def connected(
    *, server_filter: spdy.StreamFilter | None = None, idle_timeout: float | None = None
) -> tuple[SpdyConnection, SpdyConnection]:
    left, right = socket.socketpair()
    server = SpdyConnection(
        StreamChannel(*await asyncio.open_connection(sock=left)),
        server=True,
        filter=server_filter,
        idle_timeout=idle_timeout,
    )
    client = SpdyConnection(StreamChannel(*await asyncio.open_connection(sock=right)), server=False)
    server.start()
    client.start()
    return server, client


async def test_streams_data_half_close_and_reset() -> None:
    server, client = await connected()
    try:
        stream = await client.open_stream(make_headers(streamType="stdin", port="80"))
        accepted = await server.accept()
        assert accepted is not None and accepted.id == stream.id == 1
        assert accepted.header("streamType") == "stdin" and accepted.header("port") == "80"
        await stream.write(b"x" * 100_000)
        await stream.close()
        assert await accepted.read_all() == b"x" * 100_000
        await accepted.write(b"reply")
        await accepted.close()
        assert await stream.read_all() == b"reply"
        assert stream.id not in client.streams and accepted.id not in server.streams
        other = await client.open_stream(make_headers(streamType="data"))
        accepted = await server.accept()
        assert accepted is not None
        await other.reset()
        assert await accepted.read() == b"" and accepted.was_reset
        with pytest.raises(StreamClosed):
            await accepted.write(b"late")
    finally:
        await client.close()
        await server.close()


async def test_ping_is_echoed_and_goaway_ends_accepting() -> None:
    server, client = await connected()
    try:
        assert await client.ping() < 5
        assert await server.ping() < 5
        await client.close()
        assert await server.accept() is None
        await asyncio.wait_for(server.closed.wait(), 5)
    finally:
        await server.close()


async def test_rejected_stream_is_reset() -> None:
    server, client = await connected(server_filter=lambda headers: "no" if headers else None)
    try:
        with pytest.raises(StreamClosed):
            await client.open_stream(make_headers(streamType="x"))
        assert (await client.open_stream({})).id == 3
    finally:
        await client.close()
        await server.close()


async def test_reading_grants_window() -> None:
    """The server reads 64 KiB and tells the peer with WINDOW_UPDATE (SPDY/3.1)."""
    left, right = socket.socketpair()
    server = SpdyConnection(StreamChannel(*await asyncio.open_connection(sock=left)), server=True)
    server.start()
    reader, writer = await asyncio.open_connection(sock=right)
    encoder, decoder = FrameEncoder(), FrameDecoder()
    try:
        writer.write(encoder.encode(SynStream(1, make_headers(streamType="data"))))
        writer.write(encoder.encode(DataFrame(1, b"y" * 65536)))
        await writer.drain()
        stream = await server.accept()
        assert stream is not None
        total = 0
        while total < 65536:
            total += len(await stream.read())
        seen: list[spdy.Frame] = []
        while not any(isinstance(f, WindowUpdate) for f in seen):
            decoder.feed(await asyncio.wait_for(reader.read(4096), 5))
            seen += list(decoder)
        assert seen[0] == SynReply(1, {})
        assert WindowUpdate(1, 65536) in seen
    finally:
        writer.close()
        await server.close()


async def test_idle_connection_is_closed() -> None:
    server, client = await connected(idle_timeout=0.3)
    try:
        await asyncio.wait_for(server.closed.wait(), 5)
        await asyncio.wait_for(client.closed.wait(), 5)
    finally:
        await client.close()
        await server.close()


async def _garbage_after_handshake(garbage: bytes) -> tuple[bool, list[spdy.Frame]]:
    left, right = socket.socketpair()
    server = SpdyConnection(StreamChannel(*await asyncio.open_connection(sock=left)), server=True)
    server.start()
    reader, writer = await asyncio.open_connection(sock=right)
    encoder = FrameEncoder()
    writer.write(encoder.encode(SynStream(1, make_headers(streamType="error"))) + garbage)
    writer.write_eof()
    await writer.drain()
    replies = b""
    while chunk := await asyncio.wait_for(reader.read(65536), 5):
        replies += chunk
    await asyncio.wait_for(server.closed.wait(), 5)
    writer.close()
    await server.close()
    decoder = FrameDecoder()
    decoder.feed(replies)
    try:
        return True, list(decoder)
    except ProtocolError:
        return False, []


async def test_garbage_closes_the_connection_with_goaway() -> None:
    parsed, replies = await _garbage_after_handshake(bytes.fromhex("80020006000000040000000100"))
    assert parsed
    assert replies[0] == SynReply(1, {})
    assert GoAway(1, spdy.GoAwayStatus.PROTOCOL_ERROR) in replies


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=1, max_size=600))
def test_connections_survive_any_garbage(garbage: bytes) -> None:
    """Whatever follows a valid stream, the connection ends cleanly: no exception
    escapes into the event loop, no task is left behind."""
    errors: list[dict[str, object]] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        before = len(asyncio.all_tasks())
        await _garbage_after_handshake(garbage)
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == before

    asyncio.run(scenario())
    assert not errors, errors


def test_large_data_frames_come_out_in_pieces_as_they_arrive() -> None:
    """A 1 MiB DATA frame is never held whole: each piece is delivered once its bytes
    are here, the FIN only on the last."""
    payload = bytes(range(256)) * 4096
    wire = spdy.encode_data(3, payload, spdy.FLAG_FIN)
    decoder = FrameDecoder()
    pieces: list[spdy.Frame] = []
    for start in range(0, len(wire), 100_000):
        decoder.feed(wire[start : start + 100_000])
        pieces += list(decoder)
        assert decoder.pending <= 100_000
    assert all(isinstance(p, DataFrame) and p.stream_id == 3 for p in pieces)
    data = [p for p in pieces if isinstance(p, DataFrame)]
    assert max(len(p.data) for p in data) <= spdy.DATA_PIECE
    assert b"".join(p.data for p in data) == payload
    assert [p.flags for p in data] == [0] * (len(data) - 1) + [spdy.FLAG_FIN]


async def test_streams_after_refuse_new_streams_and_over_the_pending_cap_are_refused() -> None:
    server, client = await connected()
    try:
        first = await client.open_stream(make_headers(streamType="error"))
        assert (await server.accept()) is not None
        server.refuse_new_streams()
        with pytest.raises(StreamClosed):
            await client.open_stream(make_headers(streamType="stdout"))
        assert first.id in client.streams
    finally:
        await client.close()
        await server.close()
    server, client = await connected()
    try:
        opened = [
            client.open_stream(make_headers(streamType="data"), timeout=30)
            for _ in range(spdy.MAX_PENDING_STREAMS + 5)
        ]
        results = await asyncio.gather(*opened, return_exceptions=True)
        refused = [r for r in results if isinstance(r, StreamClosed)]
        assert len(refused) == 5  # nobody accepted: only MAX_PENDING_STREAMS are queued
    finally:
        await client.close()
        await server.close()


async def test_a_stream_nobody_reads_stops_the_reader_at_the_connection_budget() -> None:
    """Unread data is bounded: past STREAM_BUFFER on one stream the server stops reading
    (the peer's writes then block in TCP), and reading resumes it."""
    server, client = await connected()
    try:
        stream = await client.open_stream(make_headers(streamType="stdin"))
        accepted = await server.accept()
        assert accepted is not None
        writer = asyncio.ensure_future(stream.write(bytes(4 * spdy.STREAM_BUFFER)))

        async def reader_stopped() -> bool:
            return accepted.inbound.full

        assert await wait_for(reader_stopped, 30, 0.01)
        assert server._buffered <= spdy.STREAM_BUFFER + spdy.DATA_PIECE + 256 * 1024
        assert not writer.done()
        total = 0
        while total < 4 * spdy.STREAM_BUFFER:
            total += len(await accepted.read())
        await writer
        assert server._buffered == 0
    finally:
        await client.close()
        await server.close()
