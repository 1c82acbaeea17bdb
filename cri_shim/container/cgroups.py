"""A cgroup's own files, for what containerd has no task to ask about.

A pod's cgroup (kubelet's cgroup parent) holds the pause container and every
container of the pod, exited ones' usage included, so pod stats read it
directly, as containerd's CRI plugin does. A container's OOM-kill counter is
read here too: the TaskOOM event may arrive after the exit event. The pod's
network counters come from the pause process's /proc/<pid>/net/dev.

Everything here blocks on file reads: call it through asyncio.to_thread.
"""

from __future__ import annotations

import os
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
    rx_packets: int = 0
    rx_dropped: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0


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


def read_small(path: Path | str) -> str | None:
    """A small kernel file's text (cgroup, /proc); None when it cannot be read.
    Plain os calls: Path.read_text's buffered text layer cost more than the read
    itself, a few hundred times per stats round on a full node."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _read_int(path: Path) -> int | None:
    text = read_small(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """A flat "key value" file (memory.stat, cpu.stat, memory.events, ...)."""
    values: dict[str, int] = {}
    text = read_small(path)
    if text is None:
        return values
    for line in text.splitlines():
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
    text = read_small(proc / str(pid) / "net" / "dev")
    if text is None:
        return []
    lines = text.splitlines()[2:]
    found: list[InterfaceCounters] = []
    for line in lines:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 12:
            continue
        try:
            counts = [int(field) for field in fields[:12]]
        except ValueError:
            continue
        # receive: bytes packets errs drop fifo frame compressed multicast; transmit: same order
        found.append(
            InterfaceCounters(
                name.strip(),
                rx_bytes=counts[0],
                rx_errors=counts[2],
                tx_bytes=counts[8],
                tx_errors=counts[10],
                rx_packets=counts[1],
                rx_dropped=counts[3],
                tx_packets=counts[9],
                tx_dropped=counts[11],
            )
        )
    return found


# ------------------------------------------- a running container's own cgroup


@dataclass(frozen=True)
class ProcessCounts:
    """What cAdvisor counts over the processes of a container's cgroup."""

    processes: int = 0
    threads: int = 0
    file_descriptors: int = 0
    sockets: int = 0


@dataclass(frozen=True)
class CgroupSettings:
    """The limits the kernel enforces on a container's cgroup (0: no limit), and
    its OOM-kill counter, which containerd's task metrics lack on cgroup v1."""

    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit: int = 0
    swap_limit: int = 0
    threads_max: int = 0
    oom_kills: int = 0


@dataclass(frozen=True)
class ContainerFiles:
    processes: ProcessCounts
    settings: CgroupSettings


def process_cgroups(pid: int, proc: Path = Path("/proc")) -> dict[str, str]:
    """controller -> cgroup path of process `pid` ("" for the v2 hierarchy)."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def count_processes(pids: list[int], proc: Path = Path("/proc")) -> ProcessCounts:
    """Threads, open descriptors and sockets of these processes; a process that
    exits meanwhile is skipped."""
    threads = descriptors = sockets = alive = 0
    for pid in pids:
        base = proc / str(pid)
        try:
            threads += sum(1 for _ in os.scandir(base / "task"))
            with os.scandir(base / "fd") as entries:
                for entry in entries:
                    descriptors += 1
                    try:
                        if os.readlink(entry.path).startswith("socket:"):
                            sockets += 1
                    except OSError:
                        continue
        except OSError:
            continue
        alive += 1
    return ProcessCounts(alive, threads, descriptors, sockets)


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except (OSError, ValueError):
        return []


def _limit(value: int | None) -> int:
    return value if value is not None and value < UNLIMITED_MEMORY else 0


def weight_to_shares(weight: int) -> int:
    """cgroup v2 cpu.weight back to v1 shares, the inverse of runc's conversion."""
    return 2 + ((weight - 1) * 262142) // 9999 if weight > 0 else 0


def read_container_files(
    pid: int, root: Path = CGROUP_ROOT, proc: Path = Path("/proc")
) -> ContainerFiles | None:
    """Processes and limits of the cgroup that process `pid` (a container's init) is in;
    None when the process is gone."""
    paths = process_cgroups(pid, proc)
    if not paths:
        return None
    if cgroup_v2_unified(root):
        directory = root / paths.get("", "/").lstrip("/")
        quota_text = _read_text(directory / "cpu.max").split()
        v2_quota = int(quota_text[0]) if quota_text and quota_text[0].isdigit() else 0
        period = int(quota_text[1]) if len(quota_text) > 1 and quota_text[1].isdigit() else 0
        memory = _limit(_read_int(directory / "memory.max"))
        swap = _read_int(directory / "memory.swap.max")
        settings = CgroupSettings(
            cpu_period=period,
            cpu_quota=v2_quota,
            cpu_shares=weight_to_shares(_read_int(directory / "cpu.weight") or 0),
            memory_limit=memory,
            # v1's meaning (memory plus swap), as cAdvisor reports it on v2
            swap_limit=memory + swap if memory and swap is not None else 0,
            threads_max=_read_int(directory / "pids.max") or 0,
            oom_kills=_read_keyed(directory / "memory.events").get("oom_kill", 0),
        )
        pids = _read_pids(directory / "cgroup.procs")
    else:

        def directory_of(controller: str) -> Path:
            return root / controller / paths.get(controller, "/").lstrip("/")

        cpu, memory_dir = directory_of("cpu"), directory_of("memory")
        quota = _read_int(cpu / "cpu.cfs_quota_us")
        settings = CgroupSettings(
            cpu_period=_read_int(cpu / "cpu.cfs_period_us") or 0,
            cpu_quota=quota if quota is not None and quota > 0 else 0,
            cpu_shares=_read_int(cpu / "cpu.shares") or 0,
            memory_limit=_limit(_read_int(memory_dir / "memory.limit_in_bytes")),
            swap_limit=_limit(_read_int(memory_dir / "memory.memsw.limit_in_bytes")),
            threads_max=_read_int(directory_of("pids") / "pids.max") or 0,
            oom_kills=_read_keyed(memory_dir / "memory.oom_control").get("oom_kill", 0),
        )
        pids = _read_pids(directory_of("pids") / "cgroup.procs")
    return ContainerFiles(count_processes(pids, proc), settings)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
