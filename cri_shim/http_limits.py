"""Limits shared by the shim's two HTTP servers (streaming and metrics).

aiohttp has neither a header read timeout nor a connection cap. A client that
opens connections and never finishes a request would otherwise hold a file
descriptor each until the process runs out, and then the CRI socket, the
containerd connection and CNI config reads fail with EMFILE.

- Header timeout: aiohttp's keep-alive timer starts when a connection is
  accepted and is not extended by arriving bytes; it closes a connection that
  has no complete request yet. Set to `header_timeout`, it bounds both a
  partial header and an idle connection that never upgrades. A request being
  handled (an upgraded exec/attach/port-forward session) is not affected.
- Connection cap: past `max_connections` open connections a new one gets a
  503 and is closed at once. The cap is clamped to a share of RLIMIT_NOFILE so
  that descriptors remain for the CRI socket and containerd.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from aiohttp import web

from cri_shim.logs import log_event

log = logging.getLogger(__name__)

_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 21\r\nConnection: close\r\n\r\n"
    b"too many connections\n"
)


def fd_share(wanted: int, divisor: int, *, what: str) -> int:
    """`wanted`, but at most 1/`divisor` of the soft RLIMIT_NOFILE (never below 16)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    allowed = max(16, soft // divisor)
    if wanted > allowed:
        log_event(
            log,
            "connection cap lowered to leave file descriptors for the CRI socket and containerd",
            level=logging.WARNING,
            server=what,
            configured=wanted,
            effective=allowed,
            nofile=soft,
        )
        return allowed
    return wanted


def runner_options(header_timeout: float) -> dict[str, Any]:
    """AppRunner keyword arguments that make its keep-alive timer the header timeout."""
    return {"keepalive_timeout": header_timeout}


class _Refused(asyncio.Protocol):
    """One over the cap: a 503, then the connection is closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSAL)
        transport.close()


class CappedTCPSite(web.TCPSite):
    """A TCPSite that refuses connections beyond `max_connections`."""

    __slots__ = ("_max_connections", "refused")

    def __init__(self, runner: web.BaseRunner, *args: Any, max_connections: int, **kwargs: Any):
        super().__init__(runner, *args, **kwargs)
        self._max_connections = max_connections
        self.refused = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)
        handlers = self._runner.server
        assert handlers is not None
        limit = self._max_connections

        def protocol() -> asyncio.BaseProtocol:
            if len(handlers.connections) >= limit:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log_event(
                        log,
                        "connection refused: too many open",
                        level=logging.WARNING,
                        site=self.name,
                        limit=limit,
                        refused=self.refused,
                    )
                return _Refused()
            return handlers()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
        else:
            self._bound_port = self._port


__all__ = ["CappedTCPSite", "fd_share", "runner_options"]
