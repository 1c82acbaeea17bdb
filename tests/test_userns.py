"""Pods in their own user namespace (`hostUsers: false`) on real containerd and
the peer runc (1.2+), through the runtime handler the pod shim configures for it.

What is checked on the host, not only inside: the container's processes run as
the mapped host ids, the rootfs is owned by the pod's mapped root, the pod's
network namespace is owned by its user namespace (sysfs mounts, net sysctls),
an id-mapped volume writes files as the host's ids, and invalid options are
refused as containerd 2.x refuses them.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import tempfile
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.gen.runtime import v1 as cri

from .conftest import CriClient
from .pods import USERNS_HANDLER, make_container, pod_config, wait_exited

SIZE = 65536
NS_GET_USERNS = 0xB701  # <linux/nsfs.h>


def userns_options(
    host_id: int, mode: cri.NamespaceMode = cri.NamespaceMode.POD
) -> cri.NamespaceOption:
    line = [cri.IdMapping(container_id=0, host_id=host_id, length=SIZE)]
    return cri.NamespaceOption(userns_options=cri.UserNamespace(mode=mode, uids=line, gids=line))


def userns_pod(name: str, options: cri.NamespaceOption, log_dir: Path) -> cri.PodSandboxConfig:
    return pod_config(
        name,
        log_directory=str(log_dir),
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=options)
        ),
    )


async def run_pod(
    pods: CriClient, config: cri.PodSandboxConfig, handler: str = USERNS_HANDLER
) -> str:
    reply = await pods.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=config, runtime_handler=handler)
    )
    return reply.pod_sandbox_id


async def output_of(pods: CriClient, container_id: str) -> str:
    status = await wait_exited(pods, container_id, timeout=30)
    assert status.exit_code == 0, Path(status.log_path).read_text()
    lines = Path(status.log_path).read_text().splitlines()
    return "\n".join(line.split(" ", 3)[3] for line in lines)


def host_ids(pid: int) -> tuple[int, int]:
    """Real uid and gid of a host process, from /proc/<pid>/status."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def owning_userns_inode(namespace: str) -> int:
    """Inode of the user namespace that owns `namespace` (ioctl NS_GET_USERNS)."""
    fd = os.open(namespace, os.O_RDONLY | os.O_CLOEXEC)
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
        try:
            return os.fstat(owner).st_ino
        finally:
            os.close(owner)
    finally:
        os.close(fd)


async def test_status_reports_user_namespaces_for_the_capable_handler_only(
    pods: CriClient,
) -> None:
    reply = await pods.runtime.status(cri.StatusRequest())
    userns = {
        h.name: h.features is not None and h.features.user_namespaces
        for h in reply.runtime_handlers
    }
    # Debian's runc 1.1.5 (the default handler here) cannot id-map mounts.
    assert userns == {"": False, "runc": False, USERNS_HANDLER: True}


async def test_pod_user_namespace_maps_processes_rootfs_and_volumes(
    pods: CriClient, busybox: str, tmp_path: Path
) -> None:
    host_id = random.randrange(1, 200) * SIZE
    options = userns_options(host_id)
    config = userns_pod("userns", options, tmp_path / "logs")
    sandbox_id = await run_pod(pods, config)
    volume = Path(tempfile.mkdtemp(prefix="userns-vol-", dir="/tmp"))
    try:
        mapping = [cri.IdMapping(container_id=0, host_id=host_id, length=SIZE)]
        container = cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(namespace_options=options)
        )
        reader = await make_container(
            pods,
            (sandbox_id, config),
            busybox,
            [
                "sh",
                "-c",
                "cat /proc/self/uid_map /proc/self/gid_map; stat -c 'root %u:%g' /; "
                "stat -c 'busybox %u:%g' /bin/busybox; grep -c ' /sys sysfs ' /proc/mounts; "
                "touch /data/made-inside && stat -c 'volume %u:%g' /data/made-inside; "
                "head -1 /etc/hosts >/dev/null && echo hosts ok",
            ],
            name="reader",
            linux=container,
            mounts=[
                cri.Mount(
                    container_path="/data",
                    host_path=str(volume),
                    uid_mappings=mapping,
                    gid_mappings=mapping,
                )
            ],
        )
        output = await output_of(pods, reader)
        line = f"0 {host_id} {SIZE}"
        assert [" ".join(x.split()) for x in output.splitlines()[:2]] == [line, line]
        assert "root 0:0" in output  # the rootfs belongs to the pod's root
        assert "busybox 0:0" in output
        assert output.splitlines()[4] == "1"  # sysfs mounted: the netns is the pod's own
        assert "volume 0:0" in output and "hosts ok" in output
        # The id-mapped volume stored the file as host root, not as the mapped id.
        made = (volume / "made-inside").stat()
        assert (made.st_uid, made.st_gid) == (0, 0)

        sleeper = await make_container(
            pods, (sandbox_id, config), busybox, ["sleep", "3600"], name="sleeper", linux=container
        )
        status = await pods.runtime.container_status(
            cri.ContainerStatusRequest(sleeper, verbose=True)
        )
        pid = int(json.loads(status.info["info"])["pid"])
        assert host_ids(pid) == (host_id, host_id)
        pause = await pods.runtime.pod_sandbox_status(
            cri.PodSandboxStatusRequest(sandbox_id, verbose=True)
        )
        pause_pid = int(json.loads(pause.info["info"])["pid"])
        assert os.readlink(f"/proc/{pid}/ns/user") == os.readlink(f"/proc/{pause_pid}/ns/user")
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        # The pod's network namespace belongs to its user namespace (containerd 2.x's
        # setupNetnsWithinUserns): root in the pod may mount sysfs and set net sysctls.
        assert owning_userns_inode(f"/proc/{pid}/ns/net") == os.stat(f"/proc/{pid}/ns/user").st_ino
    finally:
        await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(sandbox_id))
        for child in volume.iterdir():
            child.unlink()
        volume.rmdir()


async def test_node_mode_keeps_the_hosts_user_namespace(
    pods: CriClient, busybox: str, tmp_path: Path
) -> None:
    options = cri.NamespaceOption(userns_options=cri.UserNamespace(mode=cri.NamespaceMode.NODE))
    config = userns_pod("userns-node", options, tmp_path / "logs")
    sandbox_id = await run_pod(pods, config)
    container = cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(namespace_options=options)
    )
    reader = await make_container(
        pods, (sandbox_id, config), busybox, ["cat", "/proc/self/uid_map"], linux=container
    )
    output = await output_of(pods, reader)
    host = Path("/proc/self/uid_map").read_text()
    assert output.split() == host.split()


@pytest.mark.parametrize(
    ("userns", "message"),
    [
        (
            cri.UserNamespace(
                mode=cri.NamespaceMode.POD,
                uids=[
                    cri.IdMapping(container_id=0, host_id=1000, length=SIZE),
                    cri.IdMapping(container_id=0, host_id=2000, length=SIZE),
                ],
                gids=[cri.IdMapping(container_id=0, host_id=1000, length=SIZE)],
            ),
            "only one mapping line is supported, got 2",
        ),
        (
            cri.UserNamespace(
                mode=cri.NamespaceMode.POD,
                uids=[cri.IdMapping(container_id=1, host_id=1000, length=SIZE)],
                gids=[cri.IdMapping(container_id=1, host_id=1000, length=SIZE)],
            ),
            "container id 0 must be mapped",
        ),
        (cri.UserNamespace(mode=cri.NamespaceMode.CONTAINER), "mode CONTAINER is not supported"),
        (cri.UserNamespace(mode=cri.NamespaceMode.TARGET), "mode TARGET is not supported"),
    ],
)
async def test_invalid_user_namespaces_are_refused(
    pods: CriClient, tmp_path: Path, userns: cri.UserNamespace, message: str
) -> None:
    config = userns_pod("userns-bad", cri.NamespaceOption(userns_options=userns), tmp_path)
    with pytest.raises(GRPCError) as caught:
        await run_pod(pods, config)
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert message in str(caught.value.message)
    listed = await pods.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
    assert not listed.items


async def test_a_handler_without_idmap_support_refuses_a_user_namespace(
    pods: CriClient, tmp_path: Path
) -> None:
    config = userns_pod("userns-old-runc", userns_options(SIZE), tmp_path)
    with pytest.raises(GRPCError) as caught:
        await run_pod(pods, config, handler="runc")
    assert caught.value.status is Status.FAILED_PRECONDITION
    assert "cannot make id-mapped mounts" in str(caught.value.message)
    assert USERNS_HANDLER in str(caught.value.message)
