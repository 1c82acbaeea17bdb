"""Keeps RuntimeReady current without a containerd round-trip per Status call.

A background task asks containerd's health service every `interval` seconds.
Status reads the last answer; callbacks run when containerd comes back so that
the rest of the shim can resynchronise its view.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cri_shim.concurrency import stop_task
from cri_shim.containerd.client import ContainerdClient, ContainerdVersion
from cri_shim.errors import ContainerdError, ContainerdUnavailable
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

Reconnected = Callable[[], Awaitable[None]]


class ContainerdHealth:
    def __init__(self, client: ContainerdClient, interval: float = 1.0) -> None:
        self.client = client
        self.interval = interval
        self.serving = False
        self.version: ContainerdVersion | None = None
        self.last_error = "containerd not checked yet"
        self._on_reconnect: list[Reconnected] = []
        self._task: asyncio.Task[None] | None = None

    def on_reconnect(self, callback: Reconnected) -> None:
        self._on_reconnect.append(callback)

    async def check(self) -> bool:
        """Ask containerd once and record the result; returns whether it serves."""
        was_serving = self.serving
        serving = await self.client.is_serving(timeout=max(self.interval, 1.0))
        if serving and self.version is None:
            try:
                self.version = await self.client.server_version(timeout=self.interval + 1.0)
            except (TimeoutError, ContainerdError, ContainerdUnavailable):
                serving = False
        self.serving = serving
        if serving:
            self.last_error = ""
        else:
            self.last_error = f"containerd is not serving at {self.client.address}"
        if serving != was_serving:
            log_event(
                log,
                "containerd is serving" if serving else "containerd is not serving",
                level=logging.INFO if serving else logging.WARNING,
                address=self.client.address,
                version=self.version.version if self.version else None,
            )
            if serving:
                for callback in self._on_reconnect:
                    await callback()
        return serving

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:
                log.exception("containerd health check failed")

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.create_task(self._run(), name="containerd-health")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
