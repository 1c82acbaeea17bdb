"""Containers the streaming tests forward to, and leak accounting for the shim."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from cri_shim.server import Shim

ECHO_PORT = 9000
HTTP_PORT = 8080

# `nc -ll -e cat`: one connection at a time is what busybox nc handles well;
# each gets its own `cat`, so it echoes and closes after the client's half-close.
NC_ECHO = ["nc", "-ll", "-p", str(ECHO_PORT), "-e", "cat"]

# busybox httpd forks per connection: a CGI that returns the request body, for
# many connections at once.
HTTPD_ECHO = [
    "sh",
    "-c",
    "mkdir -p /www/cgi-bin && cat > /www/cgi-bin/echo <<'EOF'\n"
    "#!/bin/sh\n"
    'printf "Content-Type: application/octet-stream\\r\\n\\r\\n"\n'
    'exec head -c "$CONTENT_LENGTH"\n'
    "EOF\n"
    "chmod +x /www/cgi-bin/echo && echo ready > /www/index.html && "
    f"exec httpd -f -p {HTTP_PORT} -h /www",
]


def http_echo_request(body: bytes) -> bytes:
    return b"POST /cgi-bin/echo HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def http_body(reply: bytes) -> bytes:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head[:200]
    return body


async def echo_server_in_pod(shim: Shim, pod_id: str, port: int) -> asyncio.Server:
    """An asyncio echo server listening on 127.0.0.1:port inside the pod's network
    namespace (the socket is made there; this process serves it): unlike busybox's
    servers it takes hundreds of connections at once."""
    from cri_shim.network.netns import _socket_in_netns

    sandbox = shim.sandboxes.by_id.get(pod_id)
    sock = await asyncio.to_thread(_socket_in_netns, sandbox.netns_path, socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
        except OSError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(echo, sock=sock)


async def wait_listening(shim: Shim, pod_id: str, port: int, timeout: float = 30) -> None:
    """Return once something accepts TCP connections on 127.0.0.1:port in the pod."""
    from cri_shim.network.netns import _socket_in_netns

    sandbox = shim.sandboxes.by_id.get(pod_id)
    deadline = time.monotonic() + timeout
    while True:
        sock = await asyncio.to_thread(_socket_in_netns, sandbox.netns_path, socket.AF_INET)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on port {port} in pod {pod_id}"
        finally:
            sock.close()
        await asyncio.sleep(0.1)


@dataclass
class Usage:
    tasks: int
    fds: int


def usage() -> Usage:
    return Usage(len(asyncio.all_tasks()), len(os.listdir("/proc/self/fd")))


async def settled(shim: Shim, baseline: Usage, timeout: float = 15.0) -> Usage:
    """Wait until the shim's streaming work is gone and tasks/fds are back to the baseline."""
    assert shim.streaming is not None
    deadline = time.monotonic() + timeout
    while True:
        await shim.streaming.runtime.wait_cleanups()
        now = usage()
        idle = shim.streaming.sessions == 0 and shim.streaming.runtime.active == 0
        if idle and now.tasks <= baseline.tasks and now.fds <= baseline.fds:
            return now
        if time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.2)


def exec_dirs(shim: Shim, container_id: str) -> list[Path]:
    assert shim.container_manager is not None
    directory = shim.container_manager.io_dir(container_id) / "exec"
    return sorted(directory.iterdir()) if directory.exists() else []
