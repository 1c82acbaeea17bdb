"""Image volumes (`Mount.image`) on real containerd + runc: the image's files
are seen read-only inside the container, and its snapshot and host mount go
with the container, also when the shim was killed in between."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.container.image_volumes import resolve_in_root
from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.runtime import TaskStatus
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.gen.containerd.services.tasks import v1 as tasks_v1
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .conftest import CriClient, wait_for
from .pods import make_container, pod_config
from .support.catalog import ServedCatalog
from .test_recovery import NAMESPACE, NOTHING_LEFT, Node, leftovers, node, stop_shim

__all__ = ["node"]  # the fixture, imported for the restart test

MOUNT_AT = "/mnt/image"


def image_mount(image: str, *, readonly: bool = True, sub_path: str = "") -> cri.Mount:
    return cri.Mount(
        container_path=MOUNT_AT,
        readonly=readonly,
        image=cri.ImageSpec(image=image),
        image_sub_path=sub_path,
    )


def mounted_under(directory: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(f"{directory}/")]


async def view_snapshots(address: str, namespace: str) -> list[str]:
    client = ContainerdClient(address, namespace)
    try:
        names: list[str] = []
        async for reply in client.snapshots.list(
            snapshots_v1.ListSnapshotsRequest(snapshotter="overlayfs")
        ):
            names += [i.name for i in reply.info if i.kind == snapshots_v1.Kind.VIEW]
        return names
    finally:
        client.close()


async def run(pods: CriClient, container_id: str, *command: str) -> cri.ExecSyncResponse:
    return await pods.runtime.exec_sync(
        cri.ExecSyncRequest(container_id=container_id, cmd=list(command), timeout=30)
    )


@pytest.fixture
def volumes_dir(pod_shim: Shim) -> Path:
    manager = pod_shim.container_manager
    assert manager is not None and manager.image_volumes is not None
    return manager.image_volumes.root


async def test_image_volume_is_read_only_and_goes_with_the_container(
    pods: CriClient,
    pod: tuple[str, cri.PodSandboxConfig],
    busybox: str,
    pod_images: ServedCatalog,
    pod_shim: Shim,
    volumes_dir: Path,
) -> None:
    multilayer = pod_images.local("test/multilayer:1")
    pulled = await pods.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(multilayer)))
    container_id = await make_container(
        pods, pod, busybox, ["sleep", "3600"], mounts=[image_mount(multilayer)]
    )
    # The image's merged layers: layer 3's motd, layer 2's file, layer 3's whiteout.
    motd = await run(pods, container_id, "cat", f"{MOUNT_AT}/etc/motd")
    assert (motd.exit_code, motd.stdout) == (0, b"layer 3\n")
    executed = await run(pods, container_id, f"{MOUNT_AT}/data/exec.sh")
    assert (executed.exit_code, executed.stdout) == (0, b"layered\n")
    assert (await run(pods, container_id, "ls", f"{MOUNT_AT}/data/b")).exit_code != 0
    written = await run(pods, container_id, "touch", f"{MOUNT_AT}/data/new")
    assert written.exit_code != 0
    assert b"Read-only file system" in written.stderr

    status = (await pods.runtime.container_status(cri.ContainerStatusRequest(container_id))).status
    assert status is not None
    (shown,) = [m for m in status.mounts if m.container_path == MOUNT_AT]
    assert shown.image is not None and shown.image.image_ref == pulled.image_ref
    host_path = Path(shown.host_path)
    assert host_path.parent == volumes_dir / container_id
    assert mounted_under(volumes_dir) == [str(host_path)]
    containerd = pod_shim.settings.containerd
    assert str(host_path) in await view_snapshots(containerd.address, containerd.namespace)

    await pods.runtime.stop_container(cri.StopContainerRequest(container_id, timeout=1))
    await pods.runtime.remove_container(cri.RemoveContainerRequest(container_id))
    assert mounted_under(volumes_dir) == []
    assert not (volumes_dir / container_id).exists()
    assert str(host_path) not in await view_snapshots(containerd.address, containerd.namespace)


async def test_image_sub_path_and_refused_image_mounts(
    pods: CriClient,
    pod: tuple[str, cri.PodSandboxConfig],
    busybox: str,
    pod_images: ServedCatalog,
    volumes_dir: Path,
) -> None:
    multilayer = pod_images.local("test/multilayer:1")
    await pods.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(multilayer)))
    sub = await make_container(
        pods,
        pod,
        busybox,
        ["sleep", "3600"],
        name="sub",
        mounts=[image_mount(multilayer, sub_path="data")],
    )
    listed = await run(pods, sub, "ls", MOUNT_AT)
    assert (listed.exit_code, listed.stdout.split()) == (0, [b"a", b"c", b"exec.sh"])

    refused = [
        (image_mount(multilayer, readonly=False), Status.INVALID_ARGUMENT, "readonly must be true"),
        (image_mount(multilayer, sub_path="missing"), Status.INVALID_ARGUMENT, "does not exist"),
        (image_mount(multilayer, sub_path="etc/motd"), Status.INVALID_ARGUMENT, "not a directory"),
        (image_mount("never/pulled:1"), Status.NOT_FOUND, "pull it first"),
    ]
    for index, (mount, code, message) in enumerate(refused):
        with pytest.raises(GRPCError) as caught:
            await make_container(
                pods, pod, busybox, ["true"], name=f"bad{index}", start=False, mounts=[mount]
            )
        assert caught.value.status is code, caught.value.message
        assert "ImageVolumeMountFailed" in (caught.value.message or "")
        assert message in (caught.value.message or "")
    # Failed creates leave only the good container's volume behind.
    assert [p.name for p in volumes_dir.iterdir()] == [sub]
    await pods.runtime.remove_container(cri.RemoveContainerRequest(sub))
    assert mounted_under(volumes_dir) == []
    assert list(volumes_dir.iterdir()) == []


async def test_volumes_of_containers_gone_while_the_shim_was_down_are_released(
    node: Node, pod_images: ServedCatalog
) -> None:
    """A container with an image volume survives a SIGKILL of the shim with its
    volume; one whose record vanished meanwhile (as after a kill between the
    mount and Containers.Create) has its volume unmounted and removed."""
    image = pod_images.local("library/busybox:latest")
    volumes = node.base / "state" / "image-volumes"
    shim = await node.start_shim()
    client = CriClient.connect(node.socket)
    try:
        await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
        config = pod_config("imgvol", log_directory=str(node.base / "logs"))
        pod_id = (
            await client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
        ).pod_sandbox_id
        pod = (pod_id, config)
        kept = await make_container(
            client, pod, image, ["sleep", "3600"], name="kept", mounts=[image_mount(image)]
        )
        lost = await make_container(
            client, pod, image, ["sleep", "3600"], name="lost", mounts=[image_mount(image)]
        )
        assert len(mounted_under(volumes)) == 2
        shim.process.send_signal(signal.SIGKILL)
        await shim.process.wait()
        client.close()
        await forget_in_containerd(node, lost)

        shim = await node.start_shim()
        client = CriClient.connect(node.socket)
        assert sorted(os.listdir(volumes)) == [kept]
        assert [Path(p).parent.name for p in mounted_under(volumes)] == [kept]
        assert len(await view_snapshots(node.daemon.address, NAMESPACE)) == 1
        listed = await run(client, kept, "ls", f"{MOUNT_AT}/bin/busybox")
        assert listed.exit_code == 0

        await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))
        assert os.listdir(volumes) == []
        assert await view_snapshots(node.daemon.address, NAMESPACE) == []
        assert await leftovers(node, shim.process.pid) == NOTHING_LEFT
    finally:
        client.close()
        await stop_shim(shim)


async def forget_in_containerd(node: Node, container_id: str) -> None:
    """The container's task and record deleted behind the shim's back."""
    client = ContainerdClient(node.daemon.address, NAMESPACE)
    try:
        await client.tasks.kill(tasks_v1.KillRequest(container_id=container_id, signal=9, all=True))

        async def stopped() -> bool:
            reply = await client.tasks.get(tasks_v1.GetRequest(container_id=container_id))
            return reply.process is not None and reply.process.status == TaskStatus.STOPPED

        assert await wait_for(stopped, timeout=30)
        await client.tasks.delete(tasks_v1.DeleteTaskRequest(container_id=container_id))
        await client.containers.delete(containers_v1.DeleteContainerRequest(id=container_id))
        await client.snapshots.remove(
            snapshots_v1.RemoveSnapshotRequest(snapshotter="overlayfs", key=container_id)
        )
    finally:
        client.close()


def test_sub_path_symlinks_resolve_inside_the_image(tmp_path: Path) -> None:
    """An image's links are read as if its root were `/`: an absolute link or a
    `..` chain never reaches the host's directories."""
    root = tmp_path / "image"
    (root / "real" / "etc").mkdir(parents=True)
    (root / "etc").symlink_to("/real/etc")
    (root / "up").symlink_to("../../../..")
    (root / "loop").symlink_to("loop")
    (root / "real" / "file").write_text("x")
    assert resolve_in_root(root, "etc") == root / "real" / "etc"
    assert resolve_in_root(root, "up/real/etc") == root / "real" / "etc"
    assert resolve_in_root(root, "../../real") == root / "real"
    with pytest.raises(OSError, match="does not exist"):
        resolve_in_root(root, "up/tmp")
    with pytest.raises(OSError, match="not a directory"):
        resolve_in_root(root, "real/file")
    with pytest.raises(OSError, match="too many links"):
        resolve_in_root(root, "loop")
