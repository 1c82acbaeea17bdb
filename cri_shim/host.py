"""Facts about the node that shape what the runtime tells kubelet."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupDriver(StrEnum):
    SYSTEMD = "systemd"
    CGROUPFS = "cgroupfs"


def cgroup_v2_unified(root: Path = CGROUP_ROOT) -> bool:
    """True when /sys/fs/cgroup is a pure cgroup v2 hierarchy."""
    return (root / "cgroup.controllers").exists()


def runs_systemd() -> bool:
    return os.path.isdir("/run/systemd/system")


def detect_cgroup_driver(configured: str, root: Path = CGROUP_ROOT) -> CgroupDriver:
    """The configured driver, or for "auto" systemd only where systemd owns a v2 tree."""
    if configured != "auto":
        return CgroupDriver(configured)
    if runs_systemd() and cgroup_v2_unified(root):
        return CgroupDriver.SYSTEMD
    return CgroupDriver.CGROUPFS
