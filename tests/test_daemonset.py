"""deploy/Dockerfile's image and deploy/kubernetes/daemonset.yaml's pod, run
the way a node runs them.

The image is built from the Dockerfile without a Docker engine
(tests/support/dockerfile.py: an mmdebstrap root filesystem, the RUN steps in
a chroot, cached outside the checkout) and pushed to the test registry. Then
a test node comes up: containerd 2.4.2 with its built-in CRI (the node's
runtime, whose socket is the node's /run/containerd/containerd.sock) and a
kubelet on it, running the DaemonSet's pod template as a static pod. The shim
in that pod serves /run/cri-shim/cri-shim.sock on the node and keeps its
containers in the same containerd, namespace `cri-shim`, as the manifest
promises. crictl on the host runs a pod through it, and a second kubelet
(the node's /var/lib/kubelet and /var/log/pods, its own ports and cgroup root)
runs a static pod through it. Both kubelets run at once.

The node's paths: the manifest mounts each host path at the same path in the
pod, because the shim hands containerd paths as it sees them (its state dir,
netns pins, kubelet's volumes and log dirs); redirecting a hostPath elsewhere
would break exactly that. So the node gets a mount namespace of its own
(`unshare --mount`, held by a sleeping process) in which a private directory
is bind-mounted over each writable path the manifest names; containerd 2,
both kubelets and everything they start live in it, and the real node's
/run/containerd, /var/lib/kubelet, /etc/cni/net.d ... are never touched.
Only Debian's read-only CNI plugin dir (/usr/lib/cni) is the host's own.
The pod template is used unchanged except for `image:`, its ConfigMap
volume and `serviceAccountName` (kubelet refuses static pods naming either:
it has no API server to read them from): the ConfigMap's config.toml is
written to a directory mounted in the ConfigMap's place, with
`runtime.cgroup_driver = "cgroupfs"` (this host has no systemd; the manifest
says to set kubelet's driver there).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import ipaddress
import json
import os
import random
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tarfile
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import pytest_asyncio
import yaml

from cri_shim import __version__
from cri_shim.gen.runtime import v1 as cri

from .conftest import CriClient, short_tempdir
from .pods import write_conflist
from .support.catalog import ServedCatalog
from .support.dockerfile import DOCKERFILE, BuiltImage, build_daemonset_image
from .support.kubelet import (
    Containerd2,
    Kubelet,
    containerd2_config,
    hosts_dir_with_local,
    remove_cgroup_tree,
)
from .support.kubelet import (
    wait_until as wait_for_node,
)
from .support.peers import require_peer
from .support.reaper import reap
from .support.tools import require_tool

# A cold image build takes minutes (mmdebstrap, apt, pip): more than the
# suite's per-test timeout allows the first test's fixtures.
pytestmark = [pytest.mark.containerd, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
DAEMONSET = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"
PYPROJECT = ROOT / "pyproject.toml"
SANDBOX_IMAGE = "registry.k8s.io/pause:3.9"
# Host paths of the manifest kept as the host's own: read-only system files.
HOST_SHARED = {"/usr/lib/cni"}
# Written by the second kubelet (links to its pods' logs), not in the manifest.
NODE_EXTRA = ("/var/log/containers",)
WAIT = 300.0
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ------------------------------------------------------------------- the manifest


def daemonset_docs() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(DAEMONSET.read_text()) if doc]


def manifest(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in daemonset_docs() if doc["kind"] == kind]
    return found


def pod_template() -> dict[str, Any]:
    template: dict[str, Any] = copy.deepcopy(manifest("DaemonSet")["spec"]["template"])
    return template


def manifest_host_paths() -> list[str]:
    return [v["hostPath"]["path"] for v in pod_template()["spec"]["volumes"] if "hostPath" in v]


def node_config_toml() -> str:
    """The ConfigMap's config, with this host's cgroup driver (no systemd here)."""
    text: str = manifest("ConfigMap")["data"]["config.toml"]
    line = 'cgroup_driver = "systemd"'
    assert text.count(line) == 1, "the ConfigMap's cgroup_driver line changed"
    return text.replace(line, 'cgroup_driver = "cgroupfs"')


def static_pod(image: str, config_dir: Path) -> dict[str, Any]:
    """The DaemonSet's pod template as a static pod: only the image, the
    ConfigMap volume and the service account differ (kubelet refuses static
    pods that name either: it has no API server to read them from)."""
    template = pod_template()
    spec = template["spec"]
    assert spec.pop("serviceAccountName") == "cri-shim"
    (container,) = spec["containers"]
    container["image"] = image
    volumes = spec["volumes"]
    (config,) = [v for v in volumes if "configMap" in v]
    volumes[volumes.index(config)] = {
        "name": config["name"],
        "hostPath": {"path": str(config_dir), "type": "Directory"},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "cri-shim",
            "namespace": manifest("DaemonSet")["metadata"]["namespace"],
            "labels": template["metadata"]["labels"],
        },
        "spec": spec,
    }


# ----------------------------------------------------------------- the Dockerfile


def final_stage(text: str) -> list[str]:
    """The last stage's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last_from:]


def instruction(lines: list[str], keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in lines if line.split(None, 1)[0] == keyword]


@dataclass
class LayerView:
    """The image's one layer: members by path, read once."""

    members: dict[str, tarfile.TarInfo]
    files: dict[str, bytes]

    @classmethod
    def read(cls, data: bytes, wanted: Callable[[str], bool]) -> LayerView:
        members: dict[str, tarfile.TarInfo] = {}
        files: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for member in archive:
                name = member.name.removeprefix("./").rstrip("/")
                members[name] = member
                if member.isfile() and wanted(name):
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    files[name] = extracted.read()
        return cls(members, files)

    def resolve(self, path: str) -> tarfile.TarInfo | None:
        """A path's member, following symlinks (merged /usr: /bin -> usr/bin)."""
        pending = list(PurePosixPath("/", path).parts[1:])
        current: list[str] = []
        member = self.members.get(".")
        for _ in range(200):
            if not pending:
                return member
            part = pending.pop(0)
            if part == "..":
                current = current[:-1]
                continue
            current.append(part)
            member = self.members.get("/".join(current))
            if member is None:
                return None
            if member.issym():
                target = PurePosixPath(member.linkname)
                current = [] if target.is_absolute() else current[:-1]
                pending = [p for p in target.parts if p not in ("/", ".")] + pending
        return None


@pytest.fixture(scope="module")
def daemonset_image() -> BuiltImage:
    """The image, built (or taken from the cache) once for the module."""
    require_tool("mmdebstrap", "mmdebstrap")
    built = build_daemonset_image()
    how = "from the cache" if built.cached else "built"
    print(f"daemonset image {built.image.digest} {how} in {built.seconds:.1f}s: {built.steps}")
    return built


def test_built_image_matches_the_dockerfile(daemonset_image: BuiltImage) -> None:
    """Entrypoint, cmd, user, workdir, environment, paths and Python version of
    the built image are those the Dockerfile's final stage declares."""
    lines = final_stage(DOCKERFILE.read_text())
    config = daemonset_image.image.config_json["config"]
    assert isinstance(config, dict)
    (entrypoint,) = instruction(lines, "ENTRYPOINT")
    assert config["Entrypoint"] == json.loads(entrypoint)
    # ENTRYPOINT without CMD: Docker clears the base image's CMD.
    assert config.get("Cmd") == ([json.loads(c) for c in instruction(lines, "CMD")] or [None])[0]
    assert config.get("User", "") == (instruction(lines, "USER") or [""])[-1]
    assert config.get("WorkingDir", "") == (instruction(lines, "WORKDIR") or [""])[-1]
    env = dict(item.split("=", 1) for item in config["Env"])
    for declared in instruction(lines, "ENV"):
        for word in shlex.split(declared):
            name, _, value = word.partition("=")
            # $PATH: the Debian base image's own.
            assert env[name] == value.replace("$PATH", DEBIAN_PATH), name
    # The Python the final stage installs, the one the project is typed for.
    installed = {m.group(0) for m in re.finditer(r"python3\.\d+", " ".join(lines))}
    (python,) = installed
    version = python.removeprefix("python")
    pyproject = tomllib.loads(PYPROJECT.read_text())
    assert pyproject["tool"]["mypy"]["python_version"] == version
    assert pyproject["project"]["requires-python"] == f">={version}"

    venv = "opt/cri-shim"
    layer = LayerView.read(
        daemonset_image.image.layers[0].data,
        lambda name: (
            name in (f"{venv}/pyvenv.cfg", "etc/cri-shim/config.toml")
            or (name.endswith("METADATA") and "/cri_shim-" in name)
        ),
    )
    assert layer.resolve(f"/usr/bin/{python}") is not None
    pyvenv = dict(
        line.split(" = ", 1) for line in layer.files[f"{venv}/pyvenv.cfg"].decode().splitlines()
    )
    assert pyvenv["version"].startswith(version + "."), pyvenv
    assert pyvenv["executable"] == f"/usr/bin/{python}"
    # The entrypoint's program is found on the image's PATH, in the venv.
    program = config["Entrypoint"][0]
    found = [d for d in env["PATH"].split(":") if layer.resolve(f"{d}/{program}") is not None]
    assert found and found[0] == f"/{venv}/bin", found
    # The config file the entrypoint names is deploy/config.toml, where COPY puts it.
    (copy_line,) = [c for c in instruction(lines, "COPY") if not c.startswith("--from")]
    source, destination = copy_line.split()
    assert destination in config["Entrypoint"]
    assert layer.files[destination.lstrip("/")] == (ROOT / source).read_bytes()
    (metadata,) = [
        data for name, data in layer.files.items() if name.startswith(f"{venv}/lib/{python}")
    ]
    assert f"\nVersion: {__version__}\n" in metadata.decode()
    # The builder's leftovers stay out of the final image.
    for leftover in ("wheels", "src", "build", "root/.cache/pip"):
        assert leftover not in layer.members, leftover
    assert not any(name.startswith("var/lib/apt/lists/") and name.endswith("Packages")
                   for name in layer.members)  # fmt: skip


# ---------------------------------------------------------------------- the node


@dataclass
class NodeMounts:
    """A mount namespace for the test node: a private directory over each node
    path, shared so the pod's Bidirectional and HostToContainer mounts work."""

    base: Path
    holder: asyncio.subprocess.Process
    created: list[Path] = field(default_factory=list)
    private: dict[str, Path] = field(default_factory=dict)

    @classmethod
    async def create(cls, base: Path, paths: list[str]) -> NodeMounts:
        holder = await asyncio.create_subprocess_exec(
            "unshare", "--mount", "--propagation", "private", "sleep", "infinity",
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        mounts = cls(base, holder)
        ours = os.readlink("/proc/self/ns/mnt")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == ours:
            assert loop.time() < deadline, "unshare never entered its mount namespace"
            await asyncio.sleep(0.05)
        # Its copies of the host's mounts, private from the host since unshare,
        # shared among themselves as on a systemd host (containerd requires it
        # of the Bidirectional and HostToContainer mounts' sources).
        await mounts.nsenter("mount", "--make-rshared", "/")
        for path in paths:
            await mounts.bind(path)
        return mounts

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("nsenter", f"--target={self.holder.pid}", "--mount", "--")

    async def bind(self, path: str) -> None:
        private = self.base / "node" / path.strip("/").replace("/", "-")
        private.mkdir(parents=True)
        # The mount point itself must exist; made on the host only when missing.
        point = Path(os.path.realpath(path))
        missing = [p for p in (point, *point.parents) if not p.exists()]
        point.mkdir(parents=True, exist_ok=True)
        self.created += sorted(missing, key=lambda p: len(p.parts))
        await self.nsenter("mount", "--bind", str(private), path)
        self.private[path] = private

    async def nsenter(self, *command: str) -> None:
        done = await asyncio.create_subprocess_exec(
            *self.prefix, *command, stderr=asyncio.subprocess.PIPE
        )
        _, err = await done.communicate()
        assert done.returncode == 0, f"{command}: {err.decode()}"

    def host(self, node_path: str) -> Path:
        """Where a node path's private directory is, seen from the test."""
        for path, private in self.private.items():
            if node_path == path or node_path.startswith(path + "/"):
                return private / node_path.removeprefix(path).lstrip("/")
        raise KeyError(node_path)

    async def close(self) -> None:
        if self.holder.returncode is None:
            self.holder.kill()
            await self.holder.wait()
        for made in reversed(self.created):
            with contextlib.suppress(OSError):
                made.rmdir()


@dataclass
class NodeKubelet(Kubelet):
    """A kubelet at the node's own paths, the ones the DaemonSet mounts: the
    shim checks and hands containerd the paths kubelet sends as they are."""

    @property
    def root_dir(self) -> Path:
        return Path("/var/lib/kubelet")

    @property
    def pod_logs(self) -> Path:
        return Path("/var/log/pods")

    def cleanup(self) -> None:
        # Its /var/log/containers links were in the node's private directory.
        remove_cgroup_tree(self.cgroup_root)


@dataclass
class DaemonSetNode:
    base: Path
    mounts: NodeMounts
    containerd: Containerd2
    kubelet: Kubelet
    second: NodeKubelet
    image: str
    busybox: str
    subnet: ipaddress.IPv4Network
    crictl: str
    ctr: str

    @property
    def shim_socket(self) -> Path:
        """The socket the manifest promises on the node, seen from the test."""
        config = tomllib.loads(node_config_toml())
        return self.mounts.host(config["server"]["socket"])

    def shim_client(self) -> CriClient:
        return CriClient.connect(self.shim_socket)

    async def shim_pod(self) -> dict[str, Any] | None:
        return (await self.kubelet.pods()).get("cri-shim")

    async def crictl_run(self, *args: str) -> str:
        endpoint = f"unix://{self.shim_socket}"
        process = await asyncio.create_subprocess_exec(
            self.crictl, "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
            "--timeout", "120s", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        assert process.returncode == 0, f"crictl {' '.join(args)}: {err.decode()}"
        return out.decode()

    async def ctr_tasks(self, namespace: str) -> str:
        process = await asyncio.create_subprocess_exec(
            self.ctr, "--address", self.containerd.address, "--namespace", namespace,
            "tasks", "list",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        return out.decode()

    def shim_log(self) -> str:
        logs = sorted(self.kubelet.pod_logs.glob("cri-shim_cri-shim_*/cri-shim/*.log"))
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-80:]) if logs else ""


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    await wait_for_node(predicate, what, timeout=WAIT)


def require_free_port(port: int) -> None:
    """The manifest's metrics port is a fixed host port (hostNetwork)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            pytest.fail(
                f"127.0.0.1:{port} (the DaemonSet's metrics port) is in use on this host: {err}",
                pytrace=False,
            )


@pytest_asyncio.fixture(scope="module")
async def node(
    daemonset_image: BuiltImage, pod_images: ServedCatalog
) -> AsyncIterator[DaemonSetNode]:
    config = tomllib.loads(node_config_toml())
    require_free_port(config["metrics"]["port"])
    kubelet_binary = require_peer("KUBELET")
    containerd_binary = require_peer("CONTAINERD2")
    registry = pod_images.registries["local"]
    await registry.push("cri-shim", __version__, daemonset_image.image)
    image = f"{registry.host}/cri-shim:{__version__}"

    base = short_tempdir("crishim-ds-")
    paths = [p for p in manifest_host_paths() if p not in HOST_SHARED] + list(NODE_EXTRA)
    mounts = await NodeMounts.create(base, paths)
    octet = random.randrange(10, 250)
    bridge = f"crids{octet}"
    subnet = ipaddress.IPv4Network(f"10.236.{octet}.0/24")
    # One CNI network for the node, host-local leases in the node's /var/lib/cni:
    # containerd's CRI and the shim in the pod allocate from the same pool.
    write_conflist(
        mounts.host(config["cni"]["conf_dir"]), str(subnet), bridge, Path("/var/lib/cni/networks")
    )
    certs = hosts_dir_with_local(pod_images, mounts.host(config["registry"]["config_path"]))
    # The node's containerd: its state and socket are the node's /run/containerd.
    containerd_dir = mounts.host(str(PurePosixPath(config["containerd"]["address"]).parent))
    containerd = Containerd2(
        containerd_binary,
        containerd_dir,
        containerd2_config(
            containerd_dir, mounts.host(config["cni"]["conf_dir"]), certs, SANDBOX_IMAGE
        ),
        command_prefix=mounts.prefix,
    )
    kubelet = Kubelet(
        kubelet_binary,
        base / "kubelet",
        containerd.address,
        "node-daemonset",
        command_prefix=mounts.prefix,
    )
    second = NodeKubelet(
        kubelet_binary,
        base / "kubelet2",
        config["server"]["socket"],
        "node-through-shim",
        command_prefix=mounts.prefix,
    )
    config_dir = base / "cri-shim-config"
    config_dir.mkdir()
    (config_dir / "config.toml").write_text(node_config_toml())
    node = DaemonSetNode(
        base=base,
        mounts=mounts,
        containerd=containerd,
        kubelet=kubelet,
        second=second,
        image=image,
        busybox=pod_images.local("library/busybox:latest"),
        subnet=subnet,
        crictl=require_peer("CRICTL"),
        ctr=require_peer("CONTAINERD2_CTR"),
    )
    try:
        await containerd.start()
        await kubelet.start()
        pod = static_pod(image, config_dir)
        (kubelet.manifests / "cri-shim.json").write_text(json.dumps(pod))
        yield node
    finally:
        await teardown(node)
        await asyncio.to_thread(reap, base)
        await mounts.close()
        kubelet.cleanup()
        second.cleanup()
        subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


async def remove_all_pods(socket_path: Path | str) -> None:
    client = CriClient.connect(socket_path)
    try:
        listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest(), timeout=30)
        for item in listed.items:
            with contextlib.suppress(Exception):
                await client.runtime.stop_pod_sandbox(
                    cri.StopPodSandboxRequest(item.id), timeout=60
                )
                await client.runtime.remove_pod_sandbox(
                    cri.RemovePodSandboxRequest(item.id), timeout=60
                )
    except Exception:  # best effort: reap() follows
        pass
    finally:
        client.close()


async def teardown(node: DaemonSetNode) -> None:
    """Second kubelet and its pods (through the shim), then the DaemonSet pod."""
    await node.second.stop()
    if node.shim_socket.is_socket():
        await remove_all_pods(node.shim_socket)
    await node.kubelet.stop()
    if Path(node.containerd.address).is_socket():
        await remove_all_pods(node.containerd.address)
    await node.containerd.stop()


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed or "node" not in request.fixturenames:
        return
    node: DaemonSetNode = request.getfixturevalue("node")
    print(f"--- kubelet log ---\n{node.kubelet.log_tail(80)}")
    print(f"--- second kubelet log ---\n{node.second.log_tail(80)}")
    print(f"--- cri-shim (the DaemonSet pod) log ---\n{node.shim_log()}")


# ---------------------------------------------------------------------- scenarios


def ready(pod: dict[str, Any] | None) -> bool:
    conditions = (pod or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def probe_counts(metrics: str, container: str) -> dict[tuple[str, str], float]:
    """kubelet's prober_probe_total for one container: (probe type, result) -> count."""
    counts: dict[tuple[str, str], float] = {}
    for line in metrics.splitlines():
        if not line.startswith("prober_probe_total{") or f'container="{container}"' not in line:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        counts[(labels["probe_type"], labels["result"])] = float(line.rsplit(" ", 1)[1])
    return counts


async def test_daemonset_pod_is_ready_and_its_probes_pass(node: DaemonSetNode) -> None:
    async def pod_ready() -> bool:
        return ready(await node.shim_pod())

    await wait_until(pod_ready, "the DaemonSet pod Ready on kubelet (readiness /healthz)")

    async def liveness_passed() -> bool:
        counts = probe_counts(await node.kubelet.get_text("/metrics/probes"), "cri-shim")
        return counts.get(("Liveness", "successful"), 0) >= 2

    await wait_until(liveness_passed, "two successful liveness probes (/livez)")
    counts = probe_counts(await node.kubelet.get_text("/metrics/probes"), "cri-shim")
    assert counts.get(("Liveness", "failed"), 0) == 0, counts
    assert counts.get(("Readiness", "successful"), 0) >= 1, counts
    pod = await node.shim_pod()
    assert pod is not None
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and status["restartCount"] == 0, status
    assert status["image"].endswith(f"/cri-shim:{__version__}")


async def test_shim_serves_the_host_path_the_manifest_promises(node: DaemonSetNode) -> None:
    async def serving() -> bool:
        return node.shim_socket.is_socket()

    await wait_until(serving, f"a socket at {node.shim_socket}")
    config = tomllib.loads(node_config_toml())
    assert stat.S_IMODE(node.shim_socket.stat().st_mode) == config["server"]["socket_mode"]
    client = node.shim_client()
    try:
        version = await client.runtime.version(cri.VersionRequest(), timeout=30)
        status = await client.runtime.status(cri.StatusRequest(), timeout=30)
    finally:
        client.close()
    assert (version.runtime_name, version.runtime_version) == ("cri-shim", __version__)
    assert status.status is not None
    conditions = {c.type: c.status for c in status.status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}, status
    # The process behind the socket is the pod's: its cgroup is kubelet's pod cgroup.
    pod = await node.shim_pod()
    assert pod is not None
    uid = pod["metadata"]["uid"]
    pids = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and b"cri-shim\0serve" in _cmdline(p)
    ]
    owned = [pid for pid in pids if f"pod{uid}" in _cgroups(pid)]
    assert owned, f"no cri-shim serve process in pod {uid}'s cgroup"


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def _cgroups(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


async def test_crictl_runs_a_pod_through_the_containerized_shim(node: DaemonSetNode) -> None:
    work = node.base / "crictl"
    work.mkdir()
    log_dir = "/var/log/pods/crictl-daemonset"
    (work / "pod.json").write_text(
        json.dumps(
            {
                "metadata": {"name": "crictl-ds", "namespace": "default", "uid": "crictl-ds-uid"},
                "log_directory": log_dir,
                "linux": {},
            }
        )
    )
    (work / "container.json").write_text(
        json.dumps(
            {
                "metadata": {"name": "hello"},
                "image": {"image": node.busybox},
                "command": ["sh", "-c", "echo hello-from-crictl; exec sleep 100000"],
                "log_path": "hello.log",
                "linux": {},
            }
        )
    )
    await node.crictl_run("pull", node.busybox)
    pod_id = (await node.crictl_run("runp", str(work / "pod.json"))).strip()
    container_id = (
        await node.crictl_run(
            "create", pod_id, str(work / "container.json"), str(work / "pod.json")
        )
    ).strip()
    await node.crictl_run("start", container_id)
    inspected = json.loads(await node.crictl_run("inspect", container_id))
    assert inspected["status"]["state"] == "CONTAINER_RUNNING"
    pid = inspected["info"]["pid"]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0")
    # The pod's private /dev/shm, mounted by the shim in its state dir, is the
    # tmpfs the container sees (the node's containerd mounts it from the host).
    mounts = await node.crictl_run("exec", "-s", container_id, "cat", "/proc/self/mounts")
    assert re.search(r"^\S+ /dev/shm tmpfs ", mounts, re.M), mounts
    pod = json.loads(await node.crictl_run("inspectp", pod_id))
    assert ipaddress.IPv4Address(pod["status"]["network"]["ip"]) in node.subnet
    # The node's containerd runs it, in the shim's own namespace.
    assert container_id in await node.ctr_tasks("cri-shim")
    log = node.mounts.host(log_dir) / "hello.log"

    async def logged() -> bool:
        return log.exists() and b"hello-from-crictl" in log.read_bytes()

    await wait_until(logged, f"the container's output in {log_dir}/hello.log on the node")
    await node.crictl_run("stopp", pod_id)
    await node.crictl_run("rmp", pod_id)
    assert container_id not in await node.ctr_tasks("cri-shim")


async def test_second_kubelet_runs_a_static_pod_through_the_shim(node: DaemonSetNode) -> None:
    async def shim_ready() -> bool:
        return ready(await node.shim_pod())

    await wait_until(shim_ready, "the DaemonSet pod Ready")
    second = node.second
    await second.start()
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "through-shim", "namespace": "default"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [
                {
                    "name": "app",
                    "image": node.busybox,
                    "command": [
                        "sh",
                        "-c",
                        "echo hi > /scratch/f; echo second-kubelet-$(cat /scratch/f); "
                        "exec sleep 100000",
                    ],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                }
            ],
        },
    }
    (second.manifests / "through-shim.json").write_text(json.dumps(pod))
    seen: dict[str, Any] = {}

    async def running() -> bool:
        found = (await second.pods()).get("through-shim")
        seen.update(found or {})
        statuses = (found or {}).get("status", {}).get("containerStatuses") or []
        return bool(statuses) and "running" in statuses[0].get("state", {})

    await wait_until(running, "the static pod running on the second kubelet")
    assert ipaddress.IPv4Address(seen["status"]["podIP"]) in node.subnet
    container_id = seen["status"]["containerStatuses"][0]["containerID"]
    assert container_id.startswith("cri-shim://"), container_id
    assert container_id.removeprefix("cri-shim://") in await node.ctr_tasks("cri-shim")
    uid = seen["metadata"]["uid"]
    logs = node.mounts.host(f"/var/log/pods/default_through-shim-{second.node_name}_{uid}/app")

    async def logged() -> bool:
        return any(b"second-kubelet-hi" in f.read_bytes() for f in logs.glob("*.log"))

    await wait_until(logged, f"the container's log line in {logs}")
