"""Pod-level resources (UpdatePodSandboxResources, in-place pod resize).

kubelet resizes a pod by sending its new pod-level resources; the pod's cgroup
is its cgroup parent, which holds the pause container and every container of
the pod. The new CPU shares, quota/period and memory limit are written to that
cgroup's files (v1: cpu.shares, cpu.cfs_period_us, cpu.cfs_quota_us,
memory.limit_in_bytes; v2: cpu.weight, cpu.max, memory.max), as runc would set
them. kubelet writes the same values itself; a resize through crictl alone
takes effect too.

Everything here blocks on file writes: call it through asyncio.to_thread.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

from cri_shim.container.cgroups import relative_path
from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import CGROUP_ROOT, cgroup_v2_unified

# The kernel's bounds (kernel/sched/core.c, cgroup v1 cpu controller).
MIN_CPU_SHARES, MAX_CPU_SHARES = 2, 262144
MIN_CFS_PERIOD, MAX_CFS_PERIOD = 1000, 1_000_000
MIN_CFS_QUOTA = 1000


class PodResourcesError(ValueError):
    """The requested resources cannot be written (INVALID_ARGUMENT)."""


class PodCgroupError(OSError):
    """The pod's cgroup is missing or refuses the value (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class CgroupWrite:
    controller: str
    file: str
    value: str


def validate(resources: cri.LinuxContainerResources, field: str = "resources") -> None:
    if resources.cpu_shares and not MIN_CPU_SHARES <= resources.cpu_shares <= MAX_CPU_SHARES:
        raise PodResourcesError(
            f"{field}.cpu_shares {resources.cpu_shares} is outside "
            f"{MIN_CPU_SHARES}-{MAX_CPU_SHARES}"
        )
    if resources.cpu_period and not MIN_CFS_PERIOD <= resources.cpu_period <= MAX_CFS_PERIOD:
        raise PodResourcesError(
            f"{field}.cpu_period {resources.cpu_period} is outside "
            f"{MIN_CFS_PERIOD}-{MAX_CFS_PERIOD} microseconds"
        )
    quota = resources.cpu_quota
    if quota and quota != -1 and quota < MIN_CFS_QUOTA:
        raise PodResourcesError(
            f"{field}.cpu_quota {quota} must be -1 (no limit) or at least {MIN_CFS_QUOTA} "
            "microseconds"
        )
    if resources.memory_limit_in_bytes < 0:
        raise PodResourcesError(
            f"{field}.memory_limit_in_bytes {resources.memory_limit_in_bytes} must not be negative"
        )


def shares_to_weight(shares: int) -> int:
    """cgroup v2 cpu.weight for v1 shares (runc's ConvertCPUSharesToCgroupV2Value)."""
    return 1 + ((shares - 2) * 9999) // 262142


def cgroup_writes(resources: cri.LinuxContainerResources, v2: bool) -> list[CgroupWrite]:
    """The files to write, in order (a new period before the quota measured in it)."""
    writes: list[CgroupWrite] = []
    if v2:
        if resources.cpu_shares:
            writes.append(
                CgroupWrite("cpu", "cpu.weight", str(shares_to_weight(resources.cpu_shares)))
            )
        if resources.cpu_quota or resources.cpu_period:
            quota = "max" if resources.cpu_quota in (0, -1) else str(resources.cpu_quota)
            period = resources.cpu_period or 100_000
            writes.append(CgroupWrite("cpu", "cpu.max", f"{quota} {period}"))
        if resources.memory_limit_in_bytes:
            writes.append(CgroupWrite("memory", "memory.max", str(resources.memory_limit_in_bytes)))
        return writes
    if resources.cpu_shares:
        writes.append(CgroupWrite("cpu", "cpu.shares", str(resources.cpu_shares)))
    if resources.cpu_period:
        writes.append(CgroupWrite("cpu", "cpu.cfs_period_us", str(resources.cpu_period)))
    if resources.cpu_quota:
        writes.append(CgroupWrite("cpu", "cpu.cfs_quota_us", str(resources.cpu_quota)))
    if resources.memory_limit_in_bytes:
        writes.append(
            CgroupWrite("memory", "memory.limit_in_bytes", str(resources.memory_limit_in_bytes))
        )
    return writes


def _directory(cgroup_parent: str, controller: str, root: Path, v2: bool) -> Path:
    relative = relative_path(cgroup_parent).lstrip("/")
    return root / relative if v2 else root / controller / relative


def apply_pod_resources(
    cgroup_parent: str, resources: cri.LinuxContainerResources, root: Path = CGROUP_ROOT
) -> list[str]:
    """Write the resources into the pod's cgroup; the files written."""
    v2 = cgroup_v2_unified(root)
    writes = cgroup_writes(resources, v2)
    for controller in sorted({w.controller for w in writes}):
        directory = _directory(cgroup_parent, controller, root, v2)
        if not directory.is_dir():
            raise PodCgroupError(f"pod cgroup {directory} does not exist")
    done: list[str] = []
    pending = list(writes)
    while pending:
        write = pending.pop(0)
        path = _directory(cgroup_parent, write.controller, root, v2) / write.file
        try:
            path.write_text(write.value)
        except OSError as err:
            # A shorter period under the old quota (or the reverse) is refused until
            # the other file changes: write the quota first then, as runc does.
            quota = next((w for w in pending if w.file == "cpu.cfs_quota_us"), None)
            if err.errno == errno.EINVAL and write.file == "cpu.cfs_period_us" and quota:
                pending.remove(quota)
                pending[:0] = [quota, write]
                continue
            raise PodCgroupError(
                f"cannot write {write.value} to {path}: {err.strerror or err}"
                + (" (written before it: " + ", ".join(done) + ")" if done else "")
            ) from err
        done.append(str(path))
    return done


__all__ = [
    "PodCgroupError",
    "PodResourcesError",
    "apply_pod_resources",
    "cgroup_writes",
    "shares_to_weight",
    "validate",
]
