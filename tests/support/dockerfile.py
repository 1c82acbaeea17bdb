"""Build deploy/Dockerfile's image without a Docker engine (there is none on
these machines, and no base image can be pulled offline).

The Dockerfile is parsed and carried out instruction by instruction: `FROM`
of a Debian image becomes an mmdebstrap root filesystem of that suite (the
`-slim` variant's dpkg excludes and the official images' apt settings
included), `FROM` an earlier stage a copy of its root filesystem, `RUN` runs
in a chroot of it (private mount namespace with /proc and /dev, the host's CA
bundle handed to pip for the build only), `COPY` copies from the context or an
earlier stage, `ENV`/`WORKDIR`/`USER`/`ENTRYPOINT`/`CMD` go to the image
config as Docker sets them. The result is one OCI layer (the final stage's root filesystem)
and its config, pushed with the project's registry client.

Every step is cached outside the checkout (`$CRI_SHIM_IMAGE_CACHE`, default
/var/cache/cri-shim-image) under a key chained from the base recipe, each
instruction's text and the content of what `COPY` takes from the context,
as Docker's build cache does: a snapshot of the root filesystem after each
`RUN`, and the finished image. Unchanged inputs cost nothing; a source change
rebuilds the wheel and the install step only.

Building is synchronous and slow (minutes cold); call it through
`asyncio.to_thread`.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .images import (
    CREATED,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Blob,
    Image,
    Platform,
    canonical_json,
)

ROOT = Path(__file__).resolve().parent.parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CACHE = Path(os.environ.get("CRI_SHIM_IMAGE_CACHE", "/var/cache/cri-shim-image"))
# Bump when this module's output for the same inputs changes.
BUILDER_VERSION = "2"
# How the final root filesystem is written (part of the image's cache key):
# gzip level 1, several times faster than 6 on a loaded machine for a layer
# some 15 % bigger.
LAYER_FORMAT = "tar --sort=name, gzip -1"
GZIP_LEVEL = 1
# Least recently used entries beyond these are deleted after a build (each
# source change adds a wheel and an install snapshot, ~350 MB together).
KEEP_IMAGES = 3
KEEP_SNAPSHOTS = 10
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What Debian's -slim images leave out (debuerreotype's slimify list).
SLIM_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/locale/*",
)
# The apt settings Debian's official images carry (debuerreotype's docker-*
# files): no package caches or translations left behind by apt-get.
DEBIAN_IMAGE_APT = {
    "docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    ),
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}
# Debian images by name -> (suite, slim); the only kind of base this builds.
DEBIAN_BASE = re.compile(r"^(?:docker\.io/)?(?:library/)?debian:(?P<suite>[a-z]+)(?P<slim>-slim)?$")
# Context paths a COPY never takes (deploy/Dockerfile.dockerignore says the same).
IGNORED = ("__pycache__", "*.pyc")


class DockerfileError(RuntimeError):
    """The Dockerfile uses something this builder does not carry out."""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    @property
    def text(self) -> str:
        return f"{self.keyword} {self.args}"

    def exec_form(self) -> list[str]:
        """A JSON array argument (ENTRYPOINT/CMD), or the shell form wrapped."""
        if self.args.startswith("["):
            parsed = json.loads(self.args)
            assert isinstance(parsed, list)
            return [str(part) for part in parsed]
        return ["/bin/sh", "-c", self.args]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass(frozen=True)
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> int:
        for index, stage in enumerate(self.stages):
            if stage.name == name or str(index) == name:
                return index
        raise DockerfileError(f"no stage {name!r}")


def logical_lines(text: str) -> Iterator[str]:
    """Instructions with continuation lines joined, comments and blanks dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending.rstrip()


def substitute(text: str, values: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` from `values` (unknown names become empty, as Docker)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), text)


def parse(text: str) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = substitute(rest, args).split()
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], alias))
        elif not stages:
            raise DockerfileError(f"{keyword} before FROM")
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return Dockerfile(args, stages)


def env_pairs(args: str) -> list[tuple[str, str]]:
    """ENV's `K=V K2=V2` form (values may be quoted)."""
    pairs = []
    for word in shlex.split(args):
        name, sep, value = word.partition("=")
        if not sep:
            raise DockerfileError(f"ENV {args!r}: only the KEY=VALUE form is supported")
        pairs.append((name, value))
    return pairs


# ------------------------------------------------------------------------- state


@dataclass
class StageState:
    """What an instruction leaves for the next: env, workdir, user, entrypoint."""

    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    workdir: str = "/"
    user: str = ""
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    history: list[str] = field(default_factory=list)


def digest_of(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def tree_digest(path: Path) -> str:
    """Content and mode of a context file or directory (what COPY keys on)."""
    hasher = hashlib.sha256()
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if not ignored(p))
    for item in paths:
        rel = item.relative_to(path.parent).as_posix()
        hasher.update(f"{rel}\0{item.lstat().st_mode:o}\0".encode())
        if item.is_file():
            hasher.update(item.read_bytes())
    return hasher.hexdigest()


def ignored(path: Path) -> bool:
    return any(part == "__pycache__" for part in path.parts) or path.suffix == ".pyc"


def run(cmd: list[str], *, timeout: float = 900) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise DockerfileError(
            f"{' '.join(cmd)[:300]} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-3000:]}"
        )


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One build at a time per cache (concurrent test runs wait, then hit it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------ builder


@dataclass
class BuiltImage:
    """The final image (OCI, one layer), where it is cached, and how long it took."""

    image: Image
    directory: Path
    key: str
    cached: bool
    seconds: float
    steps: dict[str, float]


class Builder:
    def __init__(self, dockerfile: Path = DOCKERFILE, context: Path = ROOT, cache: Path = CACHE):
        self.dockerfile = dockerfile
        self.context = context
        self.cache = cache
        self.parsed = parse(dockerfile.read_text())
        self.steps: dict[str, float] = {}
        self.work = Path(tempfile.mkdtemp(prefix="crishim-imgbuild-", dir="/tmp"))

    # keys -------------------------------------------------------------------

    def parent_stage(self, index: int) -> int | None:
        """The earlier stage a stage is built FROM (stage names win, as in Docker)."""
        base = self.parsed.stages[index].base
        for earlier in range(index):
            if self.parsed.stages[earlier].name == base:
                return earlier
        return None

    def initial_state(self, index: int) -> StageState:
        """A stage starts with its parent stage's config (env, workdir, ...)."""
        parent = self.parent_stage(index)
        if parent is None:
            return StageState()
        _, state = self.stage_keys(parent)
        return state

    def start_key(self, index: int) -> str:
        parent = self.parent_stage(index)
        if parent is not None:
            return self.stage_key(parent)
        return self.base_key(self.parsed.stages[index].base)

    def base_key(self, base: str) -> str:
        match = DEBIAN_BASE.match(base)
        if match is None:
            raise DockerfileError(f"FROM {base}: only debian:<suite>[-slim] bases are built")
        return digest_of("base", BUILDER_VERSION, base)

    def instruction_key(self, parent: str, instruction: Instruction, state: StageState) -> str:
        extra = ""
        if instruction.keyword == "COPY":
            sources, _, source_stage = self.copy_sources(instruction)
            if source_stage is not None:
                extra = self.stage_key(source_stage)
            else:
                extra = ",".join(tree_digest(self.context / s) for s in sources)
        return digest_of(parent, instruction.text, json.dumps(state.env, sort_keys=True), extra)

    def stage_keys(self, index: int) -> tuple[list[str], StageState]:
        """The key after each instruction of a stage, and its final state."""
        stage = self.parsed.stages[index]
        key = self.start_key(index)
        state = self.initial_state(index)
        keys = []
        for instruction in stage.instructions:
            key = self.instruction_key(key, instruction, state)
            keys.append(key)
            self.apply_config(instruction, state)
        return keys, state

    def stage_key(self, index: int) -> str:
        keys, _ = self.stage_keys(index)
        return keys[-1] if keys else self.start_key(index)

    def copy_sources(self, instruction: Instruction) -> tuple[list[str], str, int | None]:
        words = instruction.args.split()
        source_stage = None
        if words[0].startswith("--from="):
            source_stage = self.parsed.stage(words[0].removeprefix("--from="))
            words = words[1:]
        elif words[0].startswith("--"):
            raise DockerfileError(f"{instruction.text}: flag not supported")
        return words[:-1], words[-1], source_stage

    # config ------------------------------------------------------------------

    def apply_config(self, instruction: Instruction, state: StageState) -> None:
        keyword = instruction.keyword
        if keyword == "ENV":
            for name, value in env_pairs(instruction.args):
                state.env[name] = substitute(value, state.env)
        elif keyword == "WORKDIR":
            state.workdir = str(
                PurePosixPath(state.workdir, substitute(instruction.args, state.env))
            )
        elif keyword == "USER":
            state.user = instruction.args
        elif keyword == "ENTRYPOINT":
            state.entrypoint = instruction.exec_form()
            state.cmd = None  # Docker resets the base's CMD when ENTRYPOINT is set
        elif keyword == "CMD":
            state.cmd = instruction.exec_form()
        elif keyword not in ("RUN", "COPY", "ARG", "LABEL", "EXPOSE"):
            raise DockerfileError(f"{keyword} is not supported by this builder")
        state.history.append(instruction.text)

    # filesystem ----------------------------------------------------------------

    def snapshot(self, key: str) -> Path:
        return self.cache / "snapshots" / f"{key}.tar"

    def save_snapshot(self, rootfs: Path, key: str) -> None:
        started = time.monotonic()
        path = self.snapshot(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."])
        partial.replace(path)
        self.steps[f"snapshot {key[:12]}"] = time.monotonic() - started

    def restore(self, key: str, rootfs: Path) -> None:
        os.utime(self.snapshot(key))  # recently used: kept by prune()
        run(
            [
                "tar",
                "--numeric-owner",
                "--xattrs",
                "-C",
                str(rootfs),
                "-xf",
                str(self.snapshot(key)),
            ]
        )

    def debootstrap(self, base: str, rootfs: Path) -> None:
        match = DEBIAN_BASE.match(base)
        assert match is not None
        started = time.monotonic()
        excludes = SLIM_DPKG_EXCLUDES if match.group("slim") else ()
        run(
            [
                "mmdebstrap",
                "--mode=root",
                "--variant=minbase",
                # merged /usr as the official images have it, without the usrmerge package
                "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
                *(f"--dpkgopt={rule}" for rule in excludes),
                match.group("suite"),
                str(rootfs),
            ]
        )
        apt_conf = rootfs / "etc" / "apt" / "apt.conf.d"
        for name, text in DEBIAN_IMAGE_APT.items():
            (apt_conf / name).write_text(text)
        run(["chroot", str(rootfs), "apt-get", "clean"])
        shutil.rmtree(rootfs / "var" / "lib" / "apt" / "lists", ignore_errors=True)
        (rootfs / "var" / "lib" / "apt" / "lists" / "partial").mkdir(parents=True)
        # The image's /etc/resolv.conf and /etc/hostname are the runtime's to mount.
        for name in ("etc/resolv.conf", "etc/hostname"):
            (rootfs / name).unlink(missing_ok=True)
        self.steps[f"mmdebstrap {base}"] = time.monotonic() - started

    def run_in(self, rootfs: Path, command: str, state: StageState) -> None:
        """RUN: /bin/sh -c in a chroot with /proc, /dev and the host's DNS and CA
        bundle (both removed afterwards: they are the build host's, not the image's)."""
        started = time.monotonic()
        build_ca = rootfs / "tmp" / ".build-ca.crt"
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", build_ca)
        resolv = rootfs / "etc" / "resolv.conf"
        had_resolv = resolv.exists() or resolv.is_symlink()
        if not had_resolv:
            shutil.copy("/etc/resolv.conf", resolv)
        env = [f"{k}={v}" for k, v in state.env.items()]
        env += ["HOME=/root", "PIP_CERT=/tmp/.build-ca.crt", "DEBIAN_FRONTEND=noninteractive"]
        inner = (
            f"mount -t proc proc {shlex.quote(str(rootfs / 'proc'))}"
            f" && mount --rbind /dev {shlex.quote(str(rootfs / 'dev'))}"
            f" && exec chroot {shlex.quote(str(rootfs))} /usr/bin/env -i "
            + " ".join(shlex.quote(e) for e in env)
            + f" /bin/sh -c {shlex.quote(f'cd {shlex.quote(state.workdir)} && {command}')}"
        )
        try:
            run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", inner])
        finally:
            build_ca.unlink(missing_ok=True)
            if not had_resolv:
                resolv.unlink(missing_ok=True)
        self.steps[f"{rootfs.name}: RUN {command[:40]}"] = time.monotonic() - started

    def copy_in(
        self,
        rootfs: Path,
        instruction: Instruction,
        state: StageState,
        stage_roots: dict[int, Path],
    ) -> None:
        sources, dest, source_stage = self.copy_sources(instruction)
        origin = stage_roots[source_stage] if source_stage is not None else self.context
        target = rootfs / PurePosixPath(state.workdir, dest).relative_to("/")
        into_dir = dest.endswith("/") or len(sources) > 1
        for source in sources:
            path = origin / source.lstrip("/")
            if path.is_dir():
                shutil.copytree(
                    path, target, symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(*IGNORED),
                )  # fmt: skip
            else:
                destination = target / path.name if into_dir else target
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)

    def build_stage(self, index: int, stage_roots: dict[int, Path]) -> StageState:
        """Carry out a stage into a fresh root filesystem, from its last snapshot."""
        stage = self.parsed.stages[index]
        keys, _ = self.stage_keys(index)
        rootfs = self.work / f"stage{index}"
        rootfs.mkdir()
        stage_roots[index] = rootfs
        start = 0
        for position in range(len(keys) - 1, -1, -1):
            if (
                stage.instructions[position].keyword == "RUN"
                and self.snapshot(keys[position]).exists()
            ):
                self.restore(keys[position], rootfs)
                start = position + 1
                break
        else:
            parent = self.parent_stage(index)
            base_key = self.start_key(index)
            if self.snapshot(base_key).exists():
                self.restore(base_key, rootfs)
            elif parent is not None:
                if parent not in stage_roots:
                    self.build_stage(parent, stage_roots)
                run(["cp", "-a", f"{stage_roots[parent]}/.", str(rootfs)])
            else:
                self.debootstrap(stage.base, rootfs)
                self.save_snapshot(rootfs, base_key)
        state = self.initial_state(index)
        for position, instruction in enumerate(stage.instructions):
            if position >= start or instruction.keyword == "WORKDIR":
                self.carry_out(rootfs, instruction, state, stage_roots, keys[position])
            self.apply_config(instruction, state)
        return state

    def carry_out(
        self,
        rootfs: Path,
        instruction: Instruction,
        state: StageState,
        stage_roots: dict[int, Path],
        key: str,
    ) -> None:
        if instruction.keyword == "RUN":
            self.run_in(rootfs, instruction.args, state)
            self.save_snapshot(rootfs, key)
        elif instruction.keyword == "COPY":
            _, _, source_stage = self.copy_sources(instruction)
            if source_stage is not None and source_stage not in stage_roots:
                self.build_stage(source_stage, stage_roots)
            self.copy_in(rootfs, instruction, state, stage_roots)
        elif instruction.keyword == "WORKDIR":
            workdir = PurePosixPath(state.workdir, substitute(instruction.args, state.env))
            (rootfs / workdir.relative_to("/")).mkdir(parents=True, exist_ok=True)

    # image -----------------------------------------------------------------------

    def image_dir(self, key: str) -> Path:
        return self.cache / "images" / key

    def build(self) -> BuiltImage:
        started = time.monotonic()
        final = len(self.parsed.stages) - 1
        key = digest_of("image", LAYER_FORMAT, self.stage_key(final))
        directory = self.image_dir(key)
        with locked(self.cache / ".lock"):
            cached = (directory / "complete").exists()
            if not cached:
                try:
                    stage_roots: dict[int, Path] = {}
                    state = self.build_stage(final, stage_roots)
                    self.export(stage_roots[final], state, directory)
                finally:
                    shutil.rmtree(self.work, ignore_errors=True)
            os.utime(directory)
            image = load_image(directory)
            if not cached:
                prune(self.cache / "images", KEEP_IMAGES)
                prune(self.cache / "snapshots", KEEP_SNAPSHOTS)
        shutil.rmtree(self.work, ignore_errors=True)
        return BuiltImage(image, directory, key, cached, time.monotonic() - started, self.steps)

    def export(self, rootfs: Path, state: StageState, directory: Path) -> None:
        """The root filesystem as one gzip layer, with an OCI config and manifest."""
        started = time.monotonic()
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", str(rootfs),
             "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*", "-cf", "-", "."],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert tar.stdout is not None
        diff = hashlib.sha256()
        with gzip.GzipFile(
            partial / "layer.tar.gz", "wb", compresslevel=GZIP_LEVEL, mtime=0
        ) as out:
            while chunk := tar.stdout.read(1 << 20):
                diff.update(chunk)
                out.write(chunk)
        if tar.wait() != 0:
            raise DockerfileError("tar of the root filesystem failed")
        platform = Platform.host()
        config: dict[str, object] = {"Env": [f"{k}={v}" for k, v in state.env.items()]}
        if state.entrypoint is not None:
            config["Entrypoint"] = state.entrypoint
        if state.cmd is not None:
            config["Cmd"] = state.cmd
        if state.user:
            config["User"] = state.user
        if state.workdir != "/":
            config["WorkingDir"] = state.workdir
        document = {
            **platform.as_dict(),
            "created": CREATED,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff.hexdigest()}"]},
            "history": [{"created": CREATED, "created_by": line} for line in state.history],
        }
        (partial / "config.json").write_bytes(canonical_json(document))
        self.steps["export"] = time.monotonic() - started
        (partial / "steps.json").write_text(json.dumps(self.steps, indent=1))
        # Last: its presence marks a complete image.
        (partial / "complete").write_bytes(b"")
        shutil.rmtree(directory, ignore_errors=True)
        partial.replace(directory)


def prune(directory: Path, keep: int) -> None:
    """Delete all but the `keep` most recently used entries of a cache dir."""
    entries = sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in entries[keep:]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def load_image(directory: Path) -> Image:
    """The cached image as the registry client pushes it."""
    config = Blob(OCI_CONFIG, (directory / "config.json").read_bytes())
    layer = Blob(OCI_LAYER_GZIP, (directory / "layer.tar.gz").read_bytes())
    document = json.loads(config.data)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
    }
    return Image(
        manifest=Blob(OCI_MANIFEST, canonical_json(manifest)),
        config=config,
        layers=(layer,),
        diff_ids=tuple(document["rootfs"]["diff_ids"]),
        platform=Platform(document["architecture"], document["os"]),
    )


def build_daemonset_image() -> BuiltImage:
    """deploy/Dockerfile's image, from the cache when its inputs are unchanged."""
    return Builder().build()
