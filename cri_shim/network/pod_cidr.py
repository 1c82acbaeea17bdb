"""The pod CIDR kubelet hands over through UpdateRuntimeConfig.

Kept on disk so that a restarted shim still allocates pod IPs from the right
ranges before kubelet calls again.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

from cri_shim.checkpoint import read_json, write_json


class PodCidrError(ValueError):
    pass


def parse_pod_cidrs(value: str) -> tuple[str, ...]:
    """Validate "10.0.0.0/24" or a dual-stack "10.0.0.0/24,fd00::/64"."""
    cidrs: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            cidrs.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError as err:
            raise PodCidrError(f"pod_cidr {part!r} is not a valid CIDR: {err}") from err
    return tuple(cidrs)


class PodCidrStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "pod-cidr.json"
        self.cidrs: tuple[str, ...] = ()

    async def load(self) -> None:
        stored = await asyncio.to_thread(read_json, self.path)
        if isinstance(stored, list):
            self.cidrs = tuple(str(c) for c in stored)

    async def update(self, value: str) -> bool:
        """Store new CIDRs; returns True when they changed."""
        cidrs = parse_pod_cidrs(value)
        if not cidrs or cidrs == self.cidrs:
            return False
        await asyncio.to_thread(write_json, self.path, list(cidrs))
        self.cidrs = cidrs
        return True
