"""The one wrapper every CRI call goes through.

It logs one structured line per call with the ids a person searches for, times
the call, counts calls in flight (graceful shutdown waits for them), and maps
any escaping exception to a gRPC status with a readable message. Nothing the
handler raises reaches the client as a Python traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.errors import to_grpc_error
from cri_shim.logs import log_event

log = logging.getLogger("cri_shim.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Calls kubelet makes every second or so: logged at debug so INFO stays readable.
_QUIET = {
    "Version",
    "Status",
    "RuntimeConfig",
    "ListPodSandbox",
    "ListContainers",
    "StreamPodSandboxes",
    "StreamContainers",
    "StreamContainerStats",
    "StreamPodSandboxStats",
    "StreamPodSandboxMetrics",
    "StreamImages",
    "PodSandboxStatus",
    "ContainerStatus",
    "ContainerStats",
    "ListContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "ListPodSandboxMetrics",
    "ListMetricDescriptors",
    "ListImages",
    "ImageStatus",
    "ImageFsInfo",
}

# Where the ids live in the CRI requests, as attribute paths.
_ID_PATHS: dict[str, tuple[str, ...]] = {
    "pod": ("pod_sandbox_id",),
    "container": ("container_id",),
    "pod_name": ("config", "metadata", "name"),
    "pod_namespace": ("config", "metadata", "namespace"),
    "image": ("image", "image"),
}


def request_ids(request: Any) -> dict[str, Any]:
    """The pod/container/image identifiers found in a CRI request."""
    found: dict[str, Any] = {}
    for key, path in _ID_PATHS.items():
        value = request
        for attr in path:
            value = getattr(value, attr, None)
            if value is None:
                break
        if isinstance(value, str) and value:
            found[key] = value
    return found


class Instrumentation:
    """Shared by both CRI services; also the hook point for metrics."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.observers: list[Callable[[str, Status, float], None]] = []

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait for unary calls in flight to finish; False if some still run at timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _finish(
        self,
        rpc: str,
        request: Any,
        started: float,
        err: BaseException | None,
        response: Any = None,
    ) -> None:
        elapsed = time.perf_counter() - started
        status = Status.OK
        if err is None:
            level = logging.DEBUG if rpc in _QUIET else logging.INFO
            if log.isEnabledFor(level):  # the ids cost more than the rest of this wrapper
                # Create calls only learn their id from the response (RunPodSandbox, ...).
                ids = request_ids(response) | request_ids(request)
                log_event(
                    log, "rpc", level=level, rpc=rpc, duration_ms=round(elapsed * 1000, 3), **ids
                )
        else:
            ids = request_ids(response) | request_ids(request)
            assert isinstance(err, GRPCError)
            status = err.status
            internal = status in (Status.INTERNAL, Status.UNKNOWN)
            log_event(
                log,
                "rpc failed",
                level=logging.ERROR if internal else logging.WARNING,
                exc_info=internal,
                rpc=rpc,
                code=status.name,
                error=err.message,
                duration_ms=round(elapsed * 1000, 3),
                **ids,
            )
        for observe in self.observers:
            observe(rpc, status, elapsed)

    async def unary(
        self, rpc: str, handler: Callable[[Req], Awaitable[Resp]], request: Req
    ) -> Resp:
        started = time.perf_counter()
        self._enter()
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            log_event(log, "rpc cancelled", level=logging.INFO, rpc=rpc, **request_ids(request))
            raise
        except Exception as err:
            grpc_error = to_grpc_error(err, rpc)
            if grpc_error is not err:
                grpc_error.__cause__ = err
            self._finish(rpc, request, started, grpc_error)
            raise grpc_error from None
        finally:
            self._leave()
        self._finish(rpc, request, started, None, response)
        return response

    async def server_stream(
        self, rpc: str, handler: Callable[[Req], AsyncIterator[Resp]], request: Req
    ) -> AsyncIterator[Resp]:
        """Streams are long-lived (GetContainerEvents): not counted as in flight."""
        started = time.perf_counter()
        try:
            async for item in handler(request):
                yield item
        except asyncio.CancelledError:
            raise
        except Exception as err:
            grpc_error = to_grpc_error(err, rpc)
            self._finish(rpc, request, started, grpc_error)
            raise grpc_error from None
        self._finish(rpc, request, started, None)
