"""Deterministic OCI / Docker image builder for tests (stdlib only).

Tests have no internet, so every image they pull is assembled here from the
host's busybox binary.  Builds are byte-for-byte reproducible on one machine
(fixed mtimes, sorted tar entries, gzip mtime 0, sorted JSON), so the same
recipe always yields the same digests and tests can compare image IDs.

Building is synchronous and CPU-bound; async callers should wrap it in
``asyncio.to_thread``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform as _platform
import random
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Literal, TypeAlias

MediaKind: TypeAlias = Literal["oci", "docker"]
Compression: TypeAlias = Literal["gzip", "none"]
EntryKind: TypeAlias = Literal["file", "dir", "symlink", "hardlink"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

#: Fixed timestamp for tar entries and config ``created`` (reproducibility).
EPOCH = 0
CREATED = "1970-01-01T00:00:00Z"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Users of the base image: those of the official busybox image plus ``www``.
DEFAULT_PASSWD: tuple[str, ...] = (
    "root:x:0:0:root:/root:/bin/sh",
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false",
    "bin:x:2:2:bin:/bin:/bin/false",
    "sys:x:3:3:sys:/dev:/bin/false",
    "sync:x:4:100:sync:/bin:/bin/sync",
    "mail:x:8:8:mail:/var/spool/mail:/bin/false",
    "www-data:x:33:33:www-data:/var/www:/bin/false",
    "operator:x:37:37:Operator:/var:/bin/false",
    "www:x:1000:1000:www:/home/www:/bin/sh",
    "nobody:x:65534:65534:nobody:/home:/bin/false",
)
DEFAULT_GROUP: tuple[str, ...] = (
    "root:x:0:",
    "daemon:x:1:",
    "bin:x:2:",
    "sys:x:3:",
    "adm:x:4:",
    "tty:x:5:",
    "disk:x:6:",
    "lp:x:7:",
    "mail:x:8:",
    "kmem:x:9:",
    "wheel:x:10:root",
    "cdrom:x:11:",
    "dialout:x:18:",
    "floppy:x:19:",
    "video:x:28:",
    "audio:x:29:",
    "tape:x:32:",
    "www-data:x:33:",
    "operator:x:37:",
    "utmp:x:43:",
    "plugdev:x:46:",
    "staff:x:50:",
    "lock:x:54:",
    "netdev:x:82:",
    "users:x:100:",
    "www:x:1000:www",
    "nogroup:x:65534:",
)


class ImageBuildError(RuntimeError):
    """An image cannot be built on this host (e.g. no busybox)."""


def sha256_digest(data: bytes) -> str:
    """OCI digest string of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: object) -> bytes:
    """Sorted, compact JSON: the same object always serialises to the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------- blobs


@dataclass(frozen=True)
class Blob:
    """Content-addressed bytes with a media type: a layer, config or manifest."""

    media_type: str
    data: bytes = field(repr=False)
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", sha256_digest(self.data))

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: object) -> dict[str, object]:
        """OCI descriptor (mediaType, digest, size) plus ``extra`` fields."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


# ------------------------------------------------------------------------ platforms

_GOARCH = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "loongarch64": ("loong64", None),
}


@dataclass(frozen=True)
class Platform:
    """An OCI platform; ``architecture`` uses Go's GOARCH names like registries do."""

    architecture: str
    os: str = "linux"
    variant: str | None = None

    @classmethod
    def host(cls) -> Platform:
        """This machine's platform (``uname -m`` mapped to GOARCH)."""
        machine = _platform.machine().lower()
        arch, variant = _GOARCH.get(machine, (machine, None))
        return cls(arch, "linux", variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]``."""
        parts = text.split("/")
        if len(parts) not in (2, 3):
            raise ValueError(f"bad platform {text!r}")
        return cls(parts[1], parts[0], parts[2] if len(parts) == 3 else None)

    def as_dict(self) -> dict[str, str]:
        d = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        return d

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def goarch() -> str:
    """GOARCH of this host (e.g. for critest's ``hostnet-nginx-<arch>``)."""
    return Platform.host().architecture


# --------------------------------------------------------------------- tar entries


@dataclass(frozen=True)
class Entry:
    """One tar entry of a layer; ``path`` is relative to the root (no leading /)."""

    path: str
    kind: EntryKind
    data: bytes = field(default=b"", repr=False)
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""


def _norm(path: str) -> str:
    p = PurePosixPath("/", path)
    parts = [x for x in p.parts[1:] if x not in ("", ".")]
    if ".." in parts or not parts:
        raise ValueError(f"bad layer path {path!r}")
    return "/".join(parts)


def file(
    path: str, data: bytes | str = b"", *, mode: int = 0o644, uid: int = 0, gid: int = 0
) -> Entry:
    """A regular file (``str`` data is UTF-8 encoded)."""
    raw = data.encode() if isinstance(data, str) else data
    return Entry(_norm(path), "file", raw, mode, uid, gid)


def directory(path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    """A directory."""
    return Entry(_norm(path), "dir", b"", mode, uid, gid)


def symlink(path: str, target: str) -> Entry:
    """A symbolic link to ``target`` (kept verbatim, may be absolute)."""
    return Entry(_norm(path), "symlink", b"", 0o777, 0, 0, target)


def hardlink(path: str, target: str, mode: int = 0o644) -> Entry:
    """A hard link; `mode` must be the target's (containerd applies it to the shared inode)."""
    return Entry(_norm(path), "hardlink", b"", mode, 0, 0, _norm(target))


def whiteout(path: str) -> Entry:
    """Deletes ``path`` from lower layers (overlay ``.wh.<name>`` marker)."""
    p = PurePosixPath(_norm(path))
    name = ".wh." + p.name
    return Entry(name if str(p.parent) == "." else f"{p.parent}/{name}", "file", b"", 0)


def opaque_whiteout(dir_path: str) -> Entry:
    """Hides everything lower layers put in ``dir_path`` (``.wh..wh..opq``)."""
    return Entry(_norm(dir_path) + "/.wh..wh..opq", "file", b"", 0)


@dataclass(frozen=True)
class Layer:
    """A filesystem changeset; turned into a (compressed) tar blob at build time."""

    entries: tuple[Entry, ...]
    compression: Compression = "gzip"
    created_by: str = ""


def layer(
    entries: Iterable[Entry], *, compression: Compression = "gzip", created_by: str = ""
) -> Layer:
    """Build a :class:`Layer` from entries (later duplicates of a path win)."""
    return Layer(tuple(entries), compression, created_by)


def layer_from_dir(root: Path, *, compression: Compression = "gzip") -> Layer:
    """A layer holding a host directory tree (owners reset to root, modes kept)."""
    entries: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            st = full.lstat()
            if full.is_symlink():
                entries.append(symlink(rel, os.readlink(full)))
            elif full.is_dir():
                entries.append(directory(rel, mode=st.st_mode & 0o7777))
            elif full.is_file():
                entries.append(file(rel, full.read_bytes(), mode=st.st_mode & 0o7777))
    return layer(entries, compression=compression, created_by=f"COPY {root.name} /")


#: Modes for implied parent directories that must not become 0755 in upper layers.
_PARENT_MODES = {"tmp": 0o1777, "var/tmp": 0o1777, "root": 0o700}


def _complete(entries: Iterable[Entry]) -> list[Entry]:
    """Dedupe (last wins), add missing parent dirs, sort so parents come first."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        by_path[e.path] = e
    for path in list(by_path):
        parent = PurePosixPath(path).parent
        while str(parent) not in (".", ""):
            mode = _PARENT_MODES.get(str(parent), 0o755)
            by_path.setdefault(str(parent), Entry(str(parent), "dir", b"", mode))
            parent = parent.parent
    return [by_path[p] for p in sorted(by_path, key=lambda p: p.split("/"))]


def layer_tar(entries: Iterable[Entry]) -> bytes:
    """The uncompressed, reproducible tar stream of ``entries``."""
    buf = io.BytesIO()
    complete = _complete(entries)
    # A hard link must follow the file it names, whatever their names sort as.
    ordered = [e for e in complete if e.kind != "hardlink"] + [
        e for e in complete if e.kind == "hardlink"
    ]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in ordered:
            info = tarfile.TarInfo(e.path)
            info.mtime = EPOCH
            info.uid, info.gid = e.uid, e.gid
            info.uname = info.gname = ""
            info.mode = e.mode
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = e.target
                tar.addfile(info)
            elif e.kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = e.target
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    return buf.getvalue()


@lru_cache(maxsize=512)
def _built_layer(lay: Layer, media: MediaKind) -> tuple[Blob, str]:
    """(layer blob, diff_id) — cached since base layers are shared by many images."""
    tar = layer_tar(lay.entries)
    diff_id = sha256_digest(tar)
    if lay.compression == "gzip":
        data = gzip.compress(tar, compresslevel=6, mtime=0)
        mt = OCI_LAYER_GZIP if media == "oci" else DOCKER_LAYER_GZIP
    else:
        data = tar
        mt = OCI_LAYER if media == "oci" else DOCKER_LAYER
    return Blob(mt, data), diff_id


# -------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an image config (Docker's ``config`` object)."""

    user: str = ""
    env: tuple[str, ...] = (DEFAULT_PATH,)
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = ("sh",)
    working_dir: str = ""
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    stop_signal: str = ""

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {"Env": list(self.env)}
        if self.user:
            d["User"] = self.user
        if self.entrypoint is not None:
            d["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            d["Cmd"] = list(self.cmd)
        if self.working_dir:
            d["WorkingDir"] = self.working_dir
        if self.exposed_ports:
            d["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        if self.volumes:
            d["Volumes"] = {v: {} for v in self.volumes}
        if self.labels:
            d["Labels"] = dict(self.labels)
        if self.stop_signal:
            d["StopSignal"] = self.stop_signal
        return d


@dataclass(frozen=True)
class Image:
    """A single-platform image: manifest + config + layers."""

    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]
    platform: Platform

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type

    @property
    def images(self) -> tuple[Image, ...]:
        return (self,)

    @property
    def config_json(self) -> dict[str, object]:
        cfg: dict[str, object] = json.loads(self.config.data)
        return cfg

    def blobs(self) -> tuple[Blob, ...]:
        """Config and layers: what must be uploaded before the manifest."""
        return (self.config, *self.layers)

    def descriptor(self) -> dict[str, object]:
        """Descriptor for an index, with the platform."""
        return self.manifest.descriptor(platform=self.platform.as_dict())


@dataclass(frozen=True)
class ImageIndex:
    """A multi-platform image: an OCI index or Docker manifest list."""

    manifest: Blob
    images: tuple[Image, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type

    def for_platform(self, platform: Platform) -> Image:
        """The child image for ``platform``."""
        for img in self.images:
            if img.platform == platform:
                return img
        raise KeyError(str(platform))

    def blobs(self) -> tuple[Blob, ...]:
        """All configs and layers of all children, each once."""
        seen: dict[str, Blob] = {}
        for img in self.images:
            for b in img.blobs():
                seen.setdefault(b.digest, b)
        return tuple(seen.values())


AnyImage: TypeAlias = Image | ImageIndex


def build_image(
    layers: Sequence[Layer],
    *,
    media: MediaKind = "oci",
    config: ImageConfig | None = None,
    platform: Platform | None = None,
    annotations: Mapping[str, str] | None = None,
    created: str = CREATED,
) -> Image:
    """Assemble layers + config into an OCI or Docker schema2 image."""
    plat = platform or Platform.host()
    cfg = config or ImageConfig()
    built = [_built_layer(lay, media) for lay in layers]
    history = [
        {"created": created, "created_by": lay.created_by or f"layer {i}"}
        for i, lay in enumerate(layers)
    ]
    config_obj: dict[str, object] = {
        **plat.as_dict(),
        "created": created,
        "config": cfg.to_json(),
        "rootfs": {"type": "layers", "diff_ids": [d for _, d in built]},
        "history": history,
    }
    config_blob = Blob(OCI_CONFIG if media == "oci" else DOCKER_CONFIG, canonical_json(config_obj))
    manifest_type = OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST
    manifest_obj: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b, _ in built],
    }
    if annotations:
        if media != "oci":
            raise ValueError("annotations need an OCI manifest")
        manifest_obj["annotations"] = dict(annotations)
    return Image(
        manifest=Blob(manifest_type, canonical_json(manifest_obj)),
        config=config_blob,
        layers=tuple(b for b, _ in built),
        diff_ids=tuple(d for _, d in built),
        platform=plat,
    )


def build_index(
    images: Sequence[Image],
    *,
    media: MediaKind = "oci",
    annotations: Mapping[str, str] | None = None,
) -> ImageIndex:
    """Wrap single-platform images in an OCI index or Docker manifest list."""
    index_type = OCI_INDEX if media == "oci" else DOCKER_MANIFEST_LIST
    obj: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [img.descriptor() for img in images],
    }
    if annotations:
        if media != "oci":
            raise ValueError("annotations need an OCI index")
        obj["annotations"] = dict(annotations)
    return ImageIndex(Blob(index_type, canonical_json(obj)), tuple(images))


# ------------------------------------------------------------------------- busybox


@dataclass(frozen=True)
class Busybox:
    """The busybox binary images are built from, with what it needs to run."""

    path: Path
    dynamic: bool
    #: (path inside the image, host file) for the loader and shared libraries.
    libraries: tuple[tuple[str, Path], ...]
    #: Applet paths inside the image, relative (``bin/ls``, ``usr/sbin/httpd``...).
    applets: tuple[str, ...]

    @property
    def applet_names(self) -> frozenset[str]:
        return frozenset(PurePosixPath(a).name for a in self.applets)


def _elf_interpreter(path: Path) -> str | None:
    """PT_INTERP of an ELF file, or None when it is static (or not ELF)."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return None
        is64, little = head[4] == 2, head[5] == 1
        end = "<" if little else ">"
        if is64:
            (phoff,) = struct.unpack_from(end + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
        else:
            (phoff,) = struct.unpack_from(end + "I", head, 28)
            phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            ph = f.read(phentsize)
            if is64:
                p_type, _flags, p_offset, _v, _p, p_filesz = struct.unpack_from(end + "IIQQQQ", ph)
            else:
                p_type, p_offset, _v, _p, p_filesz = struct.unpack_from(end + "IIIII", ph)
            if p_type == 3:  # PT_INTERP
                f.seek(p_offset)
                return f.read(p_filesz).rstrip(b"\0").decode()
    return None


def _ldd(path: Path) -> tuple[tuple[str, Path], ...]:
    out = subprocess.run(
        ["ldd", str(path)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    libs: list[tuple[str, Path]] = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            _, _, rest = line.partition("=>")
            target = rest.strip().split(" (")[0].strip()
            if target and target.startswith("/"):
                libs.append((target.lstrip("/"), Path(os.path.realpath(target))))
        elif line.startswith("/"):
            target = line.split(" (")[0].strip()
            libs.append((target.lstrip("/"), Path(os.path.realpath(target))))
    return tuple(sorted(set(libs)))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cri-shim-tests"


def _download_debian_busybox() -> Path | None:
    """Unpack Debian's dynamically linked busybox .deb into a cache dir, no install.

    The ``busybox`` package conflicts with ``busybox-static``; unpacking it aside
    avoids swapping packages on a shared machine.
    """
    if os.environ.get("CRI_SHIM_TEST_NO_DOWNLOAD"):
        return None
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if not apt or not dpkg:
        return None
    dest = _cache_dir() / "busybox-deb"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                [apt, "download", "-q", "busybox"],
                cwd=tmp,
                capture_output=True,
                check=True,
                timeout=120,
            )
            debs = sorted(Path(tmp).glob("busybox_*.deb"))
            if not debs:
                return None
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            subprocess.run(
                [dpkg, "-x", str(debs[0]), str(dest)],
                capture_output=True,
                check=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    for cand in (dest / "bin/busybox", dest / "usr/bin/busybox"):
        if cand.is_file():
            return cand
    return None


def _candidates() -> Iterator[Path]:
    env = os.environ.get("CRI_SHIM_TEST_BUSYBOX")
    if env:
        yield Path(env)
    for p in ("/usr/bin/busybox", "/bin/busybox", "/usr/sbin/busybox"):
        yield Path(p)
    cache = _cache_dir() / "busybox-deb"
    yield cache / "bin/busybox"
    yield cache / "usr/bin/busybox"


@lru_cache(maxsize=1)
def find_busybox() -> Busybox:
    """Locate busybox, preferring a dynamically linked one.

    Debian's busybox-static runs applets in-process ("standalone shell"), so
    ``sh -c 'sleep 1'`` never execs ``sleep``; real images exec. Order:
    ``$CRI_SHIM_TEST_BUSYBOX``, a dynamic busybox on the host, a cached copy
    unpacked from Debian's ``busybox`` .deb (downloaded once unless
    ``$CRI_SHIM_TEST_NO_DOWNLOAD`` is set), then any static busybox.
    """
    seen: list[Path] = []
    for cand in _candidates():
        if cand.is_file() and os.access(cand, os.X_OK) and cand.resolve() not in seen:
            seen.append(cand.resolve())
    dynamic = [p for p in seen if _elf_interpreter(p)]
    if not dynamic:
        fetched = _download_debian_busybox()
        if fetched is not None:
            dynamic.append(fetched)
    if dynamic:
        path, libs = dynamic[0], _ldd(dynamic[0])
    elif seen:
        path, libs = seen[0], ()
    else:
        raise ImageBuildError("no busybox binary found (apt-get install busybox-static)")
    applets = _applets(path)
    return Busybox(path=path, dynamic=bool(libs), libraries=libs, applets=applets)


def _applets(path: Path) -> tuple[str, ...]:
    def run(flag: str) -> list[str]:
        try:
            res = subprocess.run(
                [str(path), flag], capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return []
        return [x.strip() for x in res.stdout.splitlines() if x.strip()]

    full = [p.lstrip("/") for p in run("--list-full") if "/" in p.strip("/")]
    if not full:
        full = [f"bin/{name}" for name in run("--list") if "/" not in name]
    names = {PurePosixPath(p).name for p in full}
    if "sh" not in names:
        full.append("bin/sh")
    return tuple(sorted(p for p in set(full) if PurePosixPath(p).name != "busybox"))


# Stand-ins for applets Debian's busybox lacks but tests use (critest runs
# ``pgrep sleep`` and ``ipcs -m``).
_PGREP = """#!/bin/sh
# pgrep stand-in: print PIDs whose process name matches an extended regex.
[ $# -ge 1 ] || { echo "usage: pgrep PATTERN" >&2; exit 2; }
for d in /proc/[0-9]*; do
  read -r comm < "$d/comm" && echo "${d#/proc/} $comm"
done 2>/dev/null |
  awk -v p="$1" -v self="$$" '$1 != self && $2 ~ p { print $1; f = 1 } END { exit !f }'
"""

_IPCS = """#!/bin/sh
# ipcs stand-in: dump the kernel's System V IPC tables of this IPC namespace.
show() { echo "------ $1 --------"; cat "/proc/sysvipc/$2"; echo; }
case "${1:--a}" in
  -m) show "Shared Memory Segments" shm ;;
  -q) show "Message Queues" msg ;;
  -s) show "Semaphore Arrays" sem ;;
  *) show "Message Queues" msg; show "Shared Memory Segments" shm; show "Semaphore Arrays" sem ;;
esac
"""


def users_entries(
    passwd: Sequence[str] = DEFAULT_PASSWD, group: Sequence[str] = DEFAULT_GROUP
) -> tuple[Entry, ...]:
    """/etc/passwd and /etc/group files."""
    return (
        file("etc/passwd", "\n".join(passwd) + "\n"),
        file("etc/group", "\n".join(group) + "\n"),
    )


def busybox_rootfs(
    passwd: Sequence[str] = DEFAULT_PASSWD, group: Sequence[str] = DEFAULT_GROUP
) -> tuple[Entry, ...]:
    """Entries of a minimal busybox root filesystem (like the official image)."""
    bb = find_busybox()
    entries: list[Entry] = [
        directory(d)
        for d in (
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "usr/local/bin",
            "etc",
            "home",
            "var/spool/mail",
            "var/www",
            "dev",
            "proc",
            "sys",
        )
    ]
    entries += [directory("root", mode=0o700), directory("tmp", mode=0o1777)]
    entries.append(file("bin/busybox", bb.path.read_bytes(), mode=0o755))
    # Hard links, as upstream busybox images have: masking one applet's path
    # (critest masks /bin/ls) must not mask /bin/busybox behind it.
    entries += [hardlink(a, "bin/busybox", 0o755) for a in bb.applets if a != "bin/busybox"]
    for inside, host in bb.libraries:
        entries.append(file(inside, host.read_bytes(), mode=0o755))
    if bb.dynamic:
        entries.append(file("etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n"))
    names = bb.applet_names
    if "pgrep" not in names:
        entries.append(file("usr/bin/pgrep", _PGREP, mode=0o755))
    if "ipcs" not in names:
        entries.append(file("usr/bin/ipcs", _IPCS, mode=0o755))
    entries += users_entries(passwd, group)
    return tuple(entries)


@lru_cache(maxsize=8)
def busybox_layer(
    passwd: tuple[str, ...] = DEFAULT_PASSWD, group: tuple[str, ...] = DEFAULT_GROUP
) -> Layer:
    """The shared base layer (cached: every image starts with the same bytes)."""
    return layer(busybox_rootfs(passwd, group), created_by="ADD busybox rootfs /")


def marker_layer(path: str, content: str, *, compression: Compression = "gzip") -> Layer:
    """A one-file layer, to tell otherwise identical images apart."""
    return layer([file(path, content)], compression=compression, created_by=f"ADD {path}")


# ---------------------------------------------------------------- ready-made images


def busybox_image(
    *,
    media: MediaKind = "oci",
    config: ImageConfig | None = None,
    extra_layers: Sequence[Layer] = (),
    platform: Platform | None = None,
) -> Image:
    """busybox base (+ extra layers); default command ``sh`` like the official image."""
    return build_image(
        [busybox_layer(), *extra_layers], media=media, config=config, platform=platform
    )


def multilayer_layers() -> tuple[Layer, ...]:
    """Base + a layer adding files + a layer deleting some (plain and opaque whiteouts).

    Result: /data/a and /data/c exist, /data/b is gone, /opaque holds only ``new``,
    /etc/motd says ``layer 3``.
    """
    add = layer(
        [
            file("data/a", "a\n"),
            file("data/b", "b\n"),
            file("opaque/old", "old\n"),
            file("etc/motd", "layer 2\n"),
            file("data/exec.sh", "#!/bin/sh\necho layered\n", mode=0o755),
        ],
        created_by="ADD data opaque motd",
    )
    delete = layer(
        [
            whiteout("data/b"),
            opaque_whiteout("opaque"),
            file("opaque/new", "new\n"),
            file("data/c", "c\n"),
            file("etc/motd", "layer 3\n"),
        ],
        created_by="RUN rm /data/b && rm -rf /opaque/* && ...",
    )
    return (busybox_layer(), add, delete)


def multilayer_image(*, media: MediaKind = "oci") -> Image:
    """Three layers with whiteouts; see :func:`multilayer_layers`."""
    return build_image(multilayer_layers(), media=media)


def platform_image(platform: Platform, *, media: MediaKind = "oci") -> Image:
    """Image for ``platform`` with /etc/platform naming it.

    For the host platform it is a runnable busybox; for foreign ones only the
    marker layer (their content is never run, only selected or not).
    """
    marker = marker_layer("etc/platform", f"{platform}\n")
    layers = [busybox_layer(), marker] if platform == Platform.host() else [marker]
    return build_image(layers, media=media, platform=platform)


def multiarch_index(
    *,
    media: MediaKind = "oci",
    foreign: Sequence[Platform] = (Platform("arm64", variant="v8"), Platform("s390x")),
) -> ImageIndex:
    """Index with the host image plus foreign-arch marker images (foreign ones first,
    so a puller that just takes the first entry picks the wrong one)."""
    host = Platform.host()
    plats = [p for p in foreign if p != host] + [host]
    return build_index([platform_image(p, media=media) for p in plats], media=media)


def user_image(user: str, *, media: MediaKind = "oci", extra: Sequence[Layer] = ()) -> Image:
    """busybox with ``USER`` set (``1234``, ``www``, ``1000:1000``, ``www:www``...)."""
    return busybox_image(media=media, config=ImageConfig(user=user), extra_layers=extra)


def entrypoint_image(*, media: MediaKind = "oci") -> Image:
    """Exercises every config field: ENTRYPOINT/CMD/ENV/WORKDIR/EXPOSE/VOLUME/LABEL/STOPSIGNAL."""
    cfg = ImageConfig(
        entrypoint=("/bin/sh", "-c", 'echo "entrypoint $0 $* FOO=$FOO PWD=$(pwd)"'),
        cmd=("cmd-arg1", "cmd-arg2"),
        env=(DEFAULT_PATH, "FOO=bar", "EMPTY="),
        working_dir="/work",
        exposed_ports=("8080/tcp", "53/udp"),
        volumes=("/data",),
        labels={"org.example.test": "entrypoint", "maintainer": "cri-shim"},
        stop_signal="SIGUSR1",
    )
    extra = layer([directory("work"), directory("data")], created_by="WORKDIR /work")
    return busybox_image(media=media, config=cfg, extra_layers=[extra])


_REPORT_SIGNAL = """#!/bin/sh
# Runs until a stop signal; logs which one arrived and exits with a code naming it.
trap 'echo "caught USR2"; exit 12' USR2
trap 'echo "caught USR1"; exit 10' USR1
trap 'echo "caught TERM"; exit 15' TERM
echo ready
while :; do sleep 0.1; done
"""


def stopsignal_image(*, media: MediaKind = "oci") -> Image:
    """busybox with ``STOPSIGNAL SIGUSR2`` whose command reports the signal it got
    (``caught USR2`` on stdout, exit 12; USR1: 10; TERM: 15)."""
    script = layer(
        [file("usr/local/bin/report-signal", _REPORT_SIGNAL, mode=0o755)],
        created_by="ADD report-signal",
    )
    cfg = ImageConfig(cmd=("/usr/local/bin/report-signal",), stop_signal="SIGUSR2")
    return busybox_image(media=media, config=cfg, extra_layers=[script])


def httpd_image(
    *,
    port: int = 80,
    root: str = "/www",
    page: str = "<html><body><h1>cri-shim test httpd</h1></body></html>\n",
    media: MediaKind = "oci",
) -> Image:
    """``busybox httpd -f -p PORT -h ROOT`` as PID 1 serving an index page.

    busybox httpd installs no SIGTERM handler, so as PID 1 it ignores SIGTERM:
    stopping it needs the SIGKILL after the grace period.
    """
    site = layer(
        [file(f"{root}/index.html", page), file(f"{root}/health", "ok\n")],
        created_by=f"ADD site {root}",
    )
    cfg = ImageConfig(
        entrypoint=("httpd", "-f", "-v", "-p", str(port), "-h", root),
        cmd=None,
        exposed_ports=(f"{port}/tcp",),
    )
    return busybox_image(media=media, config=cfg, extra_layers=[site])


_NGINX = """#!/bin/sh
# nginx stand-in: busybox httpd supervised by a shell that looks like nginx.
# Being a script named nginx gives it comm "nginx" (pidof nginx finds it); the
# re-exec puts "master process" in /proc/self/cmdline like real nginx.
[ "$1" = "nginx: master process" ] || exec /usr/sbin/nginx "nginx: master process" "$@"
trap 'kill "$child" 2>/dev/null; exit 0' TERM INT QUIT
mkdir -p /var/run
echo $$ > /var/run/nginx.pid
echo "nginx: serving /usr/share/nginx/html on port @PORT@"
httpd -f -p @PORT@ -h /usr/share/nginx/html &
child=$!
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
"""

NGINX_PAGE = (
    "<!DOCTYPE html>\n<html>\n<head>\n<title>Welcome to nginx!</title>\n</head>\n"
    "<body>\n<h1>Welcome to nginx!</h1>\n</body>\n</html>\n"
)


def nginx_like_image(*, port: int = 80, media: MediaKind = "docker") -> Image:
    """Behaves like nginx for tests: port, pid file, process name, master cmdline."""
    site = layer(
        [
            file("usr/sbin/nginx", _NGINX.replace("@PORT@", str(port)), mode=0o755),
            file("usr/share/nginx/html/index.html", NGINX_PAGE),
            file("usr/share/nginx/html/50x.html", "<h1>An error occurred.</h1>\n"),
            directory("var/run"),
            directory("var/log/nginx"),
        ],
        created_by="ADD nginx stand-in",
    )
    cfg = ImageConfig(
        entrypoint=("/usr/sbin/nginx",),
        cmd=("-g", "daemon off;"),
        exposed_ports=(f"{port}/tcp",),
        stop_signal="SIGQUIT",
    )
    return busybox_image(media=media, config=cfg, extra_layers=[site])


_HTTPD_FOREGROUND = """#!/bin/sh
# httpd-foreground stand-in (Apache image): busybox httpd, exits on stop signals.
trap 'kill "$child" 2>/dev/null; exit 0' TERM INT QUIT WINCH
echo "httpd: serving /usr/local/apache2/htdocs on port @PORT@"
httpd -f -p @PORT@ -h /usr/local/apache2/htdocs &
child=$!
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
"""


def apache_like_image(*, port: int = 80, media: MediaKind = "docker") -> Image:
    """Like the httpd (Apache) image: ``httpd-foreground``, "It works!", logs "httpd"."""
    site = layer(
        [
            file(
                "usr/local/bin/httpd-foreground",
                _HTTPD_FOREGROUND.replace("@PORT@", str(port)),
                mode=0o755,
            ),
            file(
                "usr/local/apache2/htdocs/index.html",
                "<html><body><h1>It works!</h1></body></html>\n",
            ),
            directory("usr/local/apache2/logs"),
        ],
        created_by="ADD httpd stand-in",
    )
    cfg = ImageConfig(
        env=("PATH=/usr/local/apache2/bin:" + DEFAULT_PATH[5:], "HTTPD_PREFIX=/usr/local/apache2"),
        cmd=("httpd-foreground",),
        working_dir="/usr/local/apache2",
        exposed_ports=(f"{port}/tcp",),
        stop_signal="SIGWINCH",
    )
    return busybox_image(media=media, config=cfg, extra_layers=[site])


_PAUSE = """#!/bin/sh
# pause stand-in: sleep until SIGTERM/SIGINT, reaping adopted children meanwhile.
trap 'kill $! 2>/dev/null; exit 0' TERM INT
while :; do sleep 3600 & wait; done
"""


def pause_image(*, media: MediaKind = "docker") -> Image:
    """A sandbox (pause) image: ``/pause`` sleeps forever, exits 0 on TERM/INT."""
    pause: str | bytes = _pause_elf_x86_64() if _platform.machine() == "x86_64" else _PAUSE
    extra = layer([file("pause", pause, mode=0o755)], created_by="ADD pause /pause")
    cfg = ImageConfig(entrypoint=("/pause",), cmd=None, user="65535:65535")
    return busybox_image(media=media, config=cfg, extra_layers=[extra])


def _static_elf_x86_64(code: bytes) -> bytes:
    """A minimal static x86-64 ELF: one loadable segment holding `code`, entry at its start."""
    base, hdr = 0x400000, 64 + 56
    total = hdr + len(code)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + b"\0" * 9,
        2,
        0x3E,
        1,
        base + hdr,
        64,
        0,
        0,
        64,
        56,
        1,
        64,
        0,
        0,
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)
    return ehdr + phdr + code


def _nnp_elf_x86_64() -> bytes:
    """A 229-byte static x86-64 ELF printing ``Effective uid: <geteuid()>``.

    busybox drops set-uid privileges itself, so no-new-privileges tests need a
    real setuid program; hand-assembled to avoid needing a compiler.
    """
    return _static_elf_x86_64(
        bytes.fromhex(
            "b86b0000000f054883ec40488d74243fc6060ab90a00000031d2f7f180c23048ffce881685c0"
            "75f0b90f000000488d3d2a00000048ffce8a440fff8806ffc975f3488d5424404829f2bf0100"
            "0000b8010000000f0531ffb83c0000000f05"
        )
        + b"Effective uid: "
    )


def _pause_elf_x86_64() -> bytes:
    """A static x86-64 pause like the real one, with no child process of its own
    (a shell loop's `sleep` shows up in pods sharing the PID namespace).

    It blocks SIGCHLD/SIGTERM/SIGINT and loops on rt_sigtimedwait: SIGCHLD reaps
    every exited child (wait4 WNOHANG), SIGTERM or SIGINT exits 0.
    """
    return _static_elf_x86_64(
        bytes.fromhex(
            "31ff488d355d00000031d241ba08000000b80e0000000f05488d3d4700000031f631d241ba08"
            "000000b8800000000f0583f811751cbfffffffff31f6ba010000004531d2b83d0000000f0585"
            "c07fe6ebc783f80f740783f8027402ebbb31ffb83c0000000f050240010000000000"
        )
    )


_NNP_C = """#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\\n", (int)geteuid()); return 0; }
"""


@lru_cache(maxsize=1)
def nnp_binary() -> bytes:
    """The setuid test program for this host's architecture."""
    if Platform.host().architecture == "amd64":
        return _nnp_elf_x86_64()
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise ImageBuildError("nnp binary needs x86-64 or a C compiler")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "nnp.c"), Path(tmp, "nnp")
        src.write_text(_NNP_C)
        subprocess.run([cc, "-static", "-O2", "-o", str(out), str(src)], check=True, timeout=120)
        return out.read_bytes()


def nonewprivs_image(*, media: MediaKind = "docker") -> Image:
    """Like e2e-test-images/nonewprivs: setuid-root ``/usr/local/bin/nnp`` prints its euid."""
    extra = layer(
        [file("usr/local/bin/nnp", nnp_binary(), mode=0o4755)], created_by="COPY nnp; chmod +s"
    )
    cfg = ImageConfig(user="1000", cmd=("/usr/local/bin/nnp",))
    return busybox_image(media=media, config=cfg, extra_layers=[extra])


def large_image(*, size: int = 4 << 20, seed: int = 0, media: MediaKind = "oci") -> Image:
    """busybox + an incompressible ``/blob`` of ``size`` bytes (progress tests)."""
    data = random.Random(seed).randbytes(size)
    return busybox_image(media=media, extra_layers=[layer([file("blob", data)])])


# ---------------------------------------------------------------- OCI image layout


def _ref_tag(name: str) -> str:
    tail = name.rsplit("/", 1)[-1]
    return tail.split(":", 1)[1] if ":" in tail else "latest"


def oci_layout_files(refs: Mapping[str, AnyImage]) -> dict[str, bytes]:
    """Files of an OCI image layout holding ``refs`` (full name -> image)."""
    files: dict[str, bytes] = {"oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"})}

    def put(b: Blob) -> None:
        files[f"blobs/sha256/{b.digest.split(':', 1)[1]}"] = b.data

    manifests: list[dict[str, object]] = []
    for name, img in sorted(refs.items()):
        for child in img.images:
            put(child.manifest)
            for b in child.blobs():
                put(b)
        put(img.manifest)
        annotations = {
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": _ref_tag(name),
        }
        manifests.append(img.manifest.descriptor(annotations=annotations))
    files["index.json"] = canonical_json(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    )
    return files


def write_oci_layout(dest: Path, refs: Mapping[str, AnyImage]) -> None:
    """Write an OCI image layout directory."""
    for rel, data in oci_layout_files(refs).items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def oci_archive(refs: Mapping[str, AnyImage]) -> bytes:
    """An OCI layout as a tar (what ``ctr images import`` reads)."""
    return layer_tar(file(rel, data) for rel, data in oci_layout_files(refs).items())
