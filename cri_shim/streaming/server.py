"""The streaming HTTP server: single-use URLs for Exec, Attach and PortForward.

The CRI calls only validate and cache the request; the URL they return holds
a random token, valid once and for one minute (at most `MAX_IN_FLIGHT` at a
time). Everything about the session (container, command, which streams, tty)
comes from the cached request, never from the URL. kubelet proxies its
client's upgrade to that URL byte for byte, so the server answers exactly as
kubelet's own streaming library does: `X-Stream-Protocol-Version`
negotiation for SPDY (400 without the header, 403 listing what we accept when
nothing matches), then `101 Switching Protocols`; or a WebSocket handshake
with a channel subprotocol; an unknown or used token is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cri_shim.concurrency import cancel_and_wait
from cri_shim.errors import ResourceExhausted
from cri_shim.gen.runtime import v1 as cri
from cri_shim.http_limits import CappedTCPSite, fd_share, runner_options
from cri_shim.logs import log_event
from cri_shim.settings import SettingsError, StreamingSettings
from cri_shim.streaming import portforward, remotecommand, websocket
from cri_shim.streaming.exec import StreamRuntime
from cri_shim.streaming.portforward import PodConnector
from cri_shim.streaming.remotecommand import Session, StreamOptions
from cri_shim.streaming.spdy import SpdyConnection, StreamFilter
from cri_shim.streaming.transport import ByteChannel, UpgradedChannel, WebSocketChannel

log = logging.getLogger(__name__)

TOKEN_TTL = 60.0
MAX_IN_FLIGHT = 1000
# A stream (connection) with no traffic either way for this long is closed (kubelet's default).
STREAM_IDLE_TIMEOUT = 4 * 3600.0
STREAM_CREATION_TIMEOUT = 30.0

PROTOCOL_HEADER = "X-Stream-Protocol-Version"
ACCEPTED_HEADER = "X-Accepted-Stream-Protocol-Versions"
SPDY_UPGRADE = "SPDY/3.1"

CachedRequest = cri.ExecRequest | cri.AttachRequest | cri.PortForwardRequest
# What runs a session on an SPDY connection (direct, or tunnelled in WebSocket).
SpdyServe = Callable[[SpdyConnection], Awaitable[None]]


class RequestCache:
    """Tokens for cached streaming requests: random, single use, short-lived, bounded."""

    def __init__(self, ttl: float = TOKEN_TTL, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.ttl = ttl
        self.max_in_flight = max_in_flight
        self._entries: OrderedDict[str, tuple[float, CachedRequest]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            token, (deadline, _) = next(iter(self._entries.items()))
            if deadline > now:
                return
            del self._entries[token]

    def insert(self, request: CachedRequest) -> str:
        now = time.monotonic()
        self._expire(now)
        if len(self._entries) >= self.max_in_flight:
            raise ResourceExhausted("maximum number of in-flight streaming requests exceeded")
        token = secrets.token_urlsafe(24)
        self._entries[token] = (now + self.ttl, request)
        return token

    def consume(self, token: str) -> CachedRequest | None:
        entry = self._entries.pop(token, None)
        if entry is None:
            return None
        deadline, request = entry
        return request if time.monotonic() < deadline else None


def _url_host(address: str) -> str:
    """The host to put in URLs: the bind address, or this node's address when it binds all."""
    host = address or "0.0.0.0"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.is_unspecified:
        ip = ipaddress.ip_address(_primary_address(ip.version))
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _primary_address(version: int) -> str:
    """The source address of this node's default route (no packet is sent)."""
    family, probe = (
        (socket.AF_INET6, "2001:db8::1") if version == 6 else (socket.AF_INET, "192.0.2.1")
    )
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))
            return str(sock.getsockname()[0])
    except OSError:
        return "::1" if version == 6 else "127.0.0.1"


def _ssl_context(settings: StreamingSettings) -> ssl.SSLContext | None:
    if not settings.tls_cert_file and not settings.tls_key_file:
        return None
    if not settings.tls_cert_file or not settings.tls_key_file:
        raise SettingsError("streaming.tls_cert_file and streaming.tls_key_file go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as err:
        raise SettingsError(f"cannot load the streaming TLS certificate: {err}") from err
    return context


def _negotiate_spdy(
    request: web.Request, supported: tuple[str, ...]
) -> tuple[str, None] | tuple[None, web.Response]:
    """kubelet's handshake: the client's first protocol that we also speak."""
    values = request.headers.getall(PROTOCOL_HEADER, [])
    if not values:
        return None, web.Response(
            status=400,
            text=f"unable to upgrade: header {PROTOCOL_HEADER} does not exist in request "
            f"with {len(request.headers)} headers\n",
        )
    offered = [p.strip() for value in values for p in value.split(",") if p.strip()]
    if not offered:
        return None, web.Response(
            status=400,
            text=f"unable to upgrade: header {PROTOCOL_HEADER} contains {values}, "
            "but no valid protocols\n",
        )
    for protocol in offered:
        if protocol in supported:
            return protocol, None
    refused = web.Response(
        status=403,
        text=f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
        f"server accepts {list(supported)}\n",
    )
    for protocol in supported:
        refused.headers.add(ACCEPTED_HEADER, protocol)
    return None, refused


class StreamingServer:
    """aiohttp on the shim's loop, serving /exec, /attach and /portforward tokens."""

    def __init__(
        self,
        settings: StreamingSettings,
        runtime: StreamRuntime,
        connector: PodConnector,
        *,
        idle_timeout: float = STREAM_IDLE_TIMEOUT,
        creation_timeout: float = STREAM_CREATION_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.connector = connector
        self.idle_timeout = idle_timeout
        self.creation_timeout = creation_timeout
        self.cache = RequestCache()
        self.base_url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._sessions: set[asyncio.Task[Any]] = set()

    @property
    def sessions(self) -> int:
        """Upgraded connections being served now."""
        return len(self._sessions)

    async def start(self) -> str:
        """Bind and serve; returns the base URL (the bound port when the setting is 0)."""
        context = _ssl_context(self.settings)
        app = web.Application()
        for kind, handler in (
            ("exec", self._exec),
            ("attach", self._attach),
            ("portforward", self._port_forward),
        ):
            app.router.add_route("GET", f"/{kind}/{{token}}", handler)
            app.router.add_route("POST", f"/{kind}/{{token}}", handler)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            **runner_options(self.settings.header_timeout),
        )
        await runner.setup()
        site = CappedTCPSite(
            runner,
            self.settings.address,
            self.settings.port,
            ssl_context=context,
            max_connections=fd_share(self.settings.max_connections, 8, what="streaming"),
        )
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise SettingsError(
                f"cannot serve streaming on {self.settings.address}:{self.settings.port}: "
                f"{err.strerror or err}"
            ) from err
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        scheme = "https" if context is not None else "http"
        self.base_url = f"{scheme}://{_url_host(self.settings.address)}:{self.port}"
        log_event(log, "streaming serving", url=self.base_url)
        return self.base_url

    async def stop(self) -> None:
        """Stop listening and end every session (their processes are killed)."""
        await cancel_and_wait(self._sessions)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.runtime.wait_cleanups()

    # URLs (the CRI handlers validate before calling these)

    def url_for(self, request: CachedRequest) -> str:
        kind = {
            cri.ExecRequest: "exec",
            cri.AttachRequest: "attach",
            cri.PortForwardRequest: "portforward",
        }[type(request)]
        return f"{self.base_url}/{kind}/{self.cache.insert(request)}"

    # handlers

    def _consume(self, request: web.Request, kind: type[Any]) -> Any:
        cached = self.cache.consume(request.match_info["token"])
        if not isinstance(cached, kind):
            raise web.HTTPNotFound(text="404 page not found\n")
        return cached

    async def _exec(self, request: web.Request) -> web.StreamResponse:
        cached: cri.ExecRequest = self._consume(request, cri.ExecRequest)
        cmd = list(cached.cmd)

        async def session(streams: remotecommand.RemoteStreams) -> remotecommand.StreamStatus:
            return await self.runtime.exec(cached.container_id, cmd, streams)

        options = StreamOptions(cached.stdin, cached.stdout, cached.stderr, cached.tty)
        return await self._remote_command(
            request,
            options,
            session,
            failure="error executing command in container",
            container=cached.container_id,
            kind="exec",
        )

    async def _attach(self, request: web.Request) -> web.StreamResponse:
        cached: cri.AttachRequest = self._consume(request, cri.AttachRequest)

        async def session(streams: remotecommand.RemoteStreams) -> remotecommand.StreamStatus:
            return await self.runtime.attach(cached.container_id, streams)

        options = StreamOptions(cached.stdin, cached.stdout, cached.stderr, cached.tty)
        return await self._remote_command(
            request,
            options,
            session,
            failure="error attaching to container",
            container=cached.container_id,
            kind="attach",
        )

    async def _remote_command(
        self,
        request: web.Request,
        options: StreamOptions,
        session: Session,
        *,
        failure: str,
        **fields: Any,
    ) -> web.StreamResponse:
        def over_spdy(protocol: str) -> SpdyServe:
            async def serve(conn: SpdyConnection) -> None:
                await remotecommand.serve_spdy(
                    conn,
                    protocol,
                    options,
                    session,
                    failure=failure,
                    creation_timeout=self.creation_timeout,
                    **fields,
                )

            return serve

        async def over_websocket(ws: web.WebSocketResponse, protocol: str) -> None:
            await websocket.serve_remotecommand(
                ws,
                protocol,
                options,
                session,
                failure=failure,
                idle_timeout=self.idle_timeout,
                **fields,
            )

        return await self._negotiate_and_serve(
            request,
            remotecommand.SPDY_PROTOCOLS,
            websocket.REMOTECOMMAND_PROTOCOLS,
            None,
            over_spdy,
            over_websocket,
            **fields,
        )

    async def _port_forward(self, request: web.Request) -> web.StreamResponse:
        cached: cri.PortForwardRequest = self._consume(request, cri.PortForwardRequest)
        connect = self.connector.for_pod(cached.pod_sandbox_id)
        fields: dict[str, Any] = {"pod": cached.pod_sandbox_id, "kind": "portforward"}

        def over_spdy(protocol: str) -> SpdyServe:
            async def serve(conn: SpdyConnection) -> None:
                await portforward.serve_spdy(
                    conn, connect, creation_timeout=self.creation_timeout, **fields
                )

            return serve

        async def over_websocket(ws: web.WebSocketResponse, protocol: str) -> None:
            await websocket.serve_portforward(
                ws, protocol, list(cached.port), connect, idle_timeout=self.idle_timeout, **fields
            )

        return await self._negotiate_and_serve(
            request,
            portforward.SPDY_PROTOCOLS,
            websocket.PORTFORWARD_PROTOCOLS,
            portforward.stream_filter,
            over_spdy,
            over_websocket,
            **fields,
        )

    async def _negotiate_and_serve(
        self,
        request: web.Request,
        spdy_protocols: tuple[str, ...],
        websocket_protocols: tuple[str, ...],
        stream_filter: StreamFilter | None,
        over_spdy: Callable[[str], SpdyServe],
        over_websocket: Callable[[web.WebSocketResponse, str], Awaitable[None]],
        **fields: Any,
    ) -> web.StreamResponse:
        """The transport the client asked for, as kubelet's streaming server picks
        it: SPDY tunnelled in WebSocket, a WebSocket channel protocol, or an SPDY
        upgrade; the same session behind each."""
        if websocket.is_websocket(request):
            requested = websocket.requested_protocols(request)
            tunnel = websocket.tunnelled_protocol(requested, spdy_protocols)
            if tunnel is not None:
                inner = tunnel[len(websocket.TUNNEL_PREFIX) :]
                return await self._tunnel(
                    request, tunnel, stream_filter, over_spdy(inner), **fields
                )
            protocol = websocket.negotiate(requested, websocket_protocols)
            if protocol is None:
                return websocket.refuse(requested, websocket_protocols)
            ws = await websocket.accept(request, protocol)
            log_event(log, "stream opened", transport="websocket", protocol=protocol, **fields)
            await self._serve(over_websocket(ws, protocol), **fields)
            return ws
        protocol, refused = _negotiate_spdy(request, spdy_protocols)
        if refused is not None:
            return refused
        assert protocol is not None
        return await self._upgrade_spdy(
            request, protocol, stream_filter, over_spdy(protocol), **fields
        )

    async def _upgrade_spdy(
        self,
        request: web.Request,
        protocol: str,
        filter: StreamFilter | None,
        serve: SpdyServe,
        **fields: Any,
    ) -> web.StreamResponse:
        connection = request.headers.get("Connection", "").lower()
        upgrade = request.headers.get("Upgrade", "").lower()
        if "upgrade" not in connection or SPDY_UPGRADE.lower() not in upgrade:
            return web.Response(
                status=400, text="unable to upgrade: missing upgrade headers in request\n"
            )
        response = web.StreamResponse(
            status=101,
            headers={
                "Connection": "Upgrade",
                "Upgrade": SPDY_UPGRADE,
                PROTOCOL_HEADER: protocol,
            },
        )
        await response.prepare(request)
        channel = UpgradedChannel(request)
        log_event(log, "stream opened", transport="spdy", protocol=protocol, **fields)
        await self._serve_spdy(channel, filter, serve, **fields)
        return response

    async def _tunnel(
        self,
        request: web.Request,
        protocol: str,
        filter: StreamFilter | None,
        serve: SpdyServe,
        **fields: Any,
    ) -> web.StreamResponse:
        ws = await websocket.accept(request, protocol)
        log_event(log, "stream opened", transport="websocket", protocol=protocol, **fields)
        await self._serve_spdy(WebSocketChannel(ws), filter, serve, **fields)
        return ws

    async def _serve_spdy(
        self,
        channel: ByteChannel,
        filter: StreamFilter | None,
        serve: SpdyServe,
        **fields: Any,
    ) -> None:
        conn = SpdyConnection(
            channel,
            server=True,
            filter=filter,
            idle_timeout=self.idle_timeout,
            name=" ".join(f"{k}={v}" for k, v in fields.items()),
        )
        conn.start()
        try:
            await self._serve(serve(conn), **fields)
        finally:
            await conn.close()

    async def _serve(self, work: Awaitable[None], **fields: Any) -> None:
        """Run one session as a tracked task, so that stop() can end it."""
        task = asyncio.ensure_future(work)
        self._sessions.add(task)
        started = time.monotonic()
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return  # the session was ended by stop(), not this handler cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise
        finally:
            self._sessions.discard(task)
            log_event(log, "stream closed", seconds=round(time.monotonic() - started, 3), **fields)
