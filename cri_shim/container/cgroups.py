"""A cgroup's own files, for what containerd has no task to ask about.

A pod's cgroup (kubelet's cgroup parent) holds the pause container and every
container of the pod, exited ones' usage included, so pod stats read it
directly, as containerd's CRI plugin does. A container's OOM-kill counter is
read here too: the TaskOOM event may arrive after the exit event. The pod's
network counters come from the pause process's /proc/<pid>/net/dev.

Everything here blocks on file reads: call it through asyncio.to_thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cri_shim.host import CGROUP_ROOT, cgroup_v2_unified

# Memory limits above this are "no limit" (the kernel rounds its maximum down to a page).
UNLIMITED_MEMORY = 1 << 62


@dataclass(frozen=True)
class CgroupSample:
    """One reading of a cgroup's usage, from containerd's metrics or from its files."""

    timestamp_ns: int
    cpu_ns: int | None = None
    memory_usage: int | None = None
    inactive_file: int = 0
    rss: int = 0
    page_faults: int = 0
    major_page_faults: int = 0
    memory_limit: int | None = None  # None: unlimited
    swap_usage: int | None = None
    swap_limit: int | None = None  # None: unlimited
    pids: int | None = None


@dataclass(frozen=True)
class InterfaceCounters:
    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


def memory_limit(value: int) -> int | None:
    return value if 0 < value <= UNLIMITED_MEMORY else None


def expand_slice(name: str) -> str:
    """systemd's slice name to its path: "a-b.slice" -> "/a.slice/a-b.slice"."""
    stem = name.removesuffix(".slice")
    if stem in ("", "-"):
        return "/"
    path, prefix = "", ""
    for part in stem.split("-"):
        prefix = f"{prefix}-{part}" if prefix else part
        path += f"/{prefix}.slice"
    return path


def relative_path(cgroup: str) -> str:
    """A cgroup's path below a hierarchy root, from any notation the runtime sees:
    runc's systemd "slice:prefix:name", a bare slice name, or a cgroupfs path."""
    if ":" in cgroup and not cgroup.startswith("/"):
        slice_name, prefix, name = cgroup.split(":", 2)
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else name
        return f"{expand_slice(slice_name or '-.slice').rstrip('/')}/{unit}"
    if not cgroup.startswith("/") and cgroup.endswith(".slice") and "/" not in cgroup:
        return expand_slice(cgroup)
    return "/" + cgroup.strip("/")


def _dir(cgroup: str, controller: str, root: Path) -> Path:
    relative = relative_path(cgroup).lstrip("/")
    if cgroup_v2_unified(root):
        return root / relative
    return root / controller / relative


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """A flat "key value" file (memory.stat, cpu.stat, memory.events, ...)."""
    values: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        key, _, value = line.partition(" ")
        try:
            values[key] = int(value)
        except ValueError:
            continue
    return values


def read_sample(cgroup: str, timestamp_ns: int, root: Path = CGROUP_ROOT) -> CgroupSample | None:
    """Usage of a cgroup from its files; None when the cgroup does not exist."""
    if cgroup_v2_unified(root):
        return _read_v2(root / relative_path(cgroup).lstrip("/"), timestamp_ns)
    memory_dir = _dir(cgroup, "memory", root)
    if not memory_dir.is_dir():
        return None
    stat = _read_keyed(memory_dir / "memory.stat")
    limit = _read_int(memory_dir / "memory.limit_in_bytes")
    return CgroupSample(
        timestamp_ns=timestamp_ns,
        cpu_ns=_read_int(_dir(cgroup, "cpuacct", root) / "cpuacct.usage"),
        memory_usage=_read_int(memory_dir / "memory.usage_in_bytes"),
        inactive_file=stat.get("total_inactive_file", 0),
        rss=stat.get("total_rss", 0),
        page_faults=stat.get("total_pgfault", 0),
        major_page_faults=stat.get("total_pgmajfault", 0),
        memory_limit=memory_limit(limit) if limit is not None else None,
        pids=_read_int(_dir(cgroup, "pids", root) / "pids.current"),
    )


def _read_v2(directory: Path, timestamp_ns: int) -> CgroupSample | None:
    if not directory.is_dir():
        return None
    cpu = _read_keyed(directory / "cpu.stat")
    stat = _read_keyed(directory / "memory.stat")
    limit = _read_int(directory / "memory.max")
    swap_limit = _read_int(directory / "memory.swap.max")
    usage_usec = cpu.get("usage_usec")
    return CgroupSample(
        timestamp_ns=timestamp_ns,
        cpu_ns=usage_usec * 1000 if usage_usec is not None else None,
        memory_usage=_read_int(directory / "memory.current"),
        inactive_file=stat.get("inactive_file", 0),
        rss=stat.get("anon", 0),
        page_faults=stat.get("pgfault", 0),
        major_page_faults=stat.get("pgmajfault", 0),
        memory_limit=memory_limit(limit) if limit is not None else None,
        swap_usage=_read_int(directory / "memory.swap.current"),
        swap_limit=memory_limit(swap_limit) if swap_limit is not None else None,
        pids=_read_int(directory / "pids.current"),
    )


def oom_kills(cgroup: str, root: Path = CGROUP_ROOT) -> int | None:
    """How many processes the kernel OOM-killed in this cgroup; None if unknown."""
    if cgroup_v2_unified(root):
        events = _read_keyed(root / relative_path(cgroup).lstrip("/") / "memory.events")
    else:
        events = _read_keyed(_dir(cgroup, "memory", root) / "memory.oom_control")
    return events.get("oom_kill")


def read_net_dev(pid: int, proc: Path = Path("/proc")) -> list[InterfaceCounters]:
    """Counters of every interface in the network namespace of process `pid`."""
    try:
        lines = (proc / str(pid) / "net" / "dev").read_text().splitlines()[2:]
    except OSError:
        return []
    found: list[InterfaceCounters] = []
    for line in lines:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 11:
            continue
        try:
            rx_bytes, rx_errors = int(fields[0]), int(fields[2])
            tx_bytes, tx_errors = int(fields[8]), int(fields[10])
        except ValueError:
            continue
        found.append(InterfaceCounters(name.strip(), rx_bytes, rx_errors, tx_bytes, tx_errors))
    return found
