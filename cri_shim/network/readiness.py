"""NetworkReady for Status, kept current in the background.

Status is polled by kubelet every few seconds; answering it must not touch the
disk. A small task re-reads the CNI conf dir (off the event loop) whenever its
fingerprint changes, so a config written after start is seen within a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from cri_shim.concurrency import stop_task
from cri_shim.logs import log_event
from cri_shim.network.cni_config import (
    CniConfigError,
    NetworkConfig,
    dir_signature,
    load_network_config,
)

log = logging.getLogger(__name__)

NOT_READY_REASON = "NetworkPluginNotReady"


class NetworkReadiness:
    def __init__(self, conf_dir: Path, bin_dirs: Sequence[str], interval: float = 1.0) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = tuple(bin_dirs)
        self.interval = interval
        self.config: NetworkConfig | None = None
        self.error = "cni config not loaded yet"
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.config is not None

    @property
    def message(self) -> str:
        return "" if self.ready else f"Network plugin returns error: {self.error}"

    def _reload_if_changed(self) -> bool:
        signature = dir_signature(self.conf_dir)
        if signature == self._signature and self._signature is not None:
            return False
        self._signature = signature
        try:
            self.config = load_network_config(self.conf_dir, self.bin_dirs)
            self.error = ""
        except CniConfigError as err:
            self.config = None
            self.error = str(err)
        return True

    async def refresh(self) -> None:
        was_ready = self.ready
        changed = await asyncio.to_thread(self._reload_if_changed)
        if changed and (self.ready != was_ready or self.ready):
            if self.config is not None:
                log_event(
                    log,
                    "cni config loaded",
                    network=self.config.name,
                    source=self.config.source,
                    plugins=",".join(self.config.plugin_types),
                )
            else:
                log_event(log, "cni config not usable", level=logging.WARNING, error=self.error)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # keep watching whatever the filesystem does
                log.exception("cni config refresh failed")
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="cni-config-watch")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
