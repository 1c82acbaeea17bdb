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


CAP_SYS_RESOURCE = 24


def can_lower_oom_score_adj(status_path: Path = Path("/proc/self/status")) -> bool:
    """The kernel lets a process lower oom_score_adj only with CAP_SYS_RESOURCE."""
    try:
        for line in status_path.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << CAP_SYS_RESOURCE))
    except (OSError, ValueError):
        pass
    return False


def own_oom_score_adj() -> int:
    try:
        return int(Path("/proc/self/oom_score_adj").read_text().strip())
    except (OSError, ValueError):
        return 0


def clamp_oom_score_adj(requested: int, floor: int | None) -> int:
    """Hosts without CAP_SYS_RESOURCE refuse values below our own (runc then fails
    with an opaque pipe error); with a floor, never ask for less than it."""
    value = max(-1000, min(1000, requested))
    return value if floor is None else max(value, floor)


def recursive_readonly_supported() -> bool:
    """runc applies "rro" with mount_setattr, which needs Linux 5.12 or newer."""
    release = os.uname().release.split("-")[0].split(".")
    try:
        major, minor = int(release[0]), int(release[1])
    except (IndexError, ValueError):
        return False
    return (major, minor) >= (5, 12)


def running_in_user_namespace(uid_map: Path = Path("/proc/self/uid_map")) -> bool:
    """True unless this process sees the initial user namespace's full identity map
    (moby/sys/userns' test, which containerd uses to skip the ping_group_range sysctl)."""
    try:
        fields = uid_map.read_text().split()
    except OSError:
        return False
    return fields != ["0", "0", "4294967295"]
