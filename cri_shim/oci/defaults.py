"""The baseline OCI runtime spec every sandbox and container starts from.

Mirrors what containerd's CRI plugin gives a container before the CRI config
is applied, so workloads see the same /dev, /proc masking and capabilities.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

from cri_shim.oci.userns import PodUserns

# The runtime-spec version containerd 2.x writes (specs-go it vendors); runc reads any.
OCI_VERSION = "1.3.0"

DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

# containerd 2.x's default list (pkg/oci), in its order; the pause container keeps it.
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
)
CPU_SYSFS = Path("/sys/devices/system/cpu")


def _possible_cpus(cpu_sysfs: Path) -> list[int]:
    """The kernel's possible CPUs ("0-3,6"), or 0..cpu_count-1 where unreadable."""
    try:
        ranges = (cpu_sysfs / "possible").read_text().strip().split(",")
        cpus: list[int] = []
        for part in ranges:
            first, _, last = part.partition("-")
            cpus += range(int(first), int(last or first) + 1)
        return cpus
    except (OSError, ValueError):
        return list(range(os.cpu_count() or 1))


@functools.cache
def masked_paths(cpu_sysfs: Path = CPU_SYSFS) -> tuple[str, ...]:
    """MASKED_PATHS and each CPU's thermal_throttle directory that exists, as
    containerd 2.x computes them once per process."""
    throttles = (cpu_sysfs / f"cpu{cpu}" / "thermal_throttle" for cpu in _possible_cpus(cpu_sysfs))
    return MASKED_PATHS + tuple(str(path) for path in throttles if path.exists())


READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_BASE_MOUNTS: list[dict[str, Any]] = [
    {
        "destination": "/proc",
        "type": "proc",
        "source": "proc",
        "options": ["nosuid", "noexec", "nodev"],
    },
    {
        "destination": "/dev",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
    {
        "destination": "/dev/pts",
        "type": "devpts",
        "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    },
    {
        "destination": "/dev/mqueue",
        "type": "mqueue",
        "source": "mqueue",
        "options": ["nosuid", "noexec", "nodev"],
    },
    {
        "destination": "/sys",
        "type": "sysfs",
        "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", "ro"],
    },
    {
        "destination": "/sys/fs/cgroup",
        "type": "cgroup",
        "source": "cgroup",
        "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
    },
]


def base_spec() -> dict[str, Any]:
    """A fresh, mutable default spec (callers edit it in place). No rlimits: containerd's
    CRI strips the OCI default RLIMIT_NOFILE, so pause and containers inherit the shim's."""
    caps = list(DEFAULT_CAPABILITIES)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": [],
            "env": [DEFAULT_PATH_ENV],
            "cwd": "/",
            "capabilities": {
                "bounding": list(caps),
                "effective": list(caps),
                "permitted": list(caps),
            },
            "noNewPrivileges": False,
        },
        "root": {"path": "rootfs", "readonly": False},
        "mounts": copy.deepcopy(_BASE_MOUNTS),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network"},
            ],
            "maskedPaths": list(masked_paths()),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def set_namespace(spec: dict[str, Any], kind: str, path: str | None) -> None:
    """Join the namespace at `path`, or get a new one when path is None."""
    namespaces: list[dict[str, str]] = spec["linux"]["namespaces"]
    for entry in namespaces:
        if entry["type"] == kind:
            entry.pop("path", None)
            if path:
                entry["path"] = path
            return
    namespaces.append({"type": kind, "path": path} if path else {"type": kind})


def drop_namespace(spec: dict[str, Any], kind: str) -> None:
    """Share the host's namespace of this kind."""
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != kind]


def replace_mount(spec: dict[str, Any], mount: dict[str, Any]) -> None:
    """Add a mount, replacing any default one at the same destination."""
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != mount["destination"]]
    spec["mounts"].append(mount)


# /sys for a user-namespaced pod on the host network: sysfs cannot be mounted from a
# user namespace that does not own the network namespace, so the host's is bound.
SYS_BIND_MOUNT = {
    "destination": "/sys",
    "type": "bind",
    "source": "/sys",
    "options": ["rbind", "rro", "nosuid", "nodev", "noexec"],
}


def apply_userns(
    spec: dict[str, Any], userns: PodUserns | None, path: str, host_network: bool
) -> None:
    """The pod's user namespace (joined at `path`, new when empty) and its maps."""
    if userns is None:
        drop_namespace(spec, "user")
        return
    set_namespace(spec, "user", path or None)
    spec["linux"].update(userns.oci_mappings())
    if host_network:
        spec["mounts"] = [
            dict(SYS_BIND_MOUNT) if m["destination"] == "/sys" else m for m in spec["mounts"]
        ]


# runc's systemd cgroup path is slice:prefix:name; containerd's CRI uses this prefix.
SYSTEMD_SCOPE_PREFIX = "cri-containerd"


def cgroups_path(driver: str, parent: str, namespace: str, object_id: str) -> str:
    """Where runc puts the cgroup: a path for cgroupfs, slice:prefix:name for systemd.

    Without a parent, cgroupfs gets containerd's default /<containerd namespace>/<id>;
    systemd gets system.slice (containerd's default path is no valid systemd one).
    """
    if driver == "systemd":
        slice_name = parent.rsplit("/", 1)[-1] if parent else "system.slice"
        return f"{slice_name}:{SYSTEMD_SCOPE_PREFIX}:{object_id}"
    return f"{parent.rstrip('/')}/{object_id}" if parent else f"/{namespace}/{object_id}"
