"""CheckpointContainer and restore from a checkpoint archive, as containerd's CRI.

The archive is what kubelet's checkpoint API and containerd write: a plain tar
of `checkpoint/` (CRIU's images), `config.dump` (checkpointctl's
ContainerConfig), `spec.dump` (the OCI spec), `status.dump` (the CRI
ContainerStatus), `status` (the runtime's status record), `rootfs-diff.tar`
(the writable layer) and `container.log`. Restore is CreateContainer with that
archive's path as the image (containerd 2.0-2.3 and CRI-O): the container is
created on the checkpoint's base image, and StartContainer restores the task.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from betterproto2 import Casing, OutputFormat

from cri_shim.errors import failed_precondition, invalid_argument
from cri_shim.gen.runtime import v1 as cri

CHECKPOINT_DIRECTORY = "checkpoint"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
STATUS_DUMP = "status.dump"
STATUS_FILE = "status"
ROOTFS_DIFF = "rootfs-diff.tar"
CONTAINER_LOG = "container.log"
# Where an archive is unpacked for StartContainer (containerd's checkpointRestoreDir).
RESTORE_DIR = "ctrd-restore"
# go-criu's PodCriuVersion: what containerd requires.
MIN_CRIU_VERSION = (3, 16, 0)
METADATA_MAX_BYTES = 16 << 20
CRIU_PROBE_TIMEOUT = 30.0
# Where criu usually lives beyond PATH (sudo and service managers drop sbin dirs).
CRIU_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class CriuSupport:
    """Can CRIU run here? Asked before every checkpoint and restore; a success is
    kept (containerd keeps either answer; a fixed host then needs no restart)."""

    def __init__(self, probe: Callable[[], str | None] | None = None) -> None:
        self._probe = probe or criu_problem
        self._ok = False
        self._lock = asyncio.Lock()

    async def require(self) -> None:
        problem = await self.problem()
        if problem is not None:
            raise failed_precondition(f"checkpoint/restore is not possible on this node: {problem}")

    async def problem(self) -> str | None:
        async with self._lock:
            if self._ok:
                return None
            problem = await asyncio.to_thread(self._probe)
            self._ok = problem is None
            return problem


def find_criu(dirs: tuple[str, ...] | None = None) -> str | None:
    """`criu` on PATH (the runc shim finds it through containerd's PATH), else in
    the usual sbin directories; with `dirs`, only there."""
    search = (
        dirs if dirs is not None else (*os.environ.get("PATH", "").split(os.pathsep), *CRIU_DIRS)
    )
    return shutil.which("criu", path=os.pathsep.join(d for d in search if d))


def criu_problem(
    criu: str | None = None, proc: Path = Path("/proc"), *, search: bool = True
) -> str | None:
    """What keeps CRIU (`criu`, else the one found when `search`) from working
    here, or None. Blocking: run in a thread."""
    if not (proc / "sys/kernel/ns_last_pid").exists():
        return (
            f"the kernel lacks CONFIG_CHECKPOINT_RESTORE ({proc}/sys/kernel/ns_last_pid is missing)"
        )
    if criu is None and search:
        criu = find_criu()
    if criu is None:
        return "criu is not installed (no criu binary on PATH)"
    try:
        version = subprocess.run(
            [criu, "--version"], capture_output=True, text=True, timeout=CRIU_PROBE_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{criu} --version failed: {err}"
    found = parse_criu_version(version.stdout)
    if found is None:
        return f"{criu} --version printed no version: {version.stdout.strip()!r}"
    if found < MIN_CRIU_VERSION:
        need = ".".join(map(str, MIN_CRIU_VERSION))
        return f"CRIU {need} or newer is needed, {criu} is {'.'.join(map(str, found))}"
    try:
        check = subprocess.run(
            [criu, "check"], capture_output=True, text=True, timeout=CRIU_PROBE_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{criu} check failed: {err}"
    if check.returncode != 0:
        errors = [line for line in check.stderr.splitlines() if "Error" in line]
        detail = "; ".join(errors[:3]) or check.stderr.strip()[-300:]
        return f"`{criu} check` fails on this kernel: {detail}"
    return None


def parse_criu_version(text: str) -> tuple[int, int, int] | None:
    match = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return (int(match[1]), int(match[2]), int(match[3] or 0))


# checkpoint: the archive's metadata files


def go_time(moment_ns: int) -> str:
    """A Go time.Time as encoding/json writes it (RFC 3339 with nanoseconds, UTC)."""
    if moment_ns <= 0:
        return "0001-01-01T00:00:00Z"
    seconds, nanos = divmod(moment_ns, 1_000_000_000)
    stamp = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f".{nanos:09d}".rstrip("0").rstrip(".")
    return f"{stamp}{fraction}Z"


def config_dump(
    *,
    container_id: str,
    name: str,
    image: str,
    image_ref: str,
    runtime: str,
    created_at: int,
    checkpointed_at: int,
) -> dict[str, Any]:
    """checkpointctl's ContainerConfig, with containerd's choice of fields."""
    return {
        "id": container_id,
        "name": name,
        "rootfsImage": image,
        "rootfsImageRef": image_ref,
        "rootfsImageName": image,
        "runtime": runtime,
        "createdTime": go_time(created_at),
        "checkpointedTime": go_time(checkpointed_at),
        "restoredTime": go_time(0),
        "restored": False,
    }


def status_dump(status: cri.ContainerStatus) -> dict[str, Any]:
    """The CRI ContainerStatus as Go's encoding/json writes the generated struct
    (proto field names, enums as numbers, empty fields left out)."""
    data: dict[str, Any] = json.loads(
        json.dumps(
            status.to_dict(casing=Casing.SNAKE, output_format=OutputFormat.PYTHON),
            default=str,
        )
    )
    return data


def runtime_status_file(container_pid: int, created_at: int, started_at: int) -> dict[str, Any]:
    """containerd's container `status` record (versionedStatus), which checkpointctl reads."""
    return {
        "Version": "v1",
        "Pid": container_pid,
        "CreatedAt": created_at,
        "StartedAt": started_at,
        "FinishedAt": 0,
        "ExitCode": 0,
        "Reason": "",
        "Message": "",
        "Resources": None,
    }


def extract_criu_tar(tar_path: Path, destination: Path) -> None:
    """containerd's writeCriuCheckpointData: CRIU's image files, flat, no `..`."""
    destination.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tarfile.open(tar_path) as archive:
        for member in archive:
            if ".." in member.name:
                raise ValueError("found illegal string '..' in checkpoint archive")
            if not member.isfile():
                continue
            source = archive.extractfile(member)
            if source is None:
                continue
            target = destination / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with source, target.open("wb") as out:
                shutil.copyfileobj(source, out)


def write_archive(source_dir: Path, location: str) -> None:
    """The whole directory as an uncompressed tar at `location` (0600), entries
    relative to it, as containerd's archive.Diff("", dir) writes them."""
    fd = os.open(location, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w") as archive:
        for path in sorted(source_dir.rglob("*")):
            archive.add(path, arcname=str(path.relative_to(source_dir)), recursive=False)


def check_location(location: str) -> None:
    if not location:
        raise invalid_argument("location must be set: the path of the checkpoint archive")
    if "\x00" in location:
        raise invalid_argument("location must not contain a NUL byte")
    if not os.path.isabs(location):
        raise invalid_argument(f"location {location!r} must be an absolute path")
    parent = os.path.dirname(location)
    if not os.path.isdir(parent):
        raise invalid_argument(f"location {location!r}: directory {parent} does not exist")
    if os.path.isdir(location):
        raise invalid_argument(f"location {location!r} is a directory, not an archive path")


# restore


@dataclass(frozen=True)
class ArchiveMetadata:
    config: dict[str, Any]
    spec: dict[str, Any]
    status: dict[str, Any]


def is_checkpoint_archive(image: str) -> bool:
    """containerd's test: the image names an existing file (a checkpoint archive)."""
    return os.path.isabs(image) and os.path.isfile(image)


def _member_allowed(member: tarfile.TarInfo) -> bool:
    """Only what checkpoint code writes: regular files and directories."""
    return member.isfile() or member.isdir()


def read_archive_metadata(path: str) -> ArchiveMetadata:
    """config.dump, spec.dump and status.dump of an archive (blocking)."""
    wanted = {CONFIG_DUMP, SPEC_DUMP, STATUS_DUMP}
    found: dict[str, Any] = {}
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                name = os.path.normpath(member.name)
                if name not in wanted or not member.isfile():
                    continue
                if member.size > METADATA_MAX_BYTES:
                    raise invalid_argument(f"{name} in {path} is larger than {METADATA_MAX_BYTES}")
                handle = archive.extractfile(member)
                if handle is not None:
                    found[name] = json.loads(handle.read())
    except (tarfile.TarError, OSError, ValueError) as err:
        raise invalid_argument(f"{path} is not a readable checkpoint archive: {err}") from err
    missing = sorted(wanted - found.keys())
    if missing:
        raise invalid_argument(f"{path} is not a checkpoint archive: it lacks {', '.join(missing)}")
    return ArchiveMetadata(found[CONFIG_DUMP], found[SPEC_DUMP], found[STATUS_DUMP])


def unpack_archive(path: str, destination: Path) -> None:
    """Everything but the metadata dumps, into a fresh `destination` (blocking);
    links, devices and paths escaping it are skipped, as containerd's filter does."""
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(mode=0o700, parents=True)
    skip = {CONFIG_DUMP, SPEC_DUMP, STATUS_DUMP}
    with tarfile.open(path) as archive:
        members = [
            m
            for m in archive.getmembers()
            if _member_allowed(m)
            and os.path.normpath(m.name) not in skip
            and not os.path.normpath(m.name).startswith((".." + os.sep, os.sep))
            and os.path.normpath(m.name) != ".."
        ]
        archive.extractall(destination, members=members, filter="data")


def restored_config(
    request: cri.ContainerConfig, metadata: ArchiveMetadata, checkpoint_image: str
) -> cri.ContainerConfig:
    """The container to create: the request's config on the checkpoint's base image,
    with the checkpointed container's annotations under the request's, and
    containerd's restore annotations."""
    status = metadata.status
    annotations = {str(k): str(v) for k, v in (status.get("annotations") or {}).items()}
    annotations.update(request.annotations)
    annotations["restored"] = "true"
    checkpointed = metadata.config.get("checkpointedTime")
    annotations["checkpointedAt"] = str(checkpointed or "")
    annotations["checkpointImage"] = checkpoint_image
    image = status.get("image") or {}
    base = str(image.get("image") or metadata.config.get("rootfsImageName") or "")
    if not base:
        raise invalid_argument("the checkpoint archive names no base image")
    config = cri.ContainerConfig.from_dict(request.to_dict())
    config.annotations = annotations
    config.image = cri.ImageSpec(
        image=base,
        user_specified_image=str(image.get("user_specified_image") or base),
    )
    return config


def base_image_refs(metadata: ArchiveMetadata) -> list[str]:
    """References to look the checkpoint's base image up by, best first."""
    refs = [
        metadata.config.get("rootfsImageRef"),
        (metadata.status.get("image") or {}).get("image"),
        metadata.status.get("image_ref"),
        metadata.config.get("rootfsImageName"),
    ]
    return [str(r) for r in refs if r]


def now_ns() -> int:
    return time.time_ns()
