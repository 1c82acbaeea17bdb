"""A real kubelet (v1.36, no API server) drives static pods through cri-shim,
and the same scenarios through containerd 2.x's built-in CRI, side by side.

One kubelet per runtime serves every scenario (the pods start together when
the module's node comes up, each test then waits on its own pod): kubelet's
own view comes from its `/pods` endpoint, which for static pods carries the
status kubelet computed (phase, pod IP, container states, restart counts,
readiness: what a mirror pod would show), and `/stats/summary`; the effect on
the host is read from cgroup files, hostPath files, ports, the pod log dir and
the runtime's CRI view. The scenarios that stop or kill kubelet, the shim or
containerd run late, in that order; the deleted pod's removal, which waits on
kubelet's once-a-minute garbage collection, is checked at the very end. A
failing test prints kubelet's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import itertools
import json
import os
import random
import re
import shlex
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.runtime import v1 as cri

from .conftest import CriClient, ShimProcess, short_tempdir, start_shim_process
from .pods import write_conflist, write_shim_config
from .support.catalog import ServedCatalog
from .support.cgroups import V1_ONLY
from .support.kubelet import (
    Containerd2,
    Kubelet,
    cgroup_of,
    containerd2_config,
    hosts_dir_with_local,
    peer_binaries,
)
from .support.kubelet import (
    wait_until as wait_for_node,
)
from .support.reaper import reap
from .support.registry import free_port

pytestmark = pytest.mark.containerd

# cri-shim-evented: cri-shim under a kubelet with the EventedPLEG feature gate,
# which learns of changes from GetContainerEvents instead of relisting each second.
RUNTIMES = ("cri-shim", "containerd2", "cri-shim-evented")
SANDBOX_IMAGE = "registry.k8s.io/pause:3.9"
NAMESPACE = "default"
# Pods whose containers never exit or restart on their own: a restart of
# kubelet, the shim or containerd must leave them exactly as they were.
STABLE_PODS = {
    "app": ("main", "side"),
    "logger": ("count",),
    "hostnet": ("web",),
    "hostport": ("web",),
}
LOG_LINE = re.compile(rb"^(\S+) (stdout|stderr) ([FP]) (.*)$")
NUMBERED = re.compile(rb"^line (\d+)$")
WAIT = 120.0


@dataclass
class Node:
    """One runtime with a kubelet on it."""

    runtime: str
    base: Path
    kubelet: Kubelet
    cri_socket: Path
    share: Path  # hostPath dir the pods and the tests share
    ipam_dir: Path
    image: str
    ports: dict[str, int]
    kill_cri: Callable[[], Awaitable[None]] | None  # SIGKILL + restart of the shim
    kill_containerd: Callable[[], Awaitable[None]]
    deleted: dict[str, Any] = field(default_factory=dict)

    def client(self) -> CriClient:
        return CriClient.connect(self.cri_socket)

    def write_pod(self, name: str, spec: dict[str, Any]) -> None:
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"terminationGracePeriodSeconds": 1, **spec},
        }
        tmp = self.base / f".{name}.json"
        tmp.write_text(json.dumps(manifest))
        tmp.replace(self.kubelet.manifests / f"{name}.json")

    async def pod(self, name: str) -> dict[str, Any] | None:
        return (await self.kubelet.pods()).get(name)

    async def wait_pod(
        self, name: str, check: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """Wait until kubelet's view of pod `name` satisfies `check`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        seen: dict[str, Any] | None = None
        while loop.time() < deadline:
            seen = await self.pod(name)
            if seen is not None and check(seen):
                return seen
            await asyncio.sleep(0.3)
        status = json.dumps(seen and seen.get("status"), indent=1)
        raise AssertionError(f"pod {name}: never {what}; last status {status}")


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainerStatuses" if init else "containerStatuses"
    for status in pod.get("status", {}).get(key) or []:
        if status["name"] == name:
            return dict(status)
    return {}


def running(pod: dict[str, Any], *names: str) -> bool:
    return all("running" in container(pod, n).get("state", {}) for n in names)


def all_running(pod: dict[str, Any], names: tuple[str, ...]) -> bool:
    return running(pod, *names)


def restarts(pod: dict[str, Any], name: str) -> int:
    return int(container(pod, name).get("restartCount", 0))


def container_ids(pod: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s.get("containerID", "") for s in pod["status"].get("containerStatuses", [])}


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    await wait_for_node(predicate, what, timeout=WAIT)


def busybox_pod(image: str, name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": image, "command": ["sh", "-c", script], **extra}


def share_mount(node: Node) -> tuple[dict[str, Any], dict[str, Any]]:
    volume = {"name": "share", "hostPath": {"path": str(node.share), "type": "Directory"}}
    return volume, {"name": "share", "mountPath": "/share"}


def write_pods(node: Node) -> None:
    """Every scenario's pod, all at once: kubelet starts them in parallel."""
    image, share = node.image, node.share
    volume, mount = share_mount(node)
    (share / "app").mkdir(mode=0o777)
    os.chmod(share / "app", 0o777)  # the unprivileged container writes here
    (share / "www").mkdir()
    (share / "www" / "index.html").write_text("hello from the pod\n")
    for flag in ("exec-alive", "tcp-alive", "www/alive"):
        (share / flag).write_text("ok\n")
    sleep = "exec sleep 100000"
    node.write_pod(
        "app",
        {
            "volumes": [
                {"name": "shared", "emptyDir": {}},
                {"name": "out", "hostPath": {"path": str(share / "app"), "type": "Directory"}},
            ],
            "initContainers": [
                busybox_pod(
                    image,
                    "init",
                    "echo from-init > /shared/init.txt",
                    volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
                )
            ],
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "command": ["sh", "-c"],
                    "args": [
                        'echo "$GREETING $(pwd) $(cat /shared/init.txt)" > /out/main.txt; '
                        f"echo main > /shared/main.txt; {sleep}"
                    ],
                    "env": [{"name": "GREETING", "value": "hello-env"}],
                    "workingDir": "/work/dir",
                    "resources": {
                        "limits": {"cpu": "250m", "memory": "64Mi"},
                        "requests": {"cpu": "100m", "memory": "32Mi"},
                    },
                    "volumeMounts": [
                        {"name": "shared", "mountPath": "/shared"},
                        {"name": "out", "mountPath": "/out"},
                    ],
                },
                busybox_pod(
                    image,
                    "side",
                    "until test -e /shared/main.txt; do sleep 0.2; done; "
                    "{ id -u; cat /shared/main.txt; "
                    "if touch /rootfs-write 2>/dev/null; then echo rw; else echo ro; fi; "
                    "grep CapBnd /proc/self/status; } > /out/side.tmp; "
                    f"mv /out/side.tmp /out/side.txt; {sleep}",
                    securityContext={
                        "runAsUser": 1234,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["CHOWN"]},
                    },
                    volumeMounts=[
                        {"name": "shared", "mountPath": "/shared"},
                        {"name": "out", "mountPath": "/out"},
                    ],
                ),
            ],
        },
    )
    probe = {"periodSeconds": 1, "failureThreshold": 1, "timeoutSeconds": 2}
    node.write_pod(
        "probes",
        {
            "volumes": [volume],
            "containers": [
                busybox_pod(
                    image,
                    "exec-live",
                    sleep,
                    volumeMounts=[mount],
                    livenessProbe={"exec": {"command": ["test", "-e", "/share/exec-alive"]}}
                    | probe,
                ),
                busybox_pod(
                    image,
                    "http-live",
                    "exec httpd -f -p 8081 -h /share/www",
                    volumeMounts=[mount],
                    livenessProbe={"httpGet": {"path": "/alive", "port": 8081}} | probe,
                ),
                busybox_pod(
                    image,
                    "tcp-live",
                    "httpd -f -p 8082 -h /share/www & server=$!; "
                    "while test -e /share/tcp-alive; do sleep 0.2; done; kill $server; "
                    f"{sleep}",
                    volumeMounts=[mount],
                    livenessProbe={"tcpSocket": {"port": 8082}} | probe,
                ),
                busybox_pod(
                    image,
                    "ready",
                    sleep,
                    volumeMounts=[mount],
                    readinessProbe={"exec": {"command": ["test", "-e", "/share/ready"]}} | probe,
                ),
            ],
        },
    )
    node.write_pod(
        "never",
        {"restartPolicy": "Never", "containers": [busybox_pod(image, "fail", "exit 3")]},
    )
    node.write_pod(
        "onfailure",
        {
            "restartPolicy": "OnFailure",
            "volumes": [volume],
            "containers": [
                busybox_pod(
                    image,
                    "once",
                    "if test -e /share/onfailure-ran; then exit 0; fi; "
                    "touch /share/onfailure-ran; exit 4",
                    volumeMounts=[mount],
                )
            ],
        },
    )
    node.write_pod(
        "hostnet",
        {
            "hostNetwork": True,
            "volumes": [volume],
            "containers": [
                busybox_pod(
                    image,
                    "web",
                    f"exec httpd -f -p 127.0.0.1:{node.ports['hostnet']} -h /share/www",
                    volumeMounts=[mount],
                )
            ],
        },
    )
    node.write_pod(
        "hostport",
        {
            "volumes": [volume],
            "containers": [
                busybox_pod(
                    image,
                    "web",
                    "exec httpd -f -p 8080 -h /share/www",
                    volumeMounts=[mount],
                    ports=[{"containerPort": 8080, "hostPort": node.ports["hostport"]}],
                )
            ],
        },
    )
    node.write_pod(
        "logger",
        {
            "containers": [
                busybox_pod(
                    image, "count", 'i=0; while :; do echo "line $i"; i=$((i+1)); sleep 0.05; done'
                )
            ]
        },
    )
    node.write_pod("doomed", {"containers": [busybox_pod(image, "idle", sleep)]})


# ------------------------------------------------------------------ the node


async def cri_shim_runtime(
    base: Path, hosts_dir: Path
) -> tuple[Path, Callable[[], Awaitable[None]] | None, Callable[[], Awaitable[None]], Any]:
    """Debian's containerd 1.6 (CRI plugin off) and `cri-shim serve` in front."""
    daemon = EmbeddedContainerd(base / "containerd", restart=False)
    await daemon.start()
    config = write_shim_config(
        base,
        hosts_dir,
        daemon.address,
        containerd_extra="health_interval = 0.2\n",
    )
    config.write_text(config.read_text() + '[runtime]\ncgroup_driver = "cgroupfs"\n')
    socket = base / "cri.sock"
    shim: list[ShimProcess] = []

    async def start() -> None:
        shim[:] = [
            await start_shim_process(["--config", str(config)], socket, base / "shim.log", 60)
        ]

    async def kill_shim() -> None:
        shim[0].process.kill()
        await shim[0].process.wait()
        await start()

    async def kill_containerd() -> None:
        daemon.kill()
        assert daemon.process is not None
        await daemon.process.wait()
        await daemon.start()

    async def stop() -> None:
        if shim:
            shim[0].process.terminate()
            await shim[0].process.wait()
        await daemon.stop()

    await start()
    return socket, kill_shim, kill_containerd, stop


async def containerd2_runtime(
    base: Path, hosts_dir: Path
) -> tuple[Path, Callable[[], Awaitable[None]] | None, Callable[[], Awaitable[None]], Any]:
    binary = peer_binaries("containerd2")["CONTAINERD2"]
    daemon = Containerd2(
        binary,
        base / "containerd",
        containerd2_config(base / "containerd", base / "cni", hosts_dir, SANDBOX_IMAGE),
    )
    await daemon.start()

    async def kill_containerd() -> None:
        daemon.kill()
        await daemon.wait()
        await daemon.start()

    return Path(daemon.address), None, kill_containerd, daemon.stop


@pytest_asyncio.fixture(scope="module", params=RUNTIMES)
async def node(request: pytest.FixtureRequest, pod_images: ServedCatalog) -> AsyncIterator[Node]:
    runtime: str = request.param
    kubelet_binary = peer_binaries("kubelet")["KUBELET"]
    base = short_tempdir("crishim-kl-")
    octet = random.randrange(10, 250)
    bridge = f"crikl{octet}"
    write_conflist(base / "cni", f"10.235.{octet}.0/24", bridge, base / "ipam")
    hosts_dir = hosts_dir_with_local(pod_images, base / "certs.d")
    if runtime.startswith("cri-shim"):
        socket, kill_cri, kill_containerd, stop = await cri_shim_runtime(base, hosts_dir)
    else:
        socket, kill_cri, kill_containerd, stop = await containerd2_runtime(base, hosts_dir)
    kubelet = Kubelet(
        kubelet_binary,
        base / "kubelet",
        str(socket),
        f"node-{runtime}",
        # Pod and container figures from the runtime (ListPodSandboxStats,
        # ListContainerStats) rather than cAdvisor, which only knows containers
        # of the containerd at /run/containerd: the tests' runtimes are private.
        feature_gates={
            "PodAndContainerStatsFromCRI": True,
            "EventedPLEG": runtime.endswith("-evented"),
        },
        verbosity=4 if runtime.endswith("-evented") else 2,
    )
    share = base / "share"
    share.mkdir()
    node = Node(
        runtime=runtime,
        base=base,
        kubelet=kubelet,
        cri_socket=socket,
        share=share,
        ipam_dir=base / "ipam",
        image=pod_images.local("library/busybox:latest"),
        ports={"hostnet": free_port(), "hostport": free_port()},
        kill_cri=kill_cri,
        kill_containerd=kill_containerd,
    )
    try:
        await kubelet.start()
        write_pods(node)
        yield node
    finally:
        problems = await teardown(node, stop)
        await asyncio.to_thread(reap, base)
        kubelet.cleanup()
        leaked = await asyncio.to_thread(drop_hostport_rules, f"10.235.{octet}.")
        subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
        if leaked:
            problems.append("hostPort rules left on the host:\n" + "\n".join(leaked))
        assert not problems, f"teardown of the {runtime} node: " + "; ".join(problems)


async def teardown(node: Node, stop_runtime: Callable[[], Awaitable[None]]) -> list[str]:
    """kubelet leaves pods running when it stops; remove them through the CRI.

    Returns what went wrong, for the fixture to raise once everything else is
    cleaned up: a pod left running here leaves its hostPort DNAT rule behind,
    and that rule captures whichever later test gets the same free port (seen:
    a registry on that port never answered)."""
    await node.kubelet.stop()
    problems: list[str] = []
    client = node.client()
    try:
        items = await sandboxes_once_answering(client)
        for item in items:
            try:
                await client.runtime.stop_pod_sandbox(
                    cri.StopPodSandboxRequest(item.id), timeout=60
                )
                await client.runtime.remove_pod_sandbox(
                    cri.RemovePodSandboxRequest(item.id), timeout=60
                )
            except Exception as exc:
                problems.append(f"stop/remove of pod {item.id}: {exc!r}")
    except Exception as exc:
        problems.append(f"ListPodSandbox: {exc!r}")
    finally:
        client.close()
    await stop_runtime()
    return problems


async def sandboxes_once_answering(client: CriClient) -> list[cri.PodSandbox]:
    """ListPodSandbox, retried while the runtime is still coming back from a
    scenario that killed it (the last tests SIGKILL the shim and containerd)."""
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        try:
            listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest(), timeout=30)
            return list(listed.items)
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


def drop_hostport_rules(subnet_prefix: str) -> list[str]:
    """Remove portmap's DNAT chains leading into the node's pod subnet and
    return the rules found: after a clean teardown there are none."""
    saved = subprocess.run(
        ["iptables-save", "-t", "nat"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    chains = {
        line.split()[1]
        for line in saved
        if line.startswith("-A CNI-DN-") and f"--to-destination {subnet_prefix}" in line
    }
    found = [line for line in saved if any(f" {chain} " in f"{line} " for chain in chains)]
    for line in saved:
        args = shlex.split(line) if line.startswith("-A CNI-HOSTPORT-DNAT") else []
        if "-j" in args and args[args.index("-j") + 1] in chains:
            subprocess.run(["iptables", "-t", "nat", "-D", *args[1:]], check=False)
    for chain in chains:
        subprocess.run(["iptables", "-t", "nat", "-F", chain], check=False)
        subprocess.run(["iptables", "-t", "nat", "-X", chain], check=False)
    return found


@pytest.fixture(autouse=True)
def kubelet_log_on_failure(request: pytest.FixtureRequest, node: Node) -> Iterator[None]:
    """Print kubelet's log tail under a failing test (pytest shows a failed
    test's captured output; conftest records the call's report)."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"--- kubelet log ({node.runtime}) ---\n{node.kubelet.log_tail()}")


# ---------------------------------------------------------------- helpers


async def cri_sandboxes(node: Node, pod_name: str) -> list[cri.PodSandbox]:
    client = node.client()
    try:
        listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
    finally:
        client.close()
    full = f"{pod_name}-{node.kubelet.node_name}"
    return [s for s in listed.items if s.metadata is not None and s.metadata.name == full]


async def cri_containers(node: Node, sandbox_id: str | None = None) -> list[cri.Container]:
    client = node.client()
    try:
        filters = cri.ContainerFilter(pod_sandbox_id=sandbox_id) if sandbox_id else None
        listed = await client.runtime.list_containers(cri.ListContainersRequest(filter=filters))
    finally:
        client.close()
    return list(listed.containers)


async def container_pid(node: Node, container_id: str) -> int:
    client = node.client()
    try:
        reply = await client.runtime.container_status(
            cri.ContainerStatusRequest(container_id.split("://")[-1], verbose=True)
        )
    finally:
        client.close()
    return int(json.loads(reply.info["info"])["pid"])


async def sandbox_info(node: Node, sandbox_id: str) -> dict[str, Any]:
    client = node.client()
    try:
        reply = await client.runtime.pod_sandbox_status(
            cri.PodSandboxStatusRequest(sandbox_id, verbose=True)
        )
    finally:
        client.close()
    info: dict[str, Any] = json.loads(reply.info["info"])
    return info


async def http_get(host: str, port: int, path: str = "/") -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        return r.status, await r.text()


def host_address() -> str:
    """The host's address on its default route (not loopback)."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        name, address = line.split()[1], line.split()[3].split("/")[0]
        if not name.startswith(("cri", "cni", "veth", "docker")):
            return address
    raise AssertionError(f"no global IPv4 address:\n{out}")


def log_dir(node: Node, pod: dict[str, Any], container_name: str) -> Path:
    meta = pod["metadata"]
    return (
        node.kubelet.pod_logs / f"{meta['namespace']}_{meta['name']}_{meta['uid']}" / container_name
    )


def read_numbered(directory: Path) -> tuple[list[int], int]:
    """Every numbered line of a container's log files, oldest file first
    (rotated files, gzipped or not, then the current one); and how many
    rotated files there are. Retried while kubelet rotates under the reader."""
    while True:
        before = sorted(os.listdir(directory))
        rotated = sorted(n for n in before if not n.endswith(".log") and ".log." in n)
        current = sorted(n for n in before if n.endswith(".log"))
        data = b""
        try:
            for name in [*sorted(rotated, key=lambda n: n.split(".log.")[1]), *current]:
                raw = (directory / name).read_bytes()
                data += gzip.decompress(raw) if name.endswith(".gz") else raw
        except (FileNotFoundError, EOFError, gzip.BadGzipFile):
            continue
        if sorted(os.listdir(directory)) != before:
            continue
        numbers = []
        for line in data.split(b"\n")[:-1]:  # the last one may be half written
            match = LOG_LINE.match(line)
            assert match, line
            assert match.group(2) == b"stdout" and match.group(3) == b"F", line
            numbered = NUMBERED.match(match.group(4))
            assert numbered, line
            numbers.append(int(numbered.group(1)))
        return numbers, len(rotated)


def assert_contiguous(numbers: list[int]) -> None:
    assert numbers, "no lines"
    expected = list(range(numbers[0], numbers[0] + len(numbers)))
    if numbers != expected:
        gaps = [(a, b) for a, b in itertools.pairwise(numbers) if b != a + 1]
        raise AssertionError(f"lines lost or repeated: {gaps[:10]}")


async def snapshot_stable(node: Node) -> dict[str, tuple[dict[str, str], str, int]]:
    """Container ids, pod IP and restart total of the stable pods, by kubelet."""
    pods = await node.kubelet.pods()
    return {
        name: (
            container_ids(pods[name]),
            pods[name]["status"].get("podIP", ""),
            sum(s["restartCount"] for s in pods[name]["status"]["containerStatuses"]),
        )
        for name in STABLE_PODS
    }


async def run_canary(node: Node, name: str) -> None:
    """A new pod started and seen running by kubelet: proof that kubelet has
    relisted the runtime (one relist covers every pod) since the disruption."""
    node.write_pod(name, {"containers": [busybox_pod(node.image, "c", "exec sleep 100000")]})
    await node.wait_pod(name, lambda p: running(p, "c"), "running")


async def all_stable_running(node: Node) -> None:
    for name, names in STABLE_PODS.items():
        await node.wait_pod(name, functools.partial(all_running, names=names), "running")


# ---------------------------------------------------------------- scenarios


async def test_kubelet_healthz_and_node(node: Node) -> None:
    assert await node.kubelet.healthy()
    assert await node.kubelet.get_text("/healthz") == "ok"

    async def listed() -> bool:
        return set(await node.kubelet.pods()) >= {"app", "probes", "logger", "doomed"}

    await wait_until(listed, "listed every static pod in /pods")


async def test_delete_manifest_stops_pod(node: Node) -> None:
    """Deleting the manifest stops the pod at once: containers killed, IP and
    netns released (the records go at kubelet's next garbage collection,
    checked by test_deleted_pod_removed below)."""
    await node.wait_pod("doomed", lambda p: running(p, "idle"), "running")
    (sandbox,) = await cri_sandboxes(node, "doomed")
    info = await sandbox_info(node, sandbox.id)
    # Where the runtime pinned the netns (containerd 2 moved it in its verbose info).
    netns = Path(info.get("netNamespacePath") or info["sandboxMetadata"]["Metadata"]["NetNSPath"])
    pod = await node.pod("doomed")
    assert pod is not None
    ip = pod["status"]["podIP"]
    ip_files = list(node.ipam_dir.rglob(ip))
    assert netns.exists() and ip_files, (netns, ip)
    (node.kubelet.manifests / "doomed.json").unlink()

    async def stopped() -> bool:
        if await node.pod("doomed") is not None:
            return False
        sandboxes = await cri_sandboxes(node, "doomed")
        return all(s.state == cri.PodSandboxState.SANDBOX_NOTREADY for s in sandboxes)

    await wait_until(stopped, "stopped")
    containers = await cri_containers(node, sandbox.id)
    assert all(c.state != cri.ContainerState.CONTAINER_RUNNING for c in containers)

    async def released() -> bool:
        # Both runtimes report the sandbox NOTREADY once the pause task is
        # gone, with StopPodSandbox's network teardown still under way.
        return not netns.exists() and not any(f.exists() for f in ip_files)

    await wait_until(released, f"released the netns {netns} and the IP {ip}")
    node.deleted = {"sandbox": sandbox.id}


async def test_init_and_shared_emptydir(node: Node) -> None:
    pod = await node.wait_pod("app", lambda p: running(p, "main", "side"), "running")
    init = container(pod, "init", init=True)
    assert init["state"]["terminated"]["exitCode"] == 0
    assert init["state"]["terminated"]["reason"] == "Completed"
    out = node.share / "app"
    await wait_until(lambda: asyncio.sleep(0, (out / "side.txt").exists()), "side wrote")
    # env, command + args, workingDir (created by the runtime), the init
    # container's file in the shared emptyDir, the hostPath volume.
    assert (out / "main.txt").read_text() == "hello-env /work/dir from-init\n"
    uid, shared, rootfs, capbnd = (out / "side.txt").read_text().splitlines()
    assert (uid, shared, rootfs) == ("1234", "main", "ro")
    bounding = int(capbnd.split()[1], 16)
    assert not bounding & (1 << 0), "CAP_CHOWN dropped"
    assert bounding & (1 << 1), "CAP_DAC_OVERRIDE kept"
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"].startswith("10.235.")
    assert pod["status"]["qosClass"] == "Burstable"


@V1_ONLY
async def test_limits_in_cgroup_files(node: Node) -> None:
    pod = await node.wait_pod("app", lambda p: running(p, "main"), "running")
    pid = await container_pid(node, container(pod, "main")["containerID"])
    memory = cgroup_of(pid, "memory")
    cpu = cgroup_of(pid, "cpu")
    expected_parent = f"{node.kubelet.cgroup_root}/kubepods/burstable/pod{pod['metadata']['uid']}"
    assert expected_parent in str(memory), memory
    assert int((memory / "memory.limit_in_bytes").read_text()) == 64 * 1024 * 1024
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == 25000
    assert int((cpu / "cpu.cfs_period_us").read_text()) == 100000
    assert int((cpu / "cpu.shares").read_text()) == 102  # 100m requested


@pytest.mark.parametrize(
    ("probe", "flag"),
    [("exec-live", "exec-alive"), ("http-live", "www/alive"), ("tcp-live", "tcp-alive")],
)
async def test_liveness_probe_restarts(node: Node, probe: str, flag: str) -> None:
    pod = await node.wait_pod("probes", lambda p: running(p, probe), "running")
    before = restarts(pod, probe)
    first_id = container(pod, probe)["containerID"]
    (node.share / flag).unlink()
    pod = await node.wait_pod("probes", lambda p: restarts(p, probe) > before, f"restarted {probe}")
    (node.share / flag).write_text("ok\n")
    status = container(pod, probe)
    assert status["containerID"] != first_id
    last = status["lastState"]["terminated"]
    assert last["reason"] in ("Error", "Completed"), last  # killed by kubelet
    pod = await node.wait_pod("probes", lambda p: running(p, probe), "running again")


async def test_readiness_probe_flips_ready(node: Node) -> None:
    await node.wait_pod("probes", lambda p: running(p, "ready"), "running")
    pod = await node.pod("probes")
    assert pod is not None and container(pod, "ready")["ready"] is False
    (node.share / "ready").write_text("ok\n")
    await node.wait_pod("probes", lambda p: container(p, "ready").get("ready") is True, "ready")
    (node.share / "ready").unlink()
    pod = await node.wait_pod(
        "probes", lambda p: container(p, "ready").get("ready") is False, "unready"
    )
    assert restarts(pod, "ready") == 0


async def test_restart_policy_never(node: Node) -> None:
    pod = await node.wait_pod("never", lambda p: p["status"].get("phase") == "Failed", "Failed")
    status = container(pod, "fail")
    assert status["state"]["terminated"]["exitCode"] == 3
    assert status["restartCount"] == 0


async def test_restart_policy_on_failure(node: Node) -> None:
    pod = await node.wait_pod(
        "onfailure", lambda p: p["status"].get("phase") == "Succeeded", "Succeeded"
    )
    status = container(pod, "once")
    assert status["restartCount"] == 1
    assert status["state"]["terminated"]["exitCode"] == 0
    assert status["lastState"]["terminated"]["exitCode"] == 4


async def test_host_network(node: Node) -> None:
    pod = await node.wait_pod("hostnet", lambda p: running(p, "web"), "running")
    assert pod["spec"]["hostNetwork"] is True
    status, body = await http_get("127.0.0.1", node.ports["hostnet"])
    assert (status, body) == (200, "hello from the pod\n")


async def test_host_port(node: Node) -> None:
    await node.wait_pod("hostport", lambda p: running(p, "web"), "running")

    async def answers() -> bool:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            return await http_get(host_address(), node.ports["hostport"]) == (
                200,
                "hello from the pod\n",
            )
        return False

    await wait_until(answers, "answered on the host port")


async def test_logs_in_kubelet_format(node: Node) -> None:
    pod = await node.wait_pod("logger", lambda p: running(p, "count"), "running")
    directory = log_dir(node, pod, "count")
    await wait_until(lambda: asyncio.sleep(0, (directory / "0.log").exists()), "log file")
    numbers, _ = read_numbered(directory)
    assert numbers[0] == 0
    assert_contiguous(numbers)


async def test_log_rotation_loses_no_line(node: Node) -> None:
    """containerLogMaxSize 4Ki: kubelet renames the file and asks the runtime
    to reopen it (ReopenContainerLog); every line lands in exactly one file."""
    pod = await node.wait_pod("logger", lambda p: running(p, "count"), "running")
    directory = log_dir(node, pod, "count")

    async def rotated_twice() -> bool:
        return directory.exists() and read_numbered(directory)[1] >= 2

    await wait_until(rotated_twice, "rotated twice")
    numbers, _ = read_numbered(directory)
    assert numbers[0] == 0
    assert_contiguous(numbers)


async def test_stats_summary(node: Node) -> None:
    await node.wait_pod("app", lambda p: running(p, "main", "side"), "running")

    last: list[Any] = [None]

    async def summary_complete() -> bool:
        summary = last[0] = await node.kubelet.get("/stats/summary")
        pods = {p["podRef"]["name"]: p for p in summary.get("pods", [])}
        app = pods.get(f"app-{node.kubelet.node_name}")
        if app is None:
            return False
        containers = {c["name"]: c for c in app.get("containers", [])}
        return (
            {"main", "side"} <= set(containers)
            and all(
                c.get("cpu", {}).get("usageNanoCores") is not None
                and c.get("memory", {}).get("workingSetBytes")
                for c in (containers["main"], containers["side"])
            )
            and app.get("cpu", {}).get("usageCoreNanoSeconds")
            and app.get("memory", {}).get("workingSetBytes")
            and app.get("network", {}).get("rxBytes") is not None
        )

    try:
        await wait_until(summary_complete, "full /stats/summary for the app pod")
    except AssertionError as error:
        raise AssertionError(f"{error}: {json.dumps(last[0], indent=1)}") from None
    summary = await node.kubelet.get("/stats/summary")
    names = {p["podRef"]["name"] for p in summary["pods"]}
    for name in ("app", "logger", "hostport", "probes"):
        assert f"{name}-{node.kubelet.node_name}" in names
    app = next(p for p in summary["pods"] if p["podRef"]["name"].startswith("app-"))
    assert app["network"]["name"] == "eth0"  # the pod's default interface
    assert app["network"]["rxBytes"] > 0 and app["network"]["txBytes"] > 0
    main = next(c for c in app["containers"] if c["name"] == "main")
    assert 0 < main["memory"]["workingSetBytes"] < 64 * 1024 * 1024


async def test_restart_kubelet_recreates_nothing(node: Node) -> None:
    await all_stable_running(node)
    before = await snapshot_stable(node)
    sandboxes = {s.id for s in await cri_sandboxes(node, "app")}
    await node.kubelet.stop()
    await node.kubelet.start()
    await run_canary(node, "canary-kubelet")
    await all_stable_running(node)
    assert await snapshot_stable(node) == before
    assert {s.id for s in await cri_sandboxes(node, "app")} == sandboxes


async def test_sigkill_shim(node: Node) -> None:
    """The shim dies with SIGKILL under a running kubelet and comes back:
    kubelet restarts no container, IPs stay, no log line is lost."""
    if node.kill_cri is None:
        pytest.skip("containerd 2's CRI lives in containerd: see test_sigkill_containerd")
    await all_stable_running(node)
    before = await snapshot_stable(node)
    logger = await node.pod("logger")
    assert logger is not None
    directory = log_dir(node, logger, "count")
    last_before = read_numbered(directory)[0][-1]
    await node.kill_cri()
    await run_canary(node, "canary-shim")

    async def logging_again() -> bool:
        return read_numbered(directory)[0][-1] > last_before + 20

    await wait_until(logging_again, "logging after the restart")
    await all_stable_running(node)
    assert await snapshot_stable(node) == before
    numbers, _ = read_numbered(directory)
    assert numbers[0] == 0
    assert_contiguous(numbers)


async def test_sigkill_containerd(node: Node) -> None:
    await all_stable_running(node)
    before = await snapshot_stable(node)
    await node.kill_containerd()
    await run_canary(node, "canary-containerd")
    await all_stable_running(node)
    assert await snapshot_stable(node) == before


async def test_deleted_pod_removed(node: Node) -> None:
    """kubelet's container GC (once a minute) removes the deleted pod's
    containers and sandbox from the runtime. Checked last: the minute mostly
    passes during the other scenarios."""
    if not node.deleted:
        pytest.skip("test_delete_manifest_stops_pod did not run")
    sandbox_id = node.deleted["sandbox"]

    async def gone() -> bool:
        return not await cri_sandboxes(node, "doomed") and not await cri_containers(
            node, sandbox_id
        )

    await wait_until(gone, "removed the deleted pod's sandbox and containers")


async def test_events_all_accepted(node: Node) -> None:
    """Under EventedPLEG kubelet dropped no event of the runtime's (it drops
    those without the pod's status) and its event channel never overflowed."""
    if not node.kubelet.feature_gates.get("EventedPLEG"):
        pytest.skip("kubelet relists (EventedPLEG off)")
    log = node.kubelet.log_path.read_text(errors="replace")
    assert "Evented PLEG: received ContainerEventResponse with nil" not in log
    assert "Evented PLEG: Event channel is full" not in log
    # kubelet logs each event it took (at --v=4, which this kubelet runs with).
    assert "Received Container Started Event" in log
