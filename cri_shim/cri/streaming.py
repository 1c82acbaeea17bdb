"""Exec, Attach and PortForward: validate the request, cache it, return a URL.

The URL points at the streaming server (`cri_shim/streaming/server.py`), which
serves it once, within a minute, from the cached request. Checks that kubelet's
streaming library makes (a container id, tty without stderr, at least one
stream) come first, then whether the container or pod can take a session now.
"""

from __future__ import annotations

from cri_shim.errors import failed_precondition, invalid_argument, require
from cri_shim.gen.runtime import v1 as cri
from cri_shim.store.containers import ContainerState, ContainerStore
from cri_shim.store.sandboxes import SandboxState, SandboxStore
from cri_shim.streaming.server import StreamingServer


def _check_streams(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    if tty and stderr:
        # A terminal has one output: stderr cannot be told apart from stdout.
        raise invalid_argument("tty and stderr cannot both be true")
    if not (stdin or stdout or stderr):
        raise invalid_argument("one of stdin, stdout, or stderr must be set")


class StreamingHandlers:
    def __init__(
        self, containers: ContainerStore, sandboxes: SandboxStore, server: StreamingServer
    ) -> None:
        self.containers = containers
        self.sandboxes = sandboxes
        self.server = server

    def _running(self, container_id: str) -> str:
        container = self.containers.by_id.get(container_id)
        if container.state is not ContainerState.RUNNING:
            raise failed_precondition(
                f"container {container.id} is {container.state.value}, not running"
            )
        return container.id

    async def exec(self, request: cri.ExecRequest) -> cri.ExecResponse:
        require(request.container_id, "container_id")
        if not request.cmd:
            raise invalid_argument("cmd must not be empty")
        _check_streams(request.tty, request.stdin, request.stdout, request.stderr)
        cached = cri.ExecRequest(
            container_id=self._running(request.container_id),
            cmd=list(request.cmd),
            tty=request.tty,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
        )
        return cri.ExecResponse(url=self.server.url_for(cached))

    async def attach(self, request: cri.AttachRequest) -> cri.AttachResponse:
        require(request.container_id, "container_id")
        _check_streams(request.tty, request.stdin, request.stdout, request.stderr)
        cached = cri.AttachRequest(
            container_id=self._running(request.container_id),
            stdin=request.stdin,
            tty=request.tty,
            stdout=request.stdout,
            stderr=request.stderr,
        )
        return cri.AttachResponse(url=self.server.url_for(cached))

    async def port_forward(self, request: cri.PortForwardRequest) -> cri.PortForwardResponse:
        require(request.pod_sandbox_id, "pod_sandbox_id")
        for port in request.port:
            if not 0 < port <= 0xFFFF:
                raise invalid_argument(f"port {port} is not between 1 and 65535")
        sandbox = self.sandboxes.by_id.get(request.pod_sandbox_id)
        if sandbox.state is not SandboxState.READY:
            raise failed_precondition(f"pod sandbox {sandbox.id} is not ready")
        cached = cri.PortForwardRequest(pod_sandbox_id=sandbox.id, port=list(request.port))
        return cri.PortForwardResponse(url=self.server.url_for(cached))
