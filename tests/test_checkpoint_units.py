"""Checkpoint/restore without a containerd: what `cri-shim check` says about
CRIU, the FAILED_PRECONDITION a node without working CRIU answers, and how a
checkpoint archive is read and unpacked (only regular files and directories,
nothing outside the restore directory)."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest

from cri_shim.check import Node, run_checks
from cri_shim.container.checkpoint import (
    CriuSupport,
    go_time,
    read_archive_metadata,
    restored_config,
    unpack_archive,
)
from cri_shim.container.lifecycle import ContainerManager
from cri_shim.cri.container import ContainerHandlers
from cri_shim.errors import FailedPrecondition, InvalidArgument, NotFound
from cri_shim.gen.runtime import v1 as cri
from cri_shim.images.store import ImageRecord, ImageStore
from cri_shim.settings import load
from cri_shim.store.containers import ContainerState

from .support.peers import require_peer
from .test_check import only, settings_for
from .test_lifecycle_races import World, world  # noqa: F401  (fixture)

# What Debian bookworm's CRIU 3.17.1 prints on a kernel with [vvar_vclock] (6.13+).
VDSO_FAILURE = (
    "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds\n"
    "Error (criu/kerndat.c:1615): kerndat_vdso_fill_symtable failed when initializing kerndat.\n"
)


def fake_criu(directory: Path, version: str, check_exit: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / "criu"
    binary.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then echo "Version: {version}"; exit 0; fi\n'
        f"printf '%s' '{VDSO_FAILURE}' >&2\n"
        f"exit {check_exit}\n"
    )
    binary.chmod(0o755)
    return binary


def criu_node(tmp_path: Path, bin_dirs: tuple[str, ...], checkpoint_restore: bool = True) -> Node:
    proc = tmp_path / "proc"
    (proc / "sys/kernel").mkdir(parents=True, exist_ok=True)
    if checkpoint_restore:
        (proc / "sys/kernel/ns_last_pid").write_text("1\n")
    return Node(proc=proc, cgroup_root=tmp_path, modules=tmp_path, bin_dirs=bin_dirs)


async def criu_line(tmp_path: Path, node: Node) -> str:
    results = await run_checks(settings_for(tmp_path), node=node, checks=only("criu"))
    return results[0].line


async def test_check_names_what_keeps_criu_from_working(tmp_path: Path) -> None:
    line = await criu_line(tmp_path, criu_node(tmp_path, ()))
    assert line.startswith("WARN criu: CheckpointContainer and restore are unavailable: ")
    assert "criu is not installed" in line

    broken = fake_criu(tmp_path / "old", "3.17.1", 1)
    line = await criu_line(tmp_path, criu_node(tmp_path, (str(broken.parent),)))
    assert f"`{broken} check` fails on this kernel" in line, line
    assert "Unexpected rt vDSO area bounds" in line

    ancient = fake_criu(tmp_path / "ancient", "3.15", 0)
    line = await criu_line(tmp_path, criu_node(tmp_path, (str(ancient.parent),)))
    assert "CRIU 3.16.0 or newer is needed" in line, line

    no_kernel = criu_node(tmp_path / "k", (str(ancient.parent),), checkpoint_restore=False)
    line = await criu_line(tmp_path, no_kernel)
    assert "the kernel lacks CONFIG_CHECKPOINT_RESTORE" in line, line


async def test_check_passes_with_the_criu_peer(tmp_path: Path) -> None:
    """The real CRIU build on this real kernel (the host's /proc)."""
    criu = Path(require_peer("CRIU"))
    node = Node(
        proc=Path("/proc"), cgroup_root=tmp_path, modules=tmp_path, bin_dirs=(str(criu.parent),)
    )
    line = await criu_line(tmp_path, node)
    assert line.startswith("PASS criu: 4.") and str(criu) in line, line


async def test_no_working_criu_is_a_failed_precondition(world: World, tmp_path: Path) -> None:  # noqa: F811
    world.manager.criu = CriuSupport(probe=lambda: "criu is not installed (no criu binary on PATH)")
    handlers = ContainerHandlers(
        world.containers, world.manager.sandboxes, world.manager, world.bus
    )
    container = world.created()
    container.state = ContainerState.RUNNING
    with pytest.raises(FailedPrecondition, match="criu is not installed"):
        await handlers.checkpoint_container(
            cri.CheckpointContainerRequest(container.id, location=str(tmp_path / "c.tar"))
        )
    archive = tmp_path / "checkpoint.tar"
    write_tar(archive, {"config.dump": b"{}", "spec.dump": b"{}", "status.dump": b"{}"})
    with pytest.raises(FailedPrecondition, match="checkpoint/restore is not possible"):
        await handlers.create_container(
            cri.CreateContainerRequest(
                pod_sandbox_id=world.sandbox.id,
                config=cri.ContainerConfig(
                    metadata=cri.ContainerMetadata(name="restored"),
                    image=cri.ImageSpec(image=str(archive)),
                ),
            )
        )


def write_tar(path: Path, files: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)


def test_archive_metadata_and_restored_config(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    status = {
        "metadata": {"name": "counter"},
        "image": {"image": "busybox:latest", "user_specified_image": "busybox"},
        "annotations": {"from": "checkpoint", "both": "old"},
        "state": 1,
    }
    config = {
        "id": "c1",
        "name": "n",
        "rootfsImageRef": "sha256:ab",
        "checkpointedTime": go_time(1),
    }
    write_tar(
        archive,
        {
            "config.dump": json.dumps(config).encode(),
            "spec.dump": b'{"ociVersion": "1.0.2"}',
            "status.dump": json.dumps(status).encode(),
        },
    )
    metadata = read_archive_metadata(str(archive))
    request = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="again"),
        image=cri.ImageSpec(image=str(archive)),
        annotations={"both": "new"},
    )
    restored = restored_config(request, metadata, str(archive))
    assert restored.metadata is not None and restored.metadata.name == "again"
    assert restored.image == cri.ImageSpec(image="busybox:latest", user_specified_image="busybox")
    assert restored.annotations == {
        "from": "checkpoint",
        "both": "new",
        "restored": "true",
        "checkpointedAt": "1970-01-01T00:00:00.000000001Z",
        "checkpointImage": str(archive),
    }

    broken = tmp_path / "b.tar"
    write_tar(broken, {"config.dump": b"{}"})
    with pytest.raises(InvalidArgument, match=r"lacks spec\.dump, status\.dump"):
        read_archive_metadata(str(broken))


def test_unpack_keeps_only_files_and_dirs_inside(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    link = tarfile.TarInfo("checkpoint/evil-link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    device = tarfile.TarInfo("checkpoint/null")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
    write_tar(
        archive,
        {
            "checkpoint/inventory.img": b"criu",
            "config.dump": b"{}",
            "container.log": b"log\n",
            "../escape": b"x",
        },
        (link, device),
    )
    target = tmp_path / "restore"
    unpack_archive(str(archive), target)
    found = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    assert found == ["checkpoint", "checkpoint/inventory.img", "container.log"], found
    assert not (tmp_path / "escape").exists()


async def test_criu_and_restore_can_be_switched_off(world: World, tmp_path: Path) -> None:  # noqa: F811
    """`runtime.enable_criu = false` and `runtime.restore_via_create = false`, read from
    a config file, refuse with what to change."""
    config = tmp_path / "cri-shim.toml"
    config.write_text("[runtime]\nenable_criu = false\nrestore_via_create = false\n")
    settings = load(config, environ={})
    assert not settings.runtime.enable_criu and not settings.runtime.restore_via_create
    environment = dataclasses.replace(
        world.manager.env,
        enable_criu=settings.runtime.enable_criu,
        restore_via_create=settings.runtime.restore_via_create,
    )
    manager = ContainerManager(
        world.containers, world.manager.sandboxes, ImageStore(), world.fake, world.bus, environment
    )
    assert await manager.criu.problem() == (
        "criu support is disabled by configuration (runtime.enable_criu = false)"
    )
    archive = tmp_path / "checkpoint.tar"
    write_tar(archive, {"config.dump": b"{}", "spec.dump": b"{}", "status.dump": b"{}"})
    handlers = ContainerHandlers(world.containers, world.manager.sandboxes, manager, world.bus)
    with pytest.raises(FailedPrecondition, match=r"runtime\.restore_via_create = false"):
        await handlers.create_container(
            cri.CreateContainerRequest(
                pod_sandbox_id=world.sandbox.id,
                config=cri.ContainerConfig(
                    metadata=cri.ContainerMetadata(name="restored"),
                    image=cri.ImageSpec(image=str(archive)),
                ),
            )
        )


async def test_a_missing_base_image_is_pulled_by_digest(world: World, tmp_path: Path) -> None:  # noqa: F811
    """As containerd: the image the checkpoint is based on is pulled as the
    archive records it (NAME@DIGEST) when it is not present."""
    world.manager.criu = CriuSupport(probe=lambda: None)
    asked: list[str] = []

    async def pull(ref: str) -> ImageRecord:
        asked.append(ref)
        raise NotFound(f"{ref}: not in this registry")

    world.manager.pull_image = pull
    archive = tmp_path / "checkpoint.tar"
    base = "registry.example/library/busybox@sha256:" + "a" * 64
    write_tar(
        archive,
        {
            "config.dump": json.dumps({"rootfsImageRef": base}).encode(),
            "spec.dump": b"{}",
            "status.dump": json.dumps({"image": {"image": "busybox:latest"}}).encode(),
        },
    )
    handlers = ContainerHandlers(
        world.containers, world.manager.sandboxes, world.manager, world.bus
    )
    with pytest.raises(NotFound, match="not in this registry"):
        await handlers.create_container(
            cri.CreateContainerRequest(
                pod_sandbox_id=world.sandbox.id,
                config=cri.ContainerConfig(
                    metadata=cri.ContainerMetadata(name="restored"),
                    image=cri.ImageSpec(image=str(archive)),
                ),
            )
        )
    assert asked == [base]
