"""UpdatePodSandboxResources (in-place pod resize) on real containerd + runc:
the new pod-level resources land in the pod's cgroup files and on its record."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.containerd.runtime import unpack_json
from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import CGROUP_ROOT, cgroup_v2_unified
from cri_shim.sandbox.lifecycle import METADATA_EXTENSION
from cri_shim.server import Shim

from .conftest import CriClient
from .pods import make_container, pod_config

MiB = 1024 * 1024


def cgroup_file(parent: str, controller: str, name: str) -> str:
    if cgroup_v2_unified(CGROUP_ROOT):
        return (CGROUP_ROOT / parent.lstrip("/") / name).read_text().strip()
    return (CGROUP_ROOT / controller / parent.lstrip("/") / name).read_text().strip()


def remove_cgroup(parent: str) -> None:
    roots = [CGROUP_ROOT] if cgroup_v2_unified(CGROUP_ROOT) else list(CGROUP_ROOT.iterdir())
    for root in roots:
        for path in (root / parent.lstrip("/"), (root / parent.lstrip("/")).parent):
            if path.is_dir() and path != root:
                path.rmdir()


async def test_resize_a_running_pod_writes_its_cgroup_and_record(
    pods: CriClient, pod_shim: Shim, busybox: str, tmp_path: Path
) -> None:
    parent = f"/crishim-resize-{random.randrange(1 << 30)}/pod-a"
    config = pod_config(
        "resize",
        log_directory=str(tmp_path),
        linux=cri.LinuxPodSandboxConfig(cgroup_parent=parent),
    )
    sandbox_id = (
        await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    ).pod_sandbox_id
    try:
        await make_container(pods, (sandbox_id, config), busybox, ["sleep", "3600"])
        v2 = cgroup_v2_unified(CGROUP_ROOT)
        for quota, memory in ((50_000, 256 * MiB), (150_000, 128 * MiB)):
            resources = cri.LinuxContainerResources(
                cpu_shares=512,
                cpu_period=100_000,
                cpu_quota=quota,
                memory_limit_in_bytes=memory,
            )
            await pods.runtime.update_pod_sandbox_resources(
                cri.UpdatePodSandboxResourcesRequest(
                    pod_sandbox_id=sandbox_id,
                    overhead=cri.LinuxContainerResources(cpu_shares=10),
                    resources=resources,
                )
            )
            if v2:
                assert cgroup_file(parent, "cpu", "cpu.max") == f"{quota} 100000"
                assert cgroup_file(parent, "memory", "memory.max") == str(memory)
            else:
                assert cgroup_file(parent, "cpu", "cpu.shares") == "512"
                assert cgroup_file(parent, "cpu", "cpu.cfs_period_us") == "100000"
                assert cgroup_file(parent, "cpu", "cpu.cfs_quota_us") == str(quota)
                assert cgroup_file(parent, "memory", "memory.limit_in_bytes") == str(memory)

        # Recorded on the containerd record, so a restarted shim still knows them.
        assert pod_shim.sandbox_manager is not None
        record = await pod_shim.sandbox_manager.ops.get_container(sandbox_id)
        assert record is not None
        recorded = unpack_json(record.extensions[METADATA_EXTENSION])["updatedResources"]
        assert recorded["resources"]["cpuQuota"] == "150000"
        assert recorded["overhead"]["cpuShares"] == "10"
        assert recorded["resources"]["memoryLimitInBytes"] == str(128 * MiB)
    finally:
        await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(sandbox_id))
        remove_cgroup(parent)


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (cri.LinuxContainerResources(cpu_period=10), "cpu_period 10 is outside"),
        (cri.LinuxContainerResources(cpu_quota=5), "cpu_quota 5 must be -1"),
        (cri.LinuxContainerResources(cpu_shares=1), "cpu_shares 1 is outside"),
        (cri.LinuxContainerResources(memory_limit_in_bytes=-1), "must not be negative"),
    ],
)
async def test_invalid_pod_resources_are_refused(
    pods: CriClient,
    pod: tuple[str, cri.PodSandboxConfig],
    resources: cri.LinuxContainerResources,
    message: str,
) -> None:
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.update_pod_sandbox_resources(
            cri.UpdatePodSandboxResourcesRequest(pod_sandbox_id=pod[0], resources=resources)
        )
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert message in str(caught.value.message)


async def test_resizing_an_unknown_pod_is_not_found(pods: CriClient) -> None:
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.update_pod_sandbox_resources(
            cri.UpdatePodSandboxResourcesRequest(
                pod_sandbox_id="f" * 64, resources=cri.LinuxContainerResources(cpu_shares=512)
            )
        )
    assert caught.value.status is Status.NOT_FOUND
