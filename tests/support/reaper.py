"""Teardown safety net for the tests' private containerds.

Stopping a containerd leaves its runc shims and their containers running, as
it should on a node. A test that fails half-way would leave them on the
machine for good (seen: 170 shims of failed recovery runs slowing every later
test), so a private containerd's fixture reaps what its address still owns:
the shims' children (each container's init: killing it ends its pid
namespace), the shims, then every mount left below the test's directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

SHIM = b"containerd-shim-runc-v2"


def _processes() -> tuple[dict[int, list[bytes]], dict[int, int]]:
    commands: dict[int, list[bytes]] = {}
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
    return commands, parents


def shims_of(base: Path) -> list[int]:
    """Runc shims serving a containerd whose socket lies below `base`."""
    prefix = str(base).encode()
    commands, _ = _processes()
    found = []
    for pid, argv in commands.items():
        is_shim = bool(argv) and argv[0].endswith(SHIM) and b"-address" in argv[:-1]
        if is_shim and argv[argv.index(b"-address") + 1].startswith(prefix):
            found.append(pid)
    return found


def reap(base: Path) -> int:
    """Kill what containerds below `base` left running and unmount below it;
    returns how many processes were killed."""
    shims = set(shims_of(base))
    _, parents = _processes()
    victims = [pid for pid, parent in parents.items() if parent in shims] + list(shims)
    killed = 0
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    for mountpoint in mounts_below(base):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
    return killed


def mounts_below(base: Path) -> list[str]:
    """Mount points under `base`, deepest first."""
    prefix = str(base).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    return sorted(set(points), key=len, reverse=True)
