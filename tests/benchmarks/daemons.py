"""The runtimes the benchmarks compare, each a private containerd confined to its own dir.

* containerd 1.6 (Debian's, `containerd` on PATH) and 2.x (the peer build,
  tests/peers/build.sh) WITH their built-in CRI plugin: the anchors users run;
* the same two WITHOUT it, for `cri-shim serve` to drive.

containerd 2.x reads a `version = 3` config: its CRI is split into
`io.containerd.cri.v1.runtime` / `io.containerd.cri.v1.images` (plus
`io.containerd.grpc.v1.cri` for the streaming server), registry mirrors come
only from `config_path` (hosts.toml), and NRI's socket, a fixed host path by
default, is moved into the daemon's dir. Each daemon starts with its own
binary's directory first on PATH, so it runs its own containerd-shim-runc-v2.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cri_shim.containerd import embedded
from cri_shim.containerd.embedded import EmbeddedContainerd
from tests.conftest import ShimProcess, start_shim_process
from tests.pods import CNI_BIN, write_conflist, write_shim_config
from tests.support.peers import PeerMissing, peer_path
from tests.support.reaper import reap

SANDBOX_IMAGE = "registry.k8s.io/pause:3.9"
CRI_PLUGINS_V2 = (
    "io.containerd.cri.v1.runtime",
    "io.containerd.cri.v1.images",
    embedded.CRI_PLUGIN,
)


def peer(name: str) -> str:
    """A peer binary ($NAME, else tests/peers/build.sh's build); a benchmark
    stops with the reason when it is missing."""
    try:
        return peer_path(name)
    except PeerMissing as err:
        raise SystemExit(str(err)) from err


def binary_version(binary: str) -> str:
    """`containerd --version`'s version field: "1.6.20~ds1", "v2.4.2"."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split()[2]


@dataclass(frozen=True)
class ContainerdBuild:
    binary: str
    version: str

    @property
    def major(self) -> int:
        return int(self.version.lstrip("v").split(".")[0])

    @property
    def label(self) -> str:
        """ "1.6" or "2.4": the line a column stands for."""
        return ".".join(self.version.lstrip("v").split(".")[:2])

    @classmethod
    def find(cls, binary: str) -> ContainerdBuild:
        path = shutil.which(binary)
        if path is None:
            raise SystemExit(f"containerd binary {binary!r} not found")
        return cls(path, binary_version(path))


def _v3_config(base: Path, disabled: tuple[str, ...]) -> list[str]:
    """The parts of a version-3 config that confine the daemon to `base`."""
    return [
        "version = 3",
        f'root = "{base / "root"}"',
        f'state = "{base / "state"}"',
        "disabled_plugins = [{}]".format(", ".join(f'"{p}"' for p in disabled)),
        "",
        "[grpc]",
        f'  address = "{base / "containerd.sock"}"',
        "[ttrpc]",
        f'  address = "{base / "containerd.sock.ttrpc"}"',
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{base / "opt"}"',
        '[plugins."io.containerd.nri.v1.nri"]',
        f'  socket_path = "{base / "nri.sock"}"',
        "",
    ]


def _cri_v2(cni_dir: Path, hosts_dir: Path) -> list[str]:
    """containerd 1.6/1.7's CRI section (config version 2)."""
    cri = f'plugins."{embedded.CRI_PLUGIN}"'
    return [
        f"[{cri}]",
        f'  sandbox_image = "{SANDBOX_IMAGE}"',
        "  restrict_oom_score_adj = true",  # this VM refuses negative oom_score_adj
        "  disable_apparmor = true",
        f"  [{cri}.cni]",
        f'    bin_dir = "{CNI_BIN}"',
        f'    conf_dir = "{cni_dir}"',
        f"  [{cri}.registry]",
        f'    config_path = "{hosts_dir}"',
        f"  [{cri}.containerd]",
        '    default_runtime_name = "runc"',
        f"  [{cri}.containerd.runtimes.runc]",
        '    runtime_type = "io.containerd.runc.v2"',
        f"  [{cri}.containerd.runtimes.runc.options]",
        "    SystemdCgroup = false",
        "",
    ]


def _cri_v3(cni_dir: Path, hosts_dir: Path) -> list[str]:
    """containerd 2.x's CRI sections (config version 3): the same settings, split."""
    images = 'plugins."io.containerd.cri.v1.images"'
    runtime = 'plugins."io.containerd.cri.v1.runtime"'
    return [
        f"[{images}]",
        f"  [{images}.pinned_images]",
        f'    sandbox = "{SANDBOX_IMAGE}"',
        f"  [{images}.registry]",
        f'    config_path = "{hosts_dir}"',
        f"[{runtime}]",
        "  restrict_oom_score_adj = true",
        "  disable_apparmor = true",
        f"  [{runtime}.cni]",
        f'    bin_dirs = ["{CNI_BIN}"]',
        f'    conf_dir = "{cni_dir}"',
        f"  [{runtime}.containerd]",
        '    default_runtime_name = "runc"',
        f"    [{runtime}.containerd.runtimes.runc]",
        '      runtime_type = "io.containerd.runc.v2"',
        f"      [{runtime}.containerd.runtimes.runc.options]",
        "        SystemdCgroup = false",
        "",
    ]


class BenchContainerd(EmbeddedContainerd):
    """A private containerd of a given build, with or without its CRI plugin
    (with it: `cni_dir` and `hosts_dir` are its CNI config and registry mirrors)."""

    def __init__(
        self,
        base: Path,
        build: ContainerdBuild,
        *,
        cni_dir: Path | None = None,
        hosts_dir: Path | None = None,
    ) -> None:
        super().__init__(base, binary=build.binary, restart=False, start_timeout=60.0)
        self.build = build
        self.cni_dir = cni_dir
        self.hosts_dir = hosts_dir

    @property
    def with_cri(self) -> bool:
        return self.cni_dir is not None and self.hosts_dir is not None

    def render(self) -> str:
        if self.build.major < 2:
            text = embedded.render_config(self.base)
            if not self.with_cri:
                return text
            assert self.cni_dir is not None and self.hosts_dir is not None
            text = text.replace(
                f'disabled_plugins = ["{embedded.CRI_PLUGIN}"]', "disabled_plugins = []"
            )
            return text + "\n".join(_cri_v2(self.cni_dir, self.hosts_dir))
        if not self.with_cri:
            return "\n".join(_v3_config(self.base, CRI_PLUGINS_V2))
        assert self.cni_dir is not None and self.hosts_dir is not None
        return "\n".join(_v3_config(self.base, ()) + _cri_v3(self.cni_dir, self.hosts_dir))

    def _prepare(self) -> None:
        super()._prepare()
        self.config_path.write_text(self.render())

    async def _launch(self, path: str) -> None:
        with _path_first(Path(path).parent):
            await super()._launch(path)


@contextlib.contextmanager
def _path_first(directory: Path) -> Iterator[None]:
    """`directory` first on PATH while a daemon is spawned (it inherits the
    environment): the containerd-shim-runc-v2 beside a containerd build is the one
    that build must run. The benchmarks start their daemons one at a time."""
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(directory), saved])
    try:
        yield
    finally:
        os.environ["PATH"] = saved


@dataclass(frozen=True)
class Pair:
    """A containerd line: its built-in CRI (the anchor) and cri-shim on the same build."""

    build: ContainerdBuild

    @property
    def anchor(self) -> str:
        return f"containerd {self.build.label} CRI"

    @property
    def shim(self) -> str:
        return f"cri-shim on {self.build.label}"


def default_builds(
    containerd2: str | None, *, with_containerd2: bool = True
) -> list[ContainerdBuild]:
    """containerd on PATH (Debian's 1.6), then the 2.x peer unless left out."""
    builds = [ContainerdBuild.find("containerd")]
    if with_containerd2:
        builds.append(ContainerdBuild.find(containerd2 or peer("CONTAINERD2")))
    return builds


@dataclass
class Runtimes:
    """The CRI endpoints of every pair's two runtimes, by column name, and the shims."""

    pairs: list[Pair]
    endpoints: dict[str, str] = field(default_factory=dict)
    shims: dict[str, ShimProcess] = field(default_factory=dict)
    # Each column's containerd (the anchor's own; the one a shim drives).
    containerds: dict[str, BenchContainerd] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [name for pair in self.pairs for name in (pair.anchor, pair.shim)]

    def shim_pids(self) -> dict[str, int]:
        return {name: shim.process.pid for name, shim in self.shims.items()}


@contextlib.asynccontextmanager
async def start_runtimes(
    base: Path, builds: list[ContainerdBuild], hosts_dir: Path, subnet_prefix: str
) -> AsyncIterator[Runtimes]:
    """Per build: a containerd with its CRI, and `cri-shim serve` over one without it;
    each runtime with its own CNI bridge (a /24 of `subnet_prefix`, e.g. "10.237"),
    all pulling through the mirrors in `hosts_dir`. Everything is stopped and the
    bridges deleted on exit (containers must be removed by then)."""
    runtimes = Runtimes([Pair(build) for build in builds])
    octet = random.randrange(10, 240 - 2 * len(builds))
    bridges: list[str] = []
    daemons: list[BenchContainerd] = []
    try:
        for i, pair in enumerate(runtimes.pairs):
            anchor_dir, shim_dir = base / f"cd{i}", base / f"shim{i}"
            for j, directory in enumerate((anchor_dir, shim_dir)):
                # A name of its own: another run (or a crashed one's leftover bridge)
                # may hold the same octet under another subnet prefix.
                bridge = f"crivs{random.getrandbits(32):08x}"
                bridges.append(bridge)
                subnet = f"{subnet_prefix}.{octet + 2 * i + j}.0/24"
                write_conflist(directory / "cni", subnet, bridge, directory / "ipam")
            anchor = BenchContainerd(
                anchor_dir / "d", pair.build, cni_dir=anchor_dir / "cni", hosts_dir=hosts_dir
            )
            daemons.append(anchor)
            await anchor.start()
            runtimes.endpoints[pair.anchor] = anchor.address
            runtimes.containerds[pair.anchor] = anchor
            plain = BenchContainerd(shim_dir / "d", pair.build)
            daemons.append(plain)
            await plain.start()
            runtimes.containerds[pair.shim] = plain
            config = write_shim_config(shim_dir, hosts_dir, plain.address)
            runtimes.shims[pair.shim] = await start_shim_process(
                ["--config", str(config)], shim_dir / "cri.sock", shim_dir / "shim.log"
            )
            runtimes.endpoints[pair.shim] = str(shim_dir / "cri.sock")
        yield runtimes
    finally:
        for shim in runtimes.shims.values():
            if shim.process.returncode is None:
                shim.process.send_signal(signal.SIGTERM)
                await shim.process.wait()
        for daemon in daemons:
            await daemon.stop()
        for bridge in bridges:
            subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)
        # What a failed run left running, and the shims' netns dir mounts.
        await asyncio.to_thread(reap, base)
