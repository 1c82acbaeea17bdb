"""A real kubelet with no API server, and the runtimes it drives, for the
end-to-end tests (tests/test_kubelet.py).

kubelet runs static pods from a manifest directory, against any CRI socket,
with its own root dir, pod log dir, ports and cgroup root, so it touches
nothing of the host's own node set-up. Without an API server its `/pods`
endpoint serves the static pods with the status kubelet's status manager
computed (the status a mirror pod would carry), which is what the tests read.
containerd 2.x with its built-in CRI is run the same way, as the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cri_shim.containerd.client import ContainerdClient

from .catalog import ServedCatalog
from .registry import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
PEERS_BUILD = ROOT / "tests" / "peers" / "build.sh"
CGROUP_V1_ROOT = Path("/sys/fs/cgroup")
# Container logs kubelet symlinks for log shippers; a fixed path in kubelet.
CONTAINER_LOG_LINKS = Path("/var/log/containers")


def peer_binaries(*groups: str) -> dict[str, str]:
    """NAME -> path of the peers built by tests/peers/build.sh (cached: a
    version already built costs nothing; the first call builds it)."""
    done = subprocess.run(
        ["bash", str(PEERS_BUILD), *groups], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"tests/peers/build.sh {' '.join(groups)} failed:\n{done.stderr}")
    found = {}
    for line in done.stdout.splitlines():
        name, _, path = line.partition("=")
        if path:
            found[name] = path
    return found


def cgroup_v1_hierarchies(*, with_v2: bool = False) -> list[Path]:
    """Mount points of the cgroup v1 hierarchies (cpu, memory, name=systemd, ...),
    and with `with_v2` the hybrid host's cgroup2 mount too."""
    kinds = ("cgroup", "cgroup2") if with_v2 else ("cgroup",)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] in kinds:
            points.append(Path(left.split()[4]))
    return points


def make_cgroup_root(name: str) -> None:
    """kubelet refuses a `cgroupRoot` missing from any hierarchy."""
    for hierarchy in cgroup_v1_hierarchies():
        (hierarchy / name.strip("/")).mkdir(exist_ok=True)


def remove_cgroup_tree(name: str) -> None:
    """Remove a cgroup subtree in every hierarchy (kubelet mirrors its tree in
    the hybrid host's cgroup2 mount), deepest first: only empty cgroups can go,
    the tests have killed every process in it before."""
    for hierarchy in cgroup_v1_hierarchies(with_v2=True):
        top = hierarchy / name.strip("/")
        if not top.is_dir():
            continue
        dirs = [Path(d) for d, _, _ in os.walk(top)]
        for directory in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()


def cgroup_of(pid: int, controller: str) -> Path:
    """The host path of a process's cgroup in one v1 controller."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP_V1_ROOT / controller / path.lstrip("/")
    raise LookupError(f"process {pid} has no {controller} cgroup")


@dataclass
class Kubelet:
    """One kubelet process; `start`/`stop`/`kill` may be called again (same root dir)."""

    binary: str
    base: Path
    runtime_endpoint: str
    node_name: str
    feature_gates: Mapping[str, bool] = field(default_factory=dict)
    verbosity: int = 2
    port: int = field(default_factory=free_port)
    healthz_port: int = field(default_factory=free_port)
    cgroup_root: str = field(default_factory=lambda: f"/crishim-kubelet-{uuid.uuid4().hex[:8]}")
    # Run through this first (e.g. nsenter into a node's mount namespace).
    command_prefix: tuple[str, ...] = ()
    process: asyncio.subprocess.Process | None = None

    @property
    def manifests(self) -> Path:
        return self.base / "manifests"

    @property
    def root_dir(self) -> Path:
        return self.base / "root"

    @property
    def pod_logs(self) -> Path:
        return self.base / "pod-logs"

    @property
    def log_path(self) -> Path:
        return self.base / "kubelet.log"

    @property
    def config_path(self) -> Path:
        return self.base / "kubelet-config.json"

    def config(self) -> dict[str, Any]:
        return {
            "kind": "KubeletConfiguration",
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "staticPodPath": str(self.manifests),
            "fileCheckFrequency": "1s",
            "syncFrequency": "10s",
            "containerRuntimeEndpoint": f"unix://{self.runtime_endpoint}",
            "cgroupDriver": "cgroupfs",
            # These hosts mount cgroup v1; kubelet 1.35+ refuses it unless told.
            "failCgroupV1": False,
            "cgroupRoot": self.cgroup_root,
            "failSwapOn": False,
            "address": "127.0.0.1",
            "port": self.port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            "authentication": {
                "anonymous": {"enabled": True},
                "webhook": {"enabled": False},
                "x509": {},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": str(self.pod_logs),
            # Small enough that kubelet rotates the loggers' files during the run;
            # enough files that rotation never deletes a line the tests count.
            "containerLogMaxSize": "4Ki",
            "containerLogMaxFiles": 200,
            "containerLogMonitorInterval": "3s",
            "volumePluginDir": str(self.base / "volume-plugins"),
            # Neither evict the tests' pods nor collect their images on a full disk.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "0%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "featureGates": dict(self.feature_gates),
        }

    async def start(self, timeout: float = 90.0) -> None:
        """Start kubelet and wait for its /healthz on both ports."""
        for directory in (self.manifests, self.root_dir, self.pod_logs):
            directory.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(make_cgroup_root, self.cgroup_root)
        self.config_path.write_text(json.dumps(self.config(), indent=1))
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command_prefix,
                self.binary,
                f"--config={self.config_path}",
                f"--root-dir={self.root_dir}",
                f"--cert-dir={self.root_dir / 'pki'}",
                f"--hostname-override={self.node_name}",
                f"--v={self.verbosity}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise AssertionError(
                    f"kubelet exited {self.process.returncode}:\n{self.log_tail()}"
                )
            if await self.healthy() and await self.serving():
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"kubelet not healthy within {timeout}s:\n{self.log_tail()}")

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, as systemd stops it: kubelet exits and leaves pods running."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def healthy(self) -> bool:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"http://127.0.0.1:{self.healthz_port}/healthz",
                    timeout=aiohttp.ClientTimeout(total=3),
                ) as reply,
            ):
                return reply.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def serving(self) -> bool:
        """The authenticated port answers (it opens after the healthz port)."""
        try:
            return await self.get_text("/healthz") == "ok"
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def get_text(self, path: str) -> str:
        """GET on kubelet's authenticated port (anonymous, AlwaysAllow)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"https://127.0.0.1:{self.port}{path}",
                ssl=False,
                timeout=aiohttp.ClientTimeout(total=20),
            ) as reply,
        ):
            reply.raise_for_status()
            return await reply.text()

    async def get(self, path: str) -> Any:
        """The same, decoded as JSON."""
        return json.loads(await self.get_text(path))

    async def pods(self) -> dict[str, dict[str, Any]]:
        """kubelet's /pods: static pods by their manifest name (kubelet appends
        `-<node name>`), each with the status kubelet computed."""
        listed = await self.get("/pods")
        suffix = f"-{self.node_name}"
        return {
            item["metadata"]["name"].removesuffix(suffix): item for item in listed["items"] or []
        }

    def log_tail(self, lines: int = 200) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cleanup(self) -> None:
        remove_cgroup_tree(self.cgroup_root)
        # The /var/log/containers links kubelet made for this node's pods.
        if CONTAINER_LOG_LINKS.is_dir():
            for link in CONTAINER_LOG_LINKS.iterdir():
                with contextlib.suppress(OSError):
                    if link.is_symlink() and os.readlink(link).startswith(str(self.pod_logs)):
                        link.unlink()


def hosts_dir_with_local(served: ServedCatalog, dest: Path) -> Path:
    """Mirrors for the upstream hosts, plus plain http for the local registry
    (containerd 2 needs that said; cri-shim assumes it for loopback)."""
    served.write_hosts_dir(dest)
    local = served.endpoint("local")
    (dest / local).mkdir(parents=True, exist_ok=True)
    (dest / local / "hosts.toml").write_text(
        f'server = "http://{local}"\n\n[host."http://{local}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    return dest


def containerd2_config(base: Path, conf_dir: Path, hosts_dir: Path, sandbox_image: str) -> str:
    """containerd 2.x (config version 3) with its built-in CRI, confined to `base`."""
    return f"""version = 3
root = "{base / "root"}"
state = "{base / "state"}"
# NRI listens on a fixed host socket; the tests' containerds must not share it.
disabled_plugins = ["io.containerd.nri.v1.nri"]
[grpc]
  address = "{base / "containerd.sock"}"
[ttrpc]
  address = "{base / "containerd.sock.ttrpc"}"
[plugins.'io.containerd.internal.v1.opt']
  path = "{base / "opt"}"
[plugins.'io.containerd.cri.v1.runtime']
  # This VM refuses negative oom_score_adj (no CAP_SYS_RESOURCE).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = 'io.containerd.runc.v2'
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['/usr/lib/cni']
    conf_dir = '{conf_dir}'
[plugins.'io.containerd.cri.v1.images']
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{sandbox_image}'
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = '{hosts_dir}'
[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
"""


@dataclass
class Containerd2:
    """containerd 2.x from the peers, with its own runc shim first on PATH."""

    binary: str
    base: Path
    config: str
    # Run through this first (e.g. nsenter into a node's mount namespace).
    command_prefix: tuple[str, ...] = ()
    process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return str(self.base / "containerd.sock")

    @property
    def log_path(self) -> Path:
        return self.base / "containerd.log"

    async def start(self, timeout: float = 60.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        config_path = self.base / "config.toml"
        config_path.write_text(self.config)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        env = dict(os.environ)
        env["PATH"] = f"{Path(self.binary).parent}:{env.get('PATH', '/usr/sbin:/usr/bin')}"
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command_prefix,
                self.binary,
                "--config",
                str(config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        client = ContainerdClient(self.address, "default")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                if self.process.returncode is not None:
                    raise AssertionError(f"containerd 2 exited; see {self.log_path}")
                if await client.is_serving(timeout=1.0):
                    return
                await asyncio.sleep(0.1)
        finally:
            client.close()
        raise AssertionError(f"containerd 2 did not serve within {timeout}s")

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> None:
        if self.process is not None:
            await self.process.wait()

    async def stop(self, timeout: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float, interval: float = 0.3
) -> None:
    """Poll a kubelet-side condition (pods come up on kubelet's own sync period);
    fails naming what never happened."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"never {what}")
        await asyncio.sleep(interval)
