"""The cgroup v2 paths as unit tests, on fake hierarchies and payloads: this
host (cgroup v1 with a controller-less cgroup2 beside it) runs no container on
v2, so these are what keeps the v2 readers, the v2 metrics mapping, the
controller probes and the driver choice honest here. Values are the kernel's
file formats (Documentation/admin-guide/cgroup-v2.rst) and runc's conversions."""

from __future__ import annotations

from pathlib import Path

import pytest

from cri_shim import host
from cri_shim.container.cgroups import oom_kills, process_cgroups, read_container_files
from cri_shim.container.metrics import (
    MetricsBuilder,
    add_v2,
    container_labels,
    container_metrics_bytes,
    pod_labels,
    pod_metrics_bytes,
)
from cri_shim.gen.io.containerd.cgroups import v2 as cgroups_v2
from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import CgroupDriver, detect_cgroup_driver
from cri_shim.oci.container_spec import hugetlb_controller_available, swap_controller_available

MIB = 1 << 20


def v2_tree(root: Path, controllers: str, files: dict[str, str], group: str = "pods/c1") -> Path:
    (root / group).mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    for name, text in files.items():
        (root / group / name).write_text(text + "\n")
    return root / group


def fake_process(proc: Path, pid: int, cgroup: str) -> None:
    """/proc/<pid> of a single-threaded process in `cgroup` (the v2 `0::` line)."""
    (proc / str(pid) / "task" / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "fd").mkdir()
    (proc / str(pid) / "fd" / "0").symlink_to("/dev/null")
    (proc / str(pid) / "cgroup").write_text(f"0::{cgroup}\n")


def test_container_files_from_a_v2_tree(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    fake_process(proc, 7, "/pods/c1")
    v2_tree(
        root,
        "cpuset cpu io memory pids",
        {
            # runc writes shares 512 as weight 1 + (512 - 2) * 9999 // 262142 = 20
            "cpu.max": "50000 100000",
            "cpu.weight": "20",
            "memory.max": str(64 * MIB),
            "memory.swap.max": str(32 * MIB),
            "pids.max": "100",
            "memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 3\noom_group_kill 0",
            "cgroup.procs": "7\n99",  # 99 has exited
        },
    )
    assert process_cgroups(7, proc) == {"": "/pods/c1"}
    files = read_container_files(7, root=root, proc=proc)
    assert files is not None
    settings = files.settings
    assert (settings.cpu_quota, settings.cpu_period) == (50_000, 100_000)
    # Weight is coarser than shares: 512 comes back within one weight step (~26 shares).
    assert abs(settings.cpu_shares - 512) <= 27
    assert settings.memory_limit == 64 * MIB
    # cAdvisor's v1 meaning on v2: memory plus swap.
    assert settings.swap_limit == 96 * MIB
    assert (settings.threads_max, settings.oom_kills) == (100, 3)
    assert (files.processes.processes, files.processes.file_descriptors) == (1, 1)
    assert oom_kills("/pods/c1", root=root) == 3


def test_container_files_from_a_v2_tree_without_limits(tmp_path: Path) -> None:
    """ "max" everywhere (no limit) reads as 0, as cAdvisor reports an unset limit."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    fake_process(proc, 8, "/pods/c2")
    v2_tree(
        root,
        "cpu memory pids",
        {
            "cpu.max": "max 100000",
            # runc's weight for the default 1024 shares: 1 + 1022 * 9999 // 262142 = 39
            "cpu.weight": "39",
            "memory.max": "max",
            "memory.swap.max": "max",
            "pids.max": "max",
            "cgroup.procs": "8",
        },
        group="pods/c2",
    )
    files = read_container_files(8, root=root, proc=proc)
    assert files is not None
    settings = files.settings
    assert (settings.cpu_quota, settings.cpu_period) == (0, 100_000)
    assert abs(settings.cpu_shares - 1024) <= 27
    assert (settings.memory_limit, settings.swap_limit, settings.threads_max) == (0, 0, 0)
    assert settings.oom_kills == 0  # no memory.events: nothing counted


def decoded(builder: MetricsBuilder) -> dict[tuple[str, ...], int]:
    """(name, extra labels...) -> value, read back through the CRI message."""
    pod = MetricsBuilder(pod_labels("p1", "ns", "pod"), 1)
    message = cri.PodSandboxMetrics().parse(
        pod_metrics_bytes("p1", pod, [container_metrics_bytes("c1", builder)])
    )
    (container,) = message.container_metrics
    base = len(container_labels("c1", "app", "img", "ns", "pod"))
    return {
        (m.name, *m.label_values[base:]): m.value.value if m.value is not None else 0
        for m in container.metrics
    }


def test_metrics_from_a_v2_payload() -> None:
    payload = cgroups_v2.Metrics(
        cpu=cgroups_v2.CpuStat(
            usage_usec=3_500_000,
            user_usec=2_000_000,
            system_usec=1_500_000,
            nr_periods=10,
            nr_throttled=4,
            throttled_usec=2_000_000,
        ),
        memory=cgroups_v2.MemoryStat(
            usage=1000,
            inactive_file=300,
            max_usage=1500,
            file=200,
            anon=600,
            file_mapped=50,
            kernel_stack=10,
            slab=20,
            swap_usage=5,
            pgfault=7,
            pgmajfault=1,
        ),
        memory_events=cgroups_v2.MemoryEvents(max=2, oom_kill=1),
        io=cgroups_v2.IoStat(
            usage=[cgroups_v2.IoEntry(major=8, minor=0, rbytes=4096, wbytes=8192, rios=1, wios=2)]
        ),
    )
    builder = MetricsBuilder(container_labels("c1", "app", "img", "ns", "pod"), 1)
    add_v2(builder, payload)
    values = decoded(builder)
    assert values[("container_cpu_usage_seconds_total",)] == 3  # whole seconds, as cAdvisor
    assert values[("container_cpu_user_seconds_total",)] == 2
    assert values[("container_cpu_system_seconds_total",)] == 1
    assert values[("container_cpu_cfs_periods_total",)] == 10
    assert values[("container_cpu_cfs_throttled_periods_total",)] == 4
    assert values[("container_cpu_cfs_throttled_seconds_total",)] == 2
    assert values[("container_memory_usage_bytes",)] == 1000
    assert values[("container_memory_working_set_bytes",)] == 700  # usage - inactive_file
    assert values[("container_memory_max_usage_bytes",)] == 1500
    assert values[("container_memory_failcnt",)] == 2  # memory.events max
    assert values[("container_memory_cache",)] == 200
    assert values[("container_memory_rss",)] == 600
    assert values[("container_memory_mapped_file",)] == 50
    assert values[("container_memory_kernel_usage",)] == 30  # kernel_stack + slab
    assert values[("container_memory_swap",)] == 5
    for scope in ("container", "hierarchy"):
        assert values[("container_memory_failures_total", "pgfault", scope)] == 7
        assert values[("container_memory_failures_total", "pgmajfault", scope)] == 1
    assert values[("container_blkio_device_usage_total", "8:0", "8", "0", "Read")] == 4096
    assert values[("container_blkio_device_usage_total", "8:0", "8", "0", "Write")] == 8192
    assert values[("container_fs_reads_bytes_total", "8:0")] == 4096
    assert values[("container_fs_writes_bytes_total", "8:0")] == 8192
    assert values[("container_fs_reads_total", "8:0")] == 1
    assert values[("container_fs_writes_total", "8:0")] == 2


def test_working_set_never_negative_on_v2() -> None:
    builder = MetricsBuilder(container_labels("c1", "app", "img", "ns", "pod"), 1)
    add_v2(builder, cgroups_v2.Metrics(memory=cgroups_v2.MemoryStat(usage=100, inactive_file=400)))
    assert decoded(builder)[("container_memory_working_set_bytes",)] == 0


def own_v2_group() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].lstrip("/")
    pytest.fail("/proc/self/cgroup has no cgroup2 (0::) line; every kernel since 4.5 writes one")


def test_swap_and_hugetlb_probes_on_v1_and_v2_trees(tmp_path: Path) -> None:
    """memsw / the hugetlb hierarchy on v1; memory.swap.max in our own group and
    hugetlb among cgroup.controllers on v2. A missing controller means limits
    are left out of the spec rather than failing every container in runc."""
    v1_with, v1_without = tmp_path / "v1-with", tmp_path / "v1-without"
    (v1_with / "memory").mkdir(parents=True)
    (v1_with / "memory" / "memory.memsw.limit_in_bytes").write_text("0\n")
    (v1_with / "hugetlb").mkdir()
    (v1_without / "memory").mkdir(parents=True)
    assert swap_controller_available(v1_with) and hugetlb_controller_available(v1_with)
    assert not swap_controller_available(v1_without)
    assert not hugetlb_controller_available(v1_without)

    v2_with, v2_without = tmp_path / "v2-with", tmp_path / "v2-without"
    own = own_v2_group()
    v2_tree(v2_with, "cpu memory hugetlb pids", {"memory.swap.max": "max"}, group=own or ".")
    v2_tree(v2_without, "cpu memory pids", {}, group=own or ".")
    assert swap_controller_available(v2_with) and hugetlb_controller_available(v2_with)
    assert not swap_controller_available(v2_without)
    assert not hugetlb_controller_available(v2_without)


@pytest.mark.parametrize(
    ("systemd", "v2", "driver"),
    [
        (True, True, CgroupDriver.SYSTEMD),
        (True, False, CgroupDriver.CGROUPFS),  # systemd on v1: kubelet's default is cgroupfs
        (False, True, CgroupDriver.CGROUPFS),
        (False, False, CgroupDriver.CGROUPFS),
    ],
)
def test_auto_cgroup_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, systemd: bool, v2: bool, driver: CgroupDriver
) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    if v2:
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
    monkeypatch.setattr(host, "runs_systemd", lambda: systemd)
    assert detect_cgroup_driver("auto", root) is driver
    # A configured driver is taken as it is, whatever the host.
    assert detect_cgroup_driver("systemd", root) is CgroupDriver.SYSTEMD
    assert detect_cgroup_driver("cgroupfs", root) is CgroupDriver.CGROUPFS
