"""Linux capability names, and which ones this host can hand out.

"ALL" in a CRI capability list and privileged containers mean every
capability we hold ourselves (containerd uses its own effective set too):
asking runc for one the runtime lacks makes the container fail to start.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from cri_shim.oci.errors import SpecError

# Index = capability number (linux/capability.h).
CAPABILITY_NAMES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)


def normalize(name: str) -> str:
    """CRI names come as "NET_ADMIN" (kubelet) or "CAP_NET_ADMIN" (crictl users)."""
    upper = name.strip().upper()
    if not upper:
        raise SpecError("capability names must not be empty")
    return upper if upper.startswith("CAP_") else "CAP_" + upper


def last_cap(path: Path = Path("/proc/sys/kernel/cap_last_cap")) -> int:
    """Highest capability number this kernel knows."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return len(CAPABILITY_NAMES) - 1


def from_bitmap(bits: int, highest: int) -> tuple[str, ...]:
    """Names of the known capabilities set in a /proc/<pid>/status Cap* mask."""
    top = min(highest, len(CAPABILITY_NAMES) - 1)
    return tuple(CAPABILITY_NAMES[i] for i in range(top + 1) if bits & (1 << i))


@lru_cache(maxsize=1)
def current_capabilities() -> tuple[str, ...]:
    """Our own effective set: what a privileged container or "ALL" can get here."""
    highest = last_cap()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return from_bitmap(int(line.split()[1], 16), highest)
    except (OSError, ValueError, IndexError):
        pass
    return CAPABILITY_NAMES[: highest + 1]


def dedupe(names: Iterable[str]) -> list[str]:
    """First occurrence wins, order kept (cap lists are compared as lists in tests)."""
    return list(dict.fromkeys(names))
