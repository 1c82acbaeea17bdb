"""CheckpointContainer and restore against a real containerd, runc and CRIU: a
counter container checkpointed while it runs, restored into a new pod, seen to
continue from the checkpointed value; the archive has the files kubelet's
checkpoint API writes; `crictl checkpoint` works; bad requests get the right
status. CRIU is the peer build (tests/peers/build.sh criu; deploy/setup-dev.sh
puts it on PATH), which the runc shim finds through containerd's PATH."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import re
import tarfile
import time
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.container.checkpoint import criu_problem
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .benchmarks.daemons import ContainerdBuild, start_runtimes
from .conftest import CriClient, short_tempdir
from .pods import make_container, pod_config
from .support.catalog import ServedCatalog
from .support.peers import require_peer
from .test_streaming_crictl import crictl

# Counts forever: each number to stdout (the CRI log) and to /count in the rootfs
# (renamed into place, so a checkpoint never catches it empty). "started" is
# printed once per fresh start, never by a restored process.
COUNTER = (
    "echo started; i=0; while true; do i=$((i+1)); echo $i;"
    " echo $i > /count.new; mv /count.new /count; sleep 0.2; done"
)
ARCHIVE_FILES = {
    "config.dump",
    "spec.dump",
    "status.dump",
    "status",
    "rootfs-diff.tar",
    "container.log",
}


def _require_criu() -> None:
    problem = criu_problem()
    assert problem is None, f"CRIU cannot run here ({problem}); run deploy/setup-dev.sh"


async def _exec_count(pods: CriClient, container_id: str) -> int:
    reply = await pods.runtime.exec_sync(
        cri.ExecSyncRequest(container_id=container_id, cmd=["cat", "/count"], timeout=60)
    )
    text = reply.stdout.decode().strip()
    return int(text) if text.isdigit() else 0


async def _wait_count(pods: CriClient, container_id: str, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = await _exec_count(pods, container_id)
        if count >= at_least:
            return count
        assert time.monotonic() < deadline, f"counter at {count}, expected {at_least}"
        await asyncio.sleep(0.2)


def _log_messages(path: Path) -> list[str]:
    """The message of each CRI log line (`<time> <stream> <tag> <message>`)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split(" ", 3)[3] for line in lines if line.count(" ") >= 3]


def _archive_count(archive: Path) -> tuple[set[str], int, dict[str, object]]:
    """(top-level names, /count in the rootfs diff, config.dump) of an archive."""
    with tarfile.open(archive) as tar:
        names = {m.name.split("/")[0] for m in tar.getmembers()}
        diff = tar.extractfile("rootfs-diff.tar")
        assert diff is not None
        config = tar.extractfile("config.dump")
        assert config is not None
        config_data = json.loads(config.read())
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(diff.read()))) as layer:
            count_file = layer.extractfile("count")
            assert count_file is not None
            count = int(count_file.read().decode().strip())
        checkpoint_images = [m.name for m in tar.getmembers() if m.name.startswith("checkpoint/")]
        assert "checkpoint/inventory.img" in checkpoint_images, checkpoint_images
    return names, count, config_data


async def _status(pods: CriClient, container_id: str) -> cri.ContainerStatus:
    status = (await pods.runtime.container_status(cri.ContainerStatusRequest(container_id))).status
    assert status is not None
    return status


async def test_checkpoint_and_restore_counter(
    pods: CriClient,
    busybox: str,
    pod: tuple[str, cri.PodSandboxConfig],
    tmp_path: Path,
) -> None:
    _require_criu()
    original = await make_container(pods, pod, busybox, ["sh", "-c", COUNTER], name="counter")
    await _wait_count(pods, original, 5, timeout=180)
    archive = tmp_path / "counter-checkpoint.tar"
    await pods.runtime.checkpoint_container(
        cri.CheckpointContainerRequest(container_id=original, location=str(archive))
    )

    names, checkpointed, config = _archive_count(archive)
    assert ARCHIVE_FILES | {"checkpoint"} <= names, names
    assert config["id"] == original and config["name"], config
    assert checkpointed >= 5
    # Left running, as containerd's CRI leaves it: it keeps counting.
    assert (await _status(pods, original)).state == cri.ContainerState.CONTAINER_RUNNING
    await _wait_count(pods, original, checkpointed + 2, timeout=120)
    await pods.runtime.stop_container(cri.StopContainerRequest(original, timeout=0))

    logs = tmp_path / "restored-logs"
    new_config = pod_config("restored", log_directory=str(logs))
    new_pod = (
        await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=new_config))
    ).pod_sandbox_id
    try:
        restored = (
            await pods.runtime.create_container(
                cri.CreateContainerRequest(
                    pod_sandbox_id=new_pod,
                    config=cri.ContainerConfig(
                        metadata=cri.ContainerMetadata(name="counter"),
                        image=cri.ImageSpec(image=str(archive)),
                        log_path="counter.log",
                    ),
                    sandbox_config=new_config,
                )
            )
        ).container_id
        created = await _status(pods, restored)
        assert created.annotations["restored"] == "true"
        assert created.image is not None and created.image.image == busybox
        # The checkpointed log is the restored container's log before it runs.
        saved = _log_messages(logs / "counter.log")
        assert saved[0] == "started"
        await pods.runtime.start_container(cri.StartContainerRequest(restored))
        assert (await _status(pods, restored)).state == cri.ContainerState.CONTAINER_RUNNING

        # The restored process goes on from the checkpointed value (a fresh start
        # would count from 1 and print "started" again).
        first = await _exec_count(pods, restored)
        assert first >= checkpointed, (first, checkpointed)
        await _wait_count(pods, restored, checkpointed + 3, timeout=120)
        log_path = logs / "counter.log"
        deadline = time.monotonic() + 120
        while len(_log_messages(log_path)) < len(saved) + 3:
            assert time.monotonic() < deadline, _log_messages(log_path)[-5:]
            await asyncio.sleep(0.2)
        new_lines = _log_messages(log_path)[len(saved) :]
        assert "started" not in new_lines, new_lines[:5]
        numbers = [int(n) for n in new_lines if re.fullmatch(r"\d+", n)]
        assert numbers[0] in (checkpointed + 1, checkpointed + 2), (numbers[:5], checkpointed)
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    finally:
        await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(new_pod))


async def test_crictl_checkpoint(
    pods: CriClient,
    pod_shim: Shim,
    busybox: str,
    pod: tuple[str, cri.PodSandboxConfig],
    tmp_path: Path,
) -> None:
    _require_criu()
    container = await make_container(pods, pod, busybox, ["sh", "-c", COUNTER], name="counter")
    await _wait_count(pods, container, 2, timeout=180)
    archive = tmp_path / "crictl.tar"
    # crictl's default 2 s deadline is shorter than a CRIU dump on a loaded node.
    code, out, err = await crictl(
        pod_shim, "--timeout=300s", "checkpoint", f"--export={archive}", container, timeout=320
    )
    assert code == 0, err.decode()
    assert container in out.decode()
    names, count, _ = _archive_count(archive)
    assert names >= ARCHIVE_FILES and count >= 2
    assert (await _status(pods, container)).state == cri.ContainerState.CONTAINER_RUNNING


async def test_checkpoint_refusals(
    pods: CriClient,
    busybox: str,
    pod: tuple[str, cri.PodSandboxConfig],
    tmp_path: Path,
) -> None:
    _require_criu()
    location = str(tmp_path / "x.tar")

    async def code(request: cri.CheckpointContainerRequest) -> tuple[Status, str]:
        with pytest.raises(GRPCError) as caught:
            await pods.runtime.checkpoint_container(request)
        return caught.value.status, caught.value.message or ""

    status, message = await code(cri.CheckpointContainerRequest("nope", location=location))
    assert status is Status.NOT_FOUND, message
    created = await make_container(
        pods, pod, busybox, ["sh", "-c", COUNTER], name="idle", start=False
    )
    status, message = await code(cri.CheckpointContainerRequest(created, location=location))
    assert status is Status.FAILED_PRECONDITION and "running" in message, message
    for bad in ("", "relative.tar", str(tmp_path / "missing-dir" / "x.tar"), str(tmp_path)):
        status, message = await code(cri.CheckpointContainerRequest(created, location=bad))
        assert status is Status.INVALID_ARGUMENT, (bad, message)
    # A file that is no checkpoint archive, given as the image of CreateContainer.
    not_archive = tmp_path / "not-a-checkpoint.tar"
    not_archive.write_bytes(b"just bytes")
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.create_container(
            cri.CreateContainerRequest(
                pod_sandbox_id=pod[0],
                config=cri.ContainerConfig(
                    metadata=cri.ContainerMetadata(name="bogus"),
                    image=cri.ImageSpec(image=str(not_archive)),
                ),
                sandbox_config=pod[1],
            )
        )
    assert caught.value.status is Status.INVALID_ARGUMENT, caught.value.message


def _archive_shape(archive: Path) -> dict[str, object]:
    """What two runtimes' archives must share: the top-level entries, the CRIU
    image kinds, and the keys of each metadata file."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()

        def keys(name: str) -> list[str]:
            handle = tar.extractfile(name)
            assert handle is not None
            return sorted(json.loads(handle.read()))

        return {
            "top": sorted({m.name.split("/")[0] for m in members}),
            "criu kinds": sorted(
                {re.sub(r"\d+", "N", m.name) for m in members if m.name.startswith("checkpoint/")}
            ),
            "config.dump": keys("config.dump"),
            "status": keys("status"),
            "status.dump": keys("status.dump"),
            "spec.dump": keys("spec.dump"),
        }


async def test_archive_has_what_containerd_2x_writes(pod_images: ServedCatalog) -> None:
    """The same counter checkpointed through containerd 2.4.2's own CRI and through
    cri-shim on the same containerd: the archives have the same entries, CRIU image
    kinds and metadata fields (what kubelet and checkpointctl read)."""
    _require_criu()
    base = short_tempdir("crishim-ckpt-")
    image = pod_images.local("library/busybox:latest")
    hosts_dir = pod_images.write_hosts_dir(base / "certs.d")
    local_host = image.split("/")[0]
    (hosts_dir / local_host).mkdir(parents=True, exist_ok=True)
    (hosts_dir / local_host / "hosts.toml").write_text(
        f'server = "http://{local_host}"\n\n'
        f'[host."http://{local_host}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    build = ContainerdBuild.find(require_peer("CONTAINERD2"))
    shapes: dict[str, dict[str, object]] = {}
    async with start_runtimes(base, [build], hosts_dir, "10.236") as runtimes:
        for name, endpoint in runtimes.endpoints.items():
            client = CriClient.connect(endpoint)
            try:
                await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image)))
                config = pod_config("shape", log_directory=str(base / "logs" / name[:9]))
                pod_id = (
                    await client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
                ).pod_sandbox_id
                try:
                    container = await make_container(
                        client, (pod_id, config), image, ["sh", "-c", COUNTER], name="counter"
                    )
                    await _wait_count(client, container, 2, timeout=180)
                    archive = base / f"{len(shapes)}.tar"
                    await client.runtime.checkpoint_container(
                        cri.CheckpointContainerRequest(container, location=str(archive)),
                        timeout=120,
                    )
                    shapes[name] = _archive_shape(archive)
                finally:
                    await client.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_id))
                    await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))
            finally:
                client.close()
    (anchor, anchor_shape), (shim, shim_shape) = shapes.items()
    assert "checkpoint/inventory.img" in anchor_shape["criu kinds"]  # type: ignore[operator]
    assert shim_shape == anchor_shape, (anchor, shim)
