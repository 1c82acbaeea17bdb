"""The ADD results kept for DEL, one JSON file per (network, sandbox, interface),
like libcni's /var/lib/cni/results."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cri_shim.checkpoint import read_json, write_json
from cri_shim.logs import log_event
from cri_shim.network.cni_runner import (
    NetworkChain,
)
from cri_shim.network.cni_types import (
    CACHE_FORMAT,
    CACHE_KIND,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------
# The result cache


@dataclass(frozen=True)
class CachedAttachment:
    chain: NetworkChain
    container_id: str
    ifname: str
    netns: str
    cni_args: tuple[tuple[str, str], ...]
    capability_args: dict[str, Any]
    result: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": CACHE_KIND,
            "format": CACHE_FORMAT,
            "network": self.chain.to_json(),
            "containerId": self.container_id,
            "ifName": self.ifname,
            "netns": self.netns,
            "cniArgs": [list(pair) for pair in self.cni_args],
            "capabilityArgs": self.capability_args,
            "result": self.result,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CachedAttachment:
        if data.get("kind") != CACHE_KIND:
            raise ValueError(f"not a {CACHE_KIND} record")
        return cls(
            chain=NetworkChain.from_json(data["network"]),
            container_id=str(data["containerId"]),
            ifname=str(data["ifName"]),
            netns=str(data.get("netns", "")),
            cni_args=tuple((str(k), str(v)) for k, v in data.get("cniArgs", [])),
            capability_args=dict(data.get("capabilityArgs", {})),
            result=dict(data["result"]),
        )


class ResultCache:
    """One JSON file per attachment: `<network>-<container id>-<ifname>.json`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, network: str, container_id: str, ifname: str) -> Path:
        return self.directory / f"{network}-{container_id}-{ifname}.json"

    async def save(self, record: CachedAttachment) -> None:
        path = self.path(record.chain.name, record.container_id, record.ifname)
        await asyncio.to_thread(write_json, path, record.to_json())

    def _read_sync(self, suffix: str, *, warn: bool) -> list[tuple[Path, CachedAttachment]]:
        """Entries whose file name ends with `suffix`; unreadable ones skipped
        (with a warning where they should have been ours)."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(suffix))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            path = self.directory / name
            try:
                data = read_json(path)
                if data is not None:
                    found.append((path, CachedAttachment.from_json(data)))
            except (OSError, ValueError, KeyError, TypeError) as err:
                if warn:
                    log_event(
                        log,
                        "unreadable cni cache entry ignored",
                        level=logging.WARNING,
                        path=path,
                        error=str(err),
                    )
        return found

    def _load_sync(self, container_id: str, ifname: str) -> list[tuple[Path, CachedAttachment]]:
        entries = self._read_sync(f"-{container_id}-{ifname}.json", warn=True)
        return [
            (path, record)
            for path, record in entries
            if record.container_id == container_id and record.ifname == ifname
        ]

    async def load(self, container_id: str, ifname: str) -> list[tuple[Path, CachedAttachment]]:
        return await asyncio.to_thread(self._load_sync, container_id, ifname)

    async def remove(self, path: Path) -> None:
        await asyncio.to_thread(path.unlink, missing_ok=True)

    def _all_sync(self) -> list[tuple[Path, CachedAttachment]]:
        # Not ours (a shared dir) or unreadable: left alone, quietly.
        return self._read_sync(".json", warn=False)

    async def all(self) -> list[tuple[Path, CachedAttachment]]:
        """Every record of ours in the directory."""
        return await asyncio.to_thread(self._all_sync)


@dataclass
class SweepReport:
    """What a start-up sweep released (for the log and the tests)."""

    cached: int = 0
    pending: int = 0
    pins: int = 0
