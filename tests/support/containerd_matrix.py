"""The containerd versions the containerd-facing tests run against.

Debian's containerd (1.6.20 here) and the pinned 2.x peer build. Test ids name
the version (`[containerd-1.6.20]`, `[containerd-2.4.2]`), read at collection
without building anything; the 2.x binary itself is found (or built) only when
a test needs it, and its absence fails that test.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from cri_shim.containerd.version import version_field
from tests.support.peers import require_peer, versions


@dataclass(frozen=True)
class ContainerdPeer:
    version: str
    # None: the `containerd` on PATH (Debian's); else the peer variable naming the binary.
    peer: str | None = None

    def binary(self) -> str:
        if self.peer is None:
            path = shutil.which("containerd")
            if path is None:
                pytest.fail(
                    "containerd is not installed (Debian package containerd)", pytrace=False
                )
            return path
        return require_peer(self.peer)

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0]) if self.version[:1].isdigit() else 1


@functools.cache
def system_containerd_version() -> str:
    """`containerd --version` of the one on PATH, as "1.6.20" ("system" if absent)."""
    path = shutil.which("containerd")
    if path is None:
        return "system"
    try:
        output = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "system"
    version = version_field(output)
    return version.lstrip("v").split("~")[0].split("-")[0] if version else "system"


def _matrix() -> list[ContainerdPeer]:
    return [
        ContainerdPeer(system_containerd_version()),
        ContainerdPeer(versions()["CONTAINERD2_VERSION"].lstrip("v"), peer="CONTAINERD2"),
    ]


CONTAINERD_PEERS = _matrix()
CONTAINERD_MATRIX = [pytest.param(p, id=f"containerd-{p.version}") for p in CONTAINERD_PEERS]
