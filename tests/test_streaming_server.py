"""The streaming server on its own (no containerd): tokens, handshakes, the
protocol versions, timeouts, hostile input, TLS. A scripted runtime stands in
for containerd and local TCP servers for pods."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from grpclib.const import Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cri_shim.errors import ResourceExhausted, to_grpc_error
from cri_shim.gen.runtime import v1 as cri
from cri_shim.settings import StreamingSettings
from cri_shim.streaming import portforward
from cri_shim.streaming.remotecommand import RemoteStreams, StreamStatus
from cri_shim.streaming.server import RequestCache, StreamingServer, _url_host
from cri_shim.streaming.spdy import make_headers

from .conftest import wait_for
from .support.streaming_client import (
    PortForwardClient,
    UpgradeRefused,
    http_request,
    open_spdy_command,
    open_ws,
    spdy_command,
    spdy_connect,
    ws_command,
)
from .support.tools import require_tool

Behaviour = Callable[[list[str], RemoteStreams], Awaitable[StreamStatus]]


async def echo_behaviour(cmd: list[str], streams: RemoteStreams) -> StreamStatus:
    """stdin to stdout, the command to stderr, exit code = number of arguments."""
    if streams.stdin is not None and streams.stdout is not None:
        while data := await streams.stdin.read():
            await streams.stdout.write(data)
    if streams.stderr is not None:
        await streams.stderr.write(" ".join(cmd).encode())
    return StreamStatus.exited(len(cmd) - 1, cmd)


@dataclass
class FakeRuntime:
    behaviour: Behaviour = echo_behaviour
    calls: list[tuple[str, list[str], RemoteStreams]] = field(default_factory=list)
    cancelled: int = 0
    active: int = 0

    async def exec(self, container_id: str, cmd: list[str], streams: RemoteStreams) -> StreamStatus:
        self.calls.append((container_id, cmd, streams))
        try:
            return await self.behaviour(cmd, streams)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def attach(self, container_id: str, streams: RemoteStreams) -> StreamStatus:
        return await self.exec(container_id, ["attach"], streams)

    async def wait_cleanups(self) -> None:
        pass


@dataclass
class FakeConnector:
    ports: dict[int, int] = field(default_factory=dict)  # pod port -> local port

    def for_pod(self, sandbox_id: str) -> portforward.Connector:
        async def connect(port: int) -> portforward.Connection:
            if port not in self.ports:
                raise portforward.PortForwardError(f"nothing listens on {port} in {sandbox_id}")
            return await asyncio.open_connection("127.0.0.1", self.ports[port])

        return connect


@dataclass
class Served:
    server: StreamingServer
    runtime: FakeRuntime
    connector: FakeConnector

    def exec_url(self, cmd: list[str] | None = None, **flags: bool) -> str:
        # The client helpers open stderr unless told not to, as client-go does when the
        # request asks for it; the server refuses streams the request did not ask for.
        flags.setdefault("stderr", not flags.get("tty", False))
        return self.server.url_for(cri.ExecRequest("c1", cmd or ["echo", "hi"], **flags))


@contextlib.asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[Served]:
    tls = kwargs.pop("tls", None)
    settings = StreamingSettings(**(tls or {}))
    runtime, connector = FakeRuntime(), FakeConnector()
    server = StreamingServer(settings, runtime, connector, **kwargs)  # type: ignore[arg-type]
    await server.start()
    try:
        yield Served(server, runtime, connector)
    finally:
        await server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def served() -> AsyncIterator[Served]:
    async with serving() as value:
        yield value


async def echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


# tokens


async def test_tokens_are_single_use(served: Served) -> None:
    url = served.exec_url(stdout=True)
    assert (await spdy_command(url)).stdout == b""
    with pytest.raises(UpgradeRefused) as caught:
        await spdy_command(url)
    assert caught.value.status == 404
    for bogus in (url[:-3] + "abc", served.server.base_url + "/exec/", url + "/x"):
        with pytest.raises(UpgradeRefused) as caught:
            await spdy_command(bogus)
        assert caught.value.status == 404
    # a token is for its own kind only
    attach = served.server.url_for(cri.AttachRequest("c1", stdout=True))
    with pytest.raises(UpgradeRefused) as caught:
        await spdy_command(attach.replace("/attach/", "/exec/"))
    assert caught.value.status == 404


def test_request_cache_expires_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = RequestCache(ttl=60, max_in_flight=2)
    first = cache.insert(cri.ExecRequest("a"))
    second = cache.insert(cri.ExecRequest("b"))
    assert len(first) >= 32 and first != second
    with pytest.raises(ResourceExhausted) as caught:
        cache.insert(cri.ExecRequest("c"))
    assert to_grpc_error(caught.value, "Exec").status is Status.RESOURCE_EXHAUSTED
    assert cache.consume(first) == cri.ExecRequest("a")
    assert cache.consume(first) is None
    import time

    later = time.monotonic() + 61
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert cache.consume(second) is None  # expired
    cache.insert(cri.ExecRequest("d"))
    cache.insert(cri.ExecRequest("e"))


async def test_session_comes_from_the_cached_request_not_the_url(served: Served) -> None:
    url = served.exec_url(["ls", "-l"], stdout=True, stderr=True)
    result = await spdy_command(url + "?command=rm&command=-rf&tty=1&input=1&container=other")
    container, cmd, streams = served.runtime.calls[-1]
    assert (container, cmd) == ("c1", ["ls", "-l"])
    assert streams.stdin is None and not streams.tty
    assert result.stderr == b"ls -l"
    assert result.exit_code == 1


# handshakes


async def test_spdy_handshake_errors(served: Served) -> None:
    upgrade = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    reply, _, _ = await http_request(served.exec_url(stdout=True), headers=upgrade)
    assert reply.status == 400
    assert b"X-Stream-Protocol-Version" in reply.body
    with pytest.raises(UpgradeRefused) as caught:
        await spdy_connect(served.exec_url(stdout=True), ["v9.channel.k8s.io", "nope"])
    assert caught.value.status == 403
    assert caught.value.headers["x-accepted-stream-protocol-versions"] == [
        "v4.channel.k8s.io",
        "v3.channel.k8s.io",
        "v2.channel.k8s.io",
        "channel.k8s.io",
    ]
    plain = [("X-Stream-Protocol-Version", "v4.channel.k8s.io")]
    reply, _, _ = await http_request(served.exec_url(stdout=True), headers=plain)
    assert reply.status == 400
    with pytest.raises(UpgradeRefused) as caught:
        await spdy_connect(
            served.server.url_for(cri.PortForwardRequest("p1")), ["v4.channel.k8s.io"]
        )
    assert caught.value.status == 403
    assert caught.value.headers["x-accepted-stream-protocol-versions"] == ["portforward.k8s.io"]


async def test_websocket_handshake_refuses_unknown_protocols(served: Served) -> None:
    import aiohttp

    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await ws_command(served.exec_url(stdout=True), protocol="v9.channel.k8s.io")
    assert caught.value.status == 403


async def test_spdy_reply_headers(served: Served) -> None:
    headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "SPDY/3.1"),
        ("X-Stream-Protocol-Version", "v9.channel.k8s.io, v3.channel.k8s.io"),
        ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
    ]
    reply, _, writer = await http_request(served.exec_url(stdout=True), headers=headers)
    writer.close()
    assert reply.status == 101
    assert reply.header("upgrade") == "SPDY/3.1"
    assert reply.header("connection").lower() == "upgrade"
    assert reply.header("x-stream-protocol-version") == "v3.channel.k8s.io"  # client's order


# versions


async def test_version_specific_behaviour(served: Served) -> None:
    for protocol in ("channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io"):
        url = served.exec_url(["sh", "-c", "x"], stdin=True, stdout=True, tty=True)
        session = await open_spdy_command(url, protocols=[protocol], stdin=True, tty=True)
        try:
            assert (session.resize is not None) == (protocol == "v3.channel.k8s.io")
            assert session.stdin is not None
            if protocol == "channel.k8s.io":
                # v1: the server half-closes stdin at once (kubelet does)
                assert await asyncio.wait_for(session.stdin.read(), 5) == b""
            await session.stdin.close()
            result = await session.collect()
        finally:
            await session.close()
        assert result.error.decode().endswith("exit code 2")


async def test_resize_messages_reach_the_session(served: Served) -> None:
    sizes: list[tuple[int, int]] = []

    async def record(cmd: list[str], streams: RemoteStreams) -> StreamStatus:
        assert streams.resize is not None
        async for size in streams.resize:
            sizes.append((size.width, size.height))
            if len(sizes) % 3 == 0:
                break
        return StreamStatus.ok()

    served.runtime.behaviour = record
    try:
        url = served.exec_url(stdin=True, stdout=True, tty=True)
        session = await open_spdy_command(url, stdin=True, tty=True)
        assert session.resize is not None
        # split and joined JSON objects, and ones to ignore
        await session.resize.write(b'{"Width":80,"Hei')
        await session.resize.write(b'ght":24}\n{"Width":0,"Height":5}{"Width":100,"Height":30}')
        await session.resize.write(b' "junk" {"Width":1,"Height":2}\n')
        result = await session.collect()
        await session.close()
        assert sizes == [(80, 24), (100, 30), (1, 2)]
        assert result.status == {"status": "Success"}
        url = served.exec_url(stdout=True, tty=True)
        ws_result = await ws_command(url, stdin=None, sizes=[(10, 20), (30, 40), (50, 60)])
        assert ws_result.status == {"status": "Success"}
        assert sizes[3:] == [(10, 20), (30, 40), (50, 60)]
    finally:
        served.runtime.behaviour = echo_behaviour


async def test_session_failure_is_an_internal_error(served: Served) -> None:
    async def broken(cmd: list[str], streams: RemoteStreams) -> StreamStatus:
        raise RuntimeError("containerd said no")

    served.runtime.behaviour = broken
    try:
        result = await spdy_command(served.exec_url(stdout=True))
        assert result.status == {
            "status": "Failure",
            "message": "Internal error occurred: error executing command in container: "
            "containerd said no",
            "reason": "InternalError",
            "code": 500,
        }
        v2 = await spdy_command(served.exec_url(stdout=True), protocols=["v2.channel.k8s.io"])
        assert v2.error.startswith(b"Internal error occurred:")
    finally:
        served.runtime.behaviour = echo_behaviour


@pytest.mark.parametrize(
    "protocol",
    ["v5.channel.k8s.io", "v4.base64.channel.k8s.io", "base64.channel.k8s.io", ""],
)
async def test_websocket_codecs(served: Served, protocol: str) -> None:
    url = served.exec_url(["a", "b", "c"], stdout=True, stderr=True)
    result = await ws_command(url, protocol=protocol)
    assert result.stderr == b"a b c"
    if protocol.startswith(("v4.", "v5.")):
        assert result.exit_code == 2
    else:
        assert result.error.endswith(b"exit code 2")
    # v5's close signal ends stdin; the others can only end with the connection
    if protocol == "v5.channel.k8s.io":
        url = served.exec_url(["cat"], stdin=True, stdout=True)
        assert (await ws_command(url, stdin=b"\x00\xff binary")).stdout == b"\x00\xff binary"


# lifetimes


async def test_client_that_never_creates_its_streams() -> None:
    async with serving(creation_timeout=0.3) as served:
        conn, _ = await spdy_connect(
            served.exec_url(stdin=True, stdout=True), ["v4.channel.k8s.io"]
        )
        await conn.open_stream(make_headers(streamType="error"))
        await asyncio.wait_for(conn.closed.wait(), 5)
        assert served.runtime.calls == []
        await conn.close()


async def test_client_gone_cancels_the_session(served: Served) -> None:
    started = asyncio.Event()

    async def forever(cmd: list[str], streams: RemoteStreams) -> StreamStatus:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("not cancelled")

    served.runtime.behaviour = forever
    try:
        for opener in ("spdy", "websocket"):
            cancelled = served.runtime.cancelled
            started.clear()
            url = served.exec_url(stdout=True)
            if opener == "spdy":
                session = await open_spdy_command(url)
                await started.wait()
                await session.close()
            else:
                http, ws = await open_ws(url, ["v5.channel.k8s.io"])
                await started.wait()
                await ws.close()
                await http.close()

            async def ended(before: int = cancelled) -> bool:
                return served.runtime.cancelled > before and served.server.sessions == 0

            assert await wait_for(ended, timeout=30)
            assert served.runtime.cancelled == cancelled + 1
            assert served.server.sessions == 0
    finally:
        served.runtime.behaviour = echo_behaviour


async def test_stop_ends_every_session() -> None:
    async def forever(cmd: list[str], streams: RemoteStreams) -> StreamStatus:
        await asyncio.sleep(3600)
        raise AssertionError("not cancelled")

    async with serving() as served:
        served.runtime.behaviour = forever
        session = await open_spdy_command(served.exec_url(stdout=True))

        async def one_session() -> bool:
            return served.server.sessions == 1

        assert await wait_for(one_session, timeout=30)
        await served.server.stop()
        await asyncio.wait_for(session.conn.closed.wait(), 5)
        assert served.runtime.cancelled == 1
        await session.close()


async def test_idle_connections_are_closed() -> None:
    async with serving(idle_timeout=0.4) as served:
        client = await PortForwardClient.connect(
            served.server.url_for(cri.PortForwardRequest("p1"))
        )
        await asyncio.wait_for(client.conn.closed.wait(), 5)
        await client.close()

        async def ended() -> bool:  # the server closes once the client has closed too
            return served.server.sessions == 0

        assert await wait_for(ended, 5, interval=0.02)


# hostile input


async def test_garbage_after_upgrade_never_hurts_the_server(served: Served) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))

    async def attempt(kind: str, garbage: bytes) -> None:
        if kind == "portforward":
            url, protocol = (
                served.server.url_for(cri.PortForwardRequest("p1")),
                "portforward.k8s.io",
            )
        else:
            url, protocol = served.exec_url(stdin=True, stdout=True), "v4.channel.k8s.io"
        headers = [
            ("Connection", "Upgrade"),
            ("Upgrade", "SPDY/3.1"),
            ("X-Stream-Protocol-Version", protocol),
        ]
        reply, reader, writer = await http_request(url, headers=headers)
        assert reply.status == 101
        writer.write(garbage)
        writer.write_eof()  # garbage may also be the start of a valid frame: then EOF ends it
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(-1), 10)  # the server closes it
        writer.close()

    @settings(
        max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(st.sampled_from(["exec", "portforward"]), st.binary(min_size=1, max_size=400))
    def fuzz(kind: str, garbage: bytes) -> None:
        asyncio.run_coroutine_threadsafe(attempt(kind, garbage), loop).result(30)

    try:
        await asyncio.to_thread(fuzz)
    finally:
        loop.set_exception_handler(previous)
    assert not errors, errors[:3]

    async def no_session() -> bool:
        return served.server.sessions == 0

    assert await wait_for(no_session, timeout=30)
    result = await spdy_command(served.exec_url(["x", "y"], stderr=True), stdout=False)
    assert result.stderr == b"x y"


# port-forward


async def test_port_forward_spdy_websocket_and_tunnel(served: Served) -> None:
    echo = await echo_server()
    served.connector.ports = {80: echo.sockets[0].getsockname()[1]}
    try:
        for tunnel in (False, True):
            url = served.server.url_for(cri.PortForwardRequest("p1"))
            client = await (
                PortForwardClient.connect_tunnel(url) if tunnel else PortForwardClient.connect(url)
            )
            try:
                data, error = await client.open(80)
                await data.write(b"ping")
                await data.close()
                assert await data.read_all() == b"ping"
                assert await error.read_all() == b""
                data, error = await client.open(81)
                assert b"nothing listens on 81" in await error.read_all()
                # streams without the headers port-forward needs are refused
                with pytest.raises(ConnectionError):
                    await client.conn.open_stream(make_headers(streamType="data"))
                with pytest.raises(ConnectionError):
                    await client.conn.open_stream(make_headers(streamType="weird", port="80"))
            finally:
                await client.close()
        url = served.server.url_for(cri.PortForwardRequest("p1", port=[80]))
        http, ws = await open_ws(url, ["v4.base64.channel.k8s.io"])
        try:
            assert [(await ws.receive()).data for _ in range(2)] == ["0UAA=", "1UAA="]
            await ws.send_str("0" + "aGVsbG8=")  # "hello"
            assert (await ws.receive()).data == "0aGVsbG8="
        finally:
            await ws.close()
            await http.close()
    finally:
        echo.close()


async def test_port_forward_pair_that_never_completes() -> None:
    async with serving(creation_timeout=0.3) as served:
        client = await PortForwardClient.connect(
            served.server.url_for(cri.PortForwardRequest("p1"))
        )
        try:
            error = await client.conn.open_stream(
                make_headers(streamType="error", port="80", requestID="7")
            )
            assert b"timed out waiting for the streams" in await error.read_all()
        finally:
            await client.close()


# addresses and TLS


def test_url_hosts() -> None:
    assert _url_host("127.0.0.1") == "127.0.0.1"
    assert _url_host("::1") == "[::1]"
    assert _url_host("node.example") == "node.example"
    assert _url_host("0.0.0.0") not in ("0.0.0.0", "")


async def test_tls(tmp_path: Path) -> None:
    require_tool("openssl", "openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    async with serving(tls={"tls_cert_file": str(cert), "tls_key_file": str(key)}) as served:
        url = served.exec_url(["a", "b"], stderr=True)
        assert url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        conn, _ = await spdy_connect(url, ["v4.channel.k8s.io"], ssl_context=context)
        try:
            error = await conn.open_stream(make_headers(streamType="error"))
            stderr = await conn.open_stream(make_headers(streamType="stderr"))
            assert await stderr.read_all() == b"a b"
            assert b'"reason":"NonZeroExitCode"' in await error.read_all()
        finally:
            await conn.close()


async def test_header_timeout_closes_idle_connections_but_never_a_session() -> None:
    """With a 0.3 s header timeout: a connection that never sends its request is closed,
    while an upgraded session that outlives the timeout many times over goes on."""
    settings = StreamingSettings(header_timeout=0.3)
    runtime, connector = FakeRuntime(), FakeConnector()
    server = StreamingServer(settings, runtime, connector)  # type: ignore[arg-type]
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /exec/x HTTP/1.1\r\nHost: a\r\n")
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        url = server.url_for(cri.ExecRequest("c1", ["cat"], stdin=True, stdout=True))
        session = await open_spdy_command(url, stdin=True, stderr=False)
        assert session.stdin is not None and session.stdout is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        rounds = 0
        while loop.time() - started < 5 * settings.header_timeout:
            message = f"round {rounds}".encode()
            await session.stdin.write(message)
            assert await asyncio.wait_for(session.stdout.read(), 30) == message
            rounds += 1
        await session.stdin.close()
        result = await session.collect()
        await session.close()
        assert result.status == {"status": "Success"} or result.exit_code == 0
    finally:
        await server.stop()
