"""Exec, attach and port-forward through the streaming server against real
containers on containerd + runc, driven by our own client
(tests/support/streaming_client.py) over SPDY and WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import pytest_asyncio
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .conftest import CriClient, wait_for
from .pods import make_container, wait_exited
from .streaming_pods import (
    ECHO_PORT,
    HTTP_PORT,
    HTTPD_ECHO,
    NC_ECHO,
    echo_server_in_pod,
    exec_dirs,
    http_body,
    http_echo_request,
    settled,
    usage,
    wait_listening,
)
from .support.streaming_client import (
    PortForwardClient,
    open_spdy_command,
    open_ws,
    spdy_command,
    ws_command,
)

FAILING = ["sh", "-c", "echo out; echo err >&2; exit 3"]
FAST_ECHO_PORT = 9100


async def exec_url(pods: CriClient, container: str, cmd: list[str], **flags: bool) -> str:
    reply = await pods.runtime.exec(cri.ExecRequest(container_id=container, cmd=cmd, **flags))
    return reply.url


async def attach_url(pods: CriClient, container: str, **flags: bool) -> str:
    reply = await pods.runtime.attach(cri.AttachRequest(container_id=container, **flags))
    return reply.url


async def pf_url(pods: CriClient, pod_id: str, ports: list[int] | None = None) -> str:
    request = cri.PortForwardRequest(pod_sandbox_id=pod_id, port=ports or [])
    return (await pods.runtime.port_forward(request)).url


@pytest_asyncio.fixture(loop_scope="session")
async def sleeper(pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str) -> str:
    return await make_container(pods, pod, busybox, ["sleep", "3600"], name="sleeper")


# exec over SPDY


@pytest.mark.parametrize(
    "protocol", ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
)
async def test_exec_spdy_versions(pods: CriClient, sleeper: str, protocol: str) -> None:
    url = await exec_url(pods, sleeper, FAILING, stdout=True, stderr=True)
    result = await spdy_command(url, protocols=[protocol])
    assert result.protocol == protocol
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    message = (
        "command terminated with non-zero exit code: error executing command "
        "[sh -c echo out; echo err >&2; exit 3], exit code 3"
    )
    if protocol == "v4.channel.k8s.io":
        assert result.exit_code == 3
        assert result.status == {
            "status": "Failure",
            "message": message,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
        }
    else:
        assert result.error.decode() == message  # v1-v3: the bare message
    ok = await spdy_command(
        await exec_url(pods, sleeper, ["true"], stdout=True), protocols=[protocol], stderr=False
    )
    expected = b'{"status":"Success"}' if protocol == "v4.channel.k8s.io" else b""
    assert ok.error == expected


async def test_exec_stdin_reaches_process_and_eof_closes_it(pods: CriClient, sleeper: str) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    url = await exec_url(
        pods, sleeper, ["sh", "-c", "sha256sum; echo done"], stdin=True, stdout=True
    )
    result = await spdy_command(url, stdin=payload, stderr=False)
    digest, _, rest = result.stdout.partition(b" ")
    assert digest.decode() == hashlib.sha256(payload).hexdigest()
    assert rest.endswith(b"done\n")
    assert result.exit_code == 0


async def test_exec_large_output(pods: CriClient, sleeper: str) -> None:
    size = 32 * 1024 * 1024
    prepare = f"head -c {size} /dev/urandom > /tmp/blob && sha256sum /tmp/blob"
    made = await pods.runtime.exec_sync(
        cri.ExecSyncRequest(sleeper, cmd=["sh", "-c", prepare], timeout=60)
    )
    expected = made.stdout.split()[0].decode()
    url = await exec_url(pods, sleeper, ["cat", "/tmp/blob"], stdout=True)
    result = await spdy_command(url, stderr=False)
    assert len(result.stdout) == size
    assert hashlib.sha256(result.stdout).hexdigest() == expected


async def test_exec_tty_merges_output_sets_term_and_resizes(pods: CriClient, sleeper: str) -> None:
    script = "echo err >&2; echo TERM=$TERM; sleep 1; stty size; exit 7"
    url = await exec_url(pods, sleeper, ["sh", "-c", script], stdin=True, stdout=True, tty=True)
    session = await open_spdy_command(url, stdin=True, tty=True)
    try:
        assert session.resize is not None and session.stderr is None
        await session.send_size(100, 30)
        result = await session.collect()
    finally:
        await session.close()
    lines = result.stdout.replace(b"\r\n", b"\n").split(b"\n")
    assert b"err" in lines and b"TERM=xterm" in lines
    assert b"30 100" in lines  # rows, columns as the process sees its terminal
    assert result.exit_code == 7


async def test_exec_client_gone_kills_process_and_cleans_up(
    pods: CriClient, sleeper: str, pod_shim: Shim
) -> None:
    baseline = usage()
    url = await exec_url(
        pods, sleeper, ["sh", "-c", "echo started; exec sleep 1001"], stdout=True, stderr=True
    )
    session = await open_spdy_command(url)
    assert session.stdout is not None
    assert await session.stdout.read() == b"started\n"
    await session.close()  # the client disappears without waiting for the status

    async def still_running() -> bool:
        ps = await pods.runtime.exec_sync(cri.ExecSyncRequest(sleeper, cmd=["ps"], timeout=10))
        return b"sleep 1001" in ps.stdout

    async def killed() -> bool:
        return not await still_running()

    assert await wait_for(killed, timeout=30), "exec'd process survived its client"
    after = await settled(pod_shim, baseline)
    assert after.tasks <= baseline.tasks and after.fds <= baseline.fds, (baseline, after)
    assert exec_dirs(pod_shim, sleeper) == []


async def test_exec_output_after_a_quiet_exit_still_arrives(pods: CriClient, sleeper: str) -> None:
    """The process is silent longer than the drain's grace, then exits while a
    child it left still writes: that output is relayed (the grace counts from
    the exit)."""
    script = "sleep 2.5; (sleep 0.5; echo late) &"
    url = await exec_url(pods, sleeper, ["sh", "-c", script], stdout=True)
    result = await spdy_command(url, stderr=False)
    assert (result.stdout, result.exit_code) == (b"late\n", 0)


async def test_exec_command_that_cannot_start(pods: CriClient, sleeper: str) -> None:
    url = await exec_url(pods, sleeper, ["/no/such/binary"], stdout=True, stderr=True)
    result = await spdy_command(url)
    assert result.status["status"] == "Failure"
    assert result.status["reason"] == "InternalError"
    assert "/no/such/binary" in str(result.status["message"])


async def test_exec_requests_validated(
    pods: CriClient,
    pod: tuple[str, cri.PodSandboxConfig],
    busybox: str,
    sleeper: str,
) -> None:
    bad: list[tuple[cri.ExecRequest, Status]] = [
        (
            cri.ExecRequest(sleeper, ["true"], tty=True, stdout=True, stderr=True),
            Status.INVALID_ARGUMENT,
        ),
        (cri.ExecRequest(sleeper, ["true"]), Status.INVALID_ARGUMENT),
        (cri.ExecRequest(sleeper, [], stdout=True), Status.INVALID_ARGUMENT),
        (cri.ExecRequest("", ["true"], stdout=True), Status.INVALID_ARGUMENT),
        (cri.ExecRequest("f" * 64, ["true"], stdout=True), Status.NOT_FOUND),
    ]
    done = await make_container(pods, pod, busybox, ["true"], name="done")
    await wait_exited(pods, done)
    bad.append((cri.ExecRequest(done, ["true"], stdout=True), Status.FAILED_PRECONDITION))
    for request, status in bad:
        with pytest.raises(GRPCError) as caught:
            await pods.runtime.exec(request)
        assert caught.value.status is status, request
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.attach(cri.AttachRequest(done, stdout=True))
    assert caught.value.status is Status.FAILED_PRECONDITION


async def test_fifty_concurrent_execs_leave_nothing_behind(
    pods: CriClient, sleeper: str, pod_shim: Shim
) -> None:
    baseline = usage()

    async def one(index: int) -> None:
        url = await exec_url(
            pods,
            sleeper,
            ["sh", "-c", f"cat; echo {index} >&2; exit {index % 5}"],
            stdin=True,
            stdout=True,
            stderr=True,
        )
        payload = os.urandom(64 * 1024 + index)
        if index % 2:
            result = await spdy_command(url, stdin=payload)
        else:
            result = await ws_command(url, stdin=payload)
        assert result.stdout == payload
        assert result.stderr == f"{index}\n".encode()
        assert result.exit_code == index % 5

    await asyncio.gather(*(one(i) for i in range(50)))
    after = await settled(pod_shim, baseline)
    assert after.tasks <= baseline.tasks and after.fds <= baseline.fds, (baseline, after)
    assert exec_dirs(pod_shim, sleeper) == []


async def test_concurrent_execs_on_a_loaded_loop_keep_their_output(
    pods: CriClient, sleeper: str, pod_shim: Shim
) -> None:
    """A hundred execs at once while the loop is slowed and a worker thread
    opens files, as the shim's own threads do: no exec may lose its stdin,
    stdout or stderr to a descriptor closed under it (uvloop#763 took FIFOs
    away from concurrent execs this way: empty stdout, or the runc shim
    timing out opening a FIFO)."""
    stop = threading.Event()
    witness = pod_shim.settings.state_dir

    def open_files() -> None:
        while not stop.is_set():
            os.close(os.open(witness, os.O_RDONLY))

    async def slow_loop() -> None:
        while not stop.is_set():
            time.sleep(0.002)  # noqa: ASYNC251 - deliberately blocks the loop: every turn is slower
            await asyncio.sleep(0)

    thread = threading.Thread(target=open_files, daemon=True)
    thread.start()
    slower = asyncio.create_task(slow_loop())
    wrong: list[tuple[int, int, bytes, int | None]] = []

    async def one(index: int) -> None:
        script = f"cat; echo {index} >&2; exit {index % 5}"
        url = await exec_url(
            pods, sleeper, ["sh", "-c", script], stdin=True, stdout=True, stderr=True
        )
        payload = os.urandom(64 * 1024 + index)
        command = spdy_command if index % 2 else ws_command
        result = await command(url, stdin=payload)
        if (result.stdout, result.stderr) != (payload, f"{index}\n".encode()):
            wrong.append((index, len(result.stdout), result.stderr, result.exit_code))

    try:
        await asyncio.gather(*(one(i) for i in range(100)))
    finally:
        stop.set()
        await slower
        await asyncio.to_thread(thread.join)
    assert wrong == []


# exec over WebSocket


@pytest.mark.parametrize(
    "protocol",
    [
        "v5.channel.k8s.io",
        "v4.channel.k8s.io",
        "v4.base64.channel.k8s.io",
        "channel.k8s.io",
        "base64.channel.k8s.io",
        "",
    ],
)
async def test_exec_websocket_protocols(pods: CriClient, sleeper: str, protocol: str) -> None:
    url = await exec_url(pods, sleeper, FAILING, stdout=True, stderr=True)
    result = await ws_command(url, protocol=protocol)
    assert result.protocol == protocol
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    if protocol.startswith(("v4.", "v5.")):
        assert result.exit_code == 3
    else:
        assert result.error.endswith(b"exit code 3")


async def test_exec_websocket_v5_stdin_close_and_resize(pods: CriClient, sleeper: str) -> None:
    url = await exec_url(pods, sleeper, ["sh", "-c", "cat; echo eof"], stdin=True, stdout=True)
    result = await ws_command(url, stdin=b"abc")
    assert result.stdout == b"abceof\n"
    script = "sleep 1; stty size"
    url = await exec_url(pods, sleeper, ["sh", "-c", script], stdin=True, stdout=True, tty=True)
    result = await ws_command(url, stdin=b"", sizes=[(120, 40)])
    assert b"40 120" in result.stdout


async def test_exec_websocket_first_message_announces_streams(
    pods: CriClient, sleeper: str
) -> None:
    url = await exec_url(pods, sleeper, ["true"], stderr=True)
    http, ws = await open_ws(url, ["v4.channel.k8s.io"])
    try:
        first = await ws.receive()
        assert first.data == bytes([2])  # empty message on stderr, the first output asked for
    finally:
        await ws.close()
        await http.close()


# attach


async def test_attach_stdin_once_ends_the_container(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    container = await make_container(
        pods, pod, busybox, ["sh"], name="once", stdin=True, stdin_once=True
    )
    url = await attach_url(pods, container, stdin=True, stdout=True, stderr=True)
    result = await spdy_command(url, stdin=b"echo hi; echo oops >&2; exit 4\n")
    assert (result.stdout, result.stderr) == (b"hi\n", b"oops\n")
    assert result.status == {"status": "Success"}
    assert (await wait_exited(pods, container)).exit_code == 4


async def test_attach_two_clients_share_output_and_detach(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str, pod_shim: Shim
) -> None:
    script = 'while read line; do echo "got $line"; done'
    container = await make_container(
        pods, pod, busybox, ["sh", "-c", script], name="shared", stdin=True
    )
    writer = await open_spdy_command(
        await attach_url(pods, container, stdin=True, stdout=True), stdin=True, stderr=False
    )
    watcher = await open_spdy_command(await attach_url(pods, container, stdout=True), stderr=False)
    try:
        assert writer.stdin is not None and writer.stdout is not None
        assert watcher.stdout is not None

        async def both_attached() -> bool:
            return b"cri_shim_streaming_sessions 2.0" in pod_shim.metrics.render()

        assert await wait_for(both_attached, timeout=30)
        await writer.stdin.write(b"one\n")
        assert await writer.stdout.read() == b"got one\n"
        assert await watcher.stdout.read() == b"got one\n"
        # Without stdin_once, closing stdin detaches this client; the container goes on.
        await writer.stdin.close()
        assert (await writer.collect()).status == {"status": "Success"}
        status = await pods.runtime.container_status(cri.ContainerStatusRequest(container))
        assert status.status is not None
        assert status.status.state == cri.ContainerState.CONTAINER_RUNNING
        await pods.runtime.stop_container(cri.StopContainerRequest(container, timeout=0))
        assert (await watcher.collect()).status == {"status": "Success"}
    finally:
        await writer.close()
        await watcher.close()


async def test_attach_terminal_resize_over_websocket(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    container = await make_container(pods, pod, busybox, ["sh"], name="tty", stdin=True, tty=True)
    url = await attach_url(pods, container, stdin=True, stdout=True, tty=True)
    http, ws = await open_ws(url, ["v5.channel.k8s.io"])
    try:
        await ws.send_bytes(b"\x04" + json.dumps({"Width": 90, "Height": 33}).encode())
        # The resize takes effect asynchronously: ask until the terminal has it.
        output = b""
        deadline = time.monotonic() + 30
        while b"33 90" not in output:
            assert time.monotonic() < deadline, output[-300:]
            await ws.send_bytes(b"\x00stty size\n")
            with contextlib.suppress(TimeoutError):
                while b"33 90" not in output:
                    message = await ws.receive(timeout=1)
                    output += message.data[1:]
        await ws.send_bytes(b"\x00exit 0\n")
        async for message in ws:
            output += message.data[1:]
    finally:
        await http.close()
    assert (await wait_exited(pods, container)).exit_code == 0


# port-forward


@pytest_asyncio.fixture(loop_scope="session")
async def echo_pod(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str, pod_shim: Shim
) -> str:
    """A pod echoing connections on ECHO_PORT (nc) and HTTP POST bodies on HTTP_PORT."""
    await make_container(pods, pod, busybox, NC_ECHO, name="nc")
    await make_container(pods, pod, busybox, HTTPD_ECHO, name="httpd")
    await wait_listening(pod_shim, pod[0], ECHO_PORT)
    await wait_listening(pod_shim, pod[0], HTTP_PORT)
    return pod[0]


@pytest.mark.parametrize("transport", ["spdy", "websocket-tunnel"])
async def test_port_forward_64mib_checksummed(
    pods: CriClient, echo_pod: str, transport: str
) -> None:
    url = await pf_url(pods, echo_pod)
    if transport == "spdy":
        client = await PortForwardClient.connect(url)
    else:
        client = await PortForwardClient.connect_tunnel(url)
    try:
        data, error = await client.open(ECHO_PORT)
        size = 64 * 1024 * 1024
        sent, received = hashlib.sha256(), hashlib.sha256()
        count = 0

        async def send() -> None:
            for _ in range(size // (1024 * 1024)):
                block = os.urandom(1024 * 1024)
                sent.update(block)
                await data.write(block)
            await data.close()

        async def receive() -> None:
            nonlocal count
            while chunk := await data.read():
                received.update(chunk)
                count += len(chunk)

        await asyncio.gather(send(), receive())
        assert count == size
        assert sent.hexdigest() == received.hexdigest()
        assert await error.read_all() == b""
    finally:
        await client.close()


async def test_port_forward_200_concurrent_connections_leave_nothing_behind(
    pods: CriClient, echo_pod: str, pod_shim: Shim
) -> None:
    server = await echo_server_in_pod(pod_shim, echo_pod, FAST_ECHO_PORT)
    baseline = usage()
    client = await PortForwardClient.connect(await pf_url(pods, echo_pod))
    try:

        async def one(payload: bytes) -> bytes:
            data, error = await client.open(FAST_ECHO_PORT)
            await data.write(payload)
            await data.close()
            echoed = await data.read_all()
            assert await error.read_all() == b""
            return echoed

        payloads = [os.urandom(1000 + 37 * i) for i in range(200)]
        assert await asyncio.gather(*(one(p) for p in payloads)) == payloads
        # The server finished every stream it was sent (the client keeps its error streams).
        assert all(stream.remote_closed for stream in client.conn.streams.values())

        # And over HTTP to a real server in the container (fewer: busybox httpd is slow).
        async def post(body: bytes) -> bytes:
            data, error = await client.open(HTTP_PORT)
            await data.write(http_echo_request(body))
            reply = await data.read_all()
            await data.close()
            assert await error.read_all() == b""
            return http_body(reply)

        assert await asyncio.gather(*(post(p) for p in payloads[:10])) == payloads[:10]
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    after = await settled(pod_shim, baseline)
    assert after.tasks <= baseline.tasks and after.fds <= baseline.fds, (baseline, after)


async def test_port_forward_nothing_listening(pods: CriClient, echo_pod: str) -> None:
    client = await PortForwardClient.connect(await pf_url(pods, echo_pod))
    try:
        data, error = await client.open(9999)
        message = (await error.read_all()).decode()
        assert "error forwarding port 9999" in message
        assert "connection refused" in message.lower()
        assert await data.read() == b"" and data.was_reset
        # the connection still serves other ports
        data, error = await client.open(HTTP_PORT)
        await data.write(http_echo_request(b"still here"))
        assert http_body(await data.read_all()) == b"still here"
    finally:
        await client.close()


async def test_port_forward_clients_without_request_id(pods: CriClient, echo_pod: str) -> None:
    """Old clients: pairs found from stream ids (error first, data two ids later)."""
    from cri_shim.streaming.spdy import make_headers

    client = await PortForwardClient.connect(await pf_url(pods, echo_pod))
    try:
        error = await client.conn.open_stream(make_headers(streamType="error", port="8080"))
        data = await client.conn.open_stream(make_headers(streamType="data", port="8080"))
        await data.write(http_echo_request(b"no id"))
        assert http_body(await data.read_all()) == b"no id"
        assert await error.read_all() == b""
    finally:
        await client.close()


async def test_port_forward_websocket_channels(pods: CriClient, echo_pod: str) -> None:
    url = await pf_url(pods, echo_pod, [HTTP_PORT, 9999])
    http, ws = await open_ws(url, ["v4.channel.k8s.io"])
    try:
        prefixes = [await ws.receive() for _ in range(4)]
        port_bytes = HTTP_PORT.to_bytes(2, "little")
        closed_bytes = (9999).to_bytes(2, "little")
        assert [m.data for m in prefixes] == [
            b"\x00" + port_bytes,
            b"\x01" + port_bytes,
            b"\x02" + closed_bytes,
            b"\x03" + closed_bytes,
        ]
        await ws.send_bytes(b"\x00" + http_echo_request(b"over channels"))
        received: dict[int, bytes] = {}
        async for message in ws:
            received[message.data[0]] = received.get(message.data[0], b"") + message.data[1:]
        assert http_body(received[0]) == b"over channels"
        assert b"error forwarding port 9999" in received[3]
    finally:
        await http.close()


async def test_attach_client_too_slow_is_dropped_and_the_log_goes_on(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str, pod_shim: Shim
) -> None:
    script = "while :; do head -c 200000 /dev/zero | tr '\\0' a; echo; done"
    container = await make_container(pods, pod, busybox, ["sh", "-c", script], name="loud")
    status = (await pods.runtime.container_status(cri.ContainerStatusRequest(container))).status
    assert status is not None
    log_path = Path(status.log_path)
    streaming = pod_shim.streaming
    assert streaming is not None
    # A client that never reads: its buffers fill, then the server's backlog for it.
    # (Its own reader is paused by back-pressure too, so the server is what we watch.)
    session = await open_spdy_command(await attach_url(pods, container, stdout=True), stderr=False)
    try:

        async def attached() -> bool:
            return streaming.runtime.active == 1

        async def dropped() -> bool:
            return streaming.runtime.active == 0

        assert await wait_for(attached, 10, interval=0.01)
        assert await wait_for(dropped, 90)
        size = log_path.stat().st_size

        async def log_grew() -> bool:
            return log_path.stat().st_size > size

        assert await wait_for(log_grew, timeout=30)  # the container's log never stalled
    finally:
        await session.close()
        await pods.runtime.stop_container(cri.StopContainerRequest(container, timeout=0))
