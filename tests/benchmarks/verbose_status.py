"""Micro-benchmark of the status handlers, in process (no containerd, no gRPC):
what one ContainerStatus / PodSandboxStatus / Status call costs the shim's
event loop, plain and verbose, encoding included (grpclib's codec calls
SerializeToString on the reply).

    python -m tests.benchmarks.verbose_status [--calls 2000]
    python -m tests.benchmarks.verbose_status --live [--calls 300]

critest's benchmark calls ContainerStatus and PodSandboxStatus with
verbose=true once per lifecycle step; kubelet polls Status. Each record is
asked `--calls` times with nothing changing (the cached case), then as many
times with a field assigned before every call (each answer built afresh).
Prints µs per call.

`--live` times the same calls over the socket instead, one at a time, against
containerd 2.4's CRI and cri-shim on containerd 2.4 (tests/benchmarks/daemons.py),
each with one pod and one running container; the calls alternate between the
two runtimes, and replies are kept as bytes (no client decode). Prints p50 per
call and the ratio. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grpclib.const import Cardinality

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.health import ContainerdHealth
from cri_shim.containerd.runtime import WireReply as RawReply
from cri_shim.cri.container import ContainerHandlers
from cri_shim.cri.sandbox import SandboxHandlers
from cri_shim.cri.status import StatusHandlers
from cri_shim.gen.runtime import v1 as cri
from cri_shim.host import CgroupDriver
from cri_shim.network.pod_cidr import PodCidrStore
from cri_shim.network.readiness import NetworkReadiness
from cri_shim.oci.defaults import base_spec
from cri_shim.settings import load
from cri_shim.store.containers import Container, ContainerState, ContainerStore
from cri_shim.store.sandboxes import Sandbox, SandboxState, SandboxStore
from tests.benchmarks.daemons import ContainerdBuild, start_runtimes
from tests.conftest import CriClient, short_tempdir
from tests.pods import POD_IMAGES
from tests.support.catalog import ServedCatalog, catalog
from tests.support.peers import peer_path

CNI_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "72:f8:4c:65:ea:50"},
        {"name": "veth8cc289c0", "mac": "be:7d:db:85:d0:73"},
        {"name": "eth0", "mac": "a6:72:31:89:66:d2", "sandbox": "/var/run/netns/cni-1"},
    ],
    "ips": [{"interface": 2, "address": "10.88.0.2/16", "gateway": "10.88.0.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


def records() -> tuple[Sandbox, Container]:
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="bench", namespace="default", uid="uid-1"),
        hostname="bench",
        log_directory="/var/log/pods/default_bench_uid-1",
        labels={"app": "bench", "pod-template-hash": "7d9c8b"},
        annotations={"kubernetes.io/config.source": "api"},
        linux=cri.LinuxPodSandboxConfig(cgroup_parent="/kubepods/besteffort/poduid-1"),
    )
    sandbox = Sandbox(
        id="s" * 64,
        name="bench_default_uid-1_0",
        config=pod_config,
        runtime_handler="",
        created_at=1,
        image_id="sha256:" + "e" * 64,
        netns_path="/var/run/netns/cni-1",
        ip="10.88.0.2",
        state=SandboxState.READY,
        pid=4242,
        network_ready=True,
    )
    # Attributes the verbose info reads (not all of them exist in older versions).
    sandbox.spec = base_spec()
    sandbox.cni_result = CNI_RESULT
    sandbox.image = "registry.k8s.io/pause:3.9"
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app"),
        image=cri.ImageSpec(image="busybox:latest"),
        command=["sleep", "3600"],
        envs=[cri.KeyValue(key=f"VAR{i}", value=b"value") for i in range(10)],
        labels={"io.kubernetes.container.name": "app", "io.kubernetes.pod.uid": "uid-1"},
        annotations={"io.kubernetes.container.hash": "abcd", "restartCount": "0"},
        log_path="app/0.log",
        mounts=[cri.Mount(container_path="/data", host_path="/var/lib/data")],
    )
    container = Container(
        id="c" * 64,
        name="app_bench_default_uid-1_0",
        sandbox_id=sandbox.id,
        config=config,
        image_ref="busybox:latest",
        image_id="sha256:" + "f" * 64,
        image_repo_ref="busybox@sha256:" + "d" * 64,
        created_at=1,
        log_path="/var/log/pods/default_bench_uid-1/app/0.log",
        state=ContainerState.RUNNING,
        pid=4343,
    )
    container.runtime.spec = base_spec()
    return sandbox, container


async def per_call_us(call: Callable[[], Awaitable[Any]], calls: int, change: Any = None) -> float:
    """µs per call (encoding included); `change()` runs before each call when given."""
    start = time.perf_counter()
    for _ in range(calls):
        if change is not None:
            change()
        reply = await call()
        reply.SerializeToString() if hasattr(reply, "_body") else bytes(reply)
    return (time.perf_counter() - start) / calls * 1e6


async def main(calls: int) -> None:
    sandbox, container = records()
    sandboxes, containers = SandboxStore(), ContainerStore()
    sandboxes.add(sandbox)
    containers.add(container)
    none: Any = None
    pod_handlers = SandboxHandlers(sandboxes, none, "runc")
    container_handlers = ContainerHandlers(containers, sandboxes, none, none)
    settings = load(None, environ={}, overrides={})
    health = ContainerdHealth(ContainerdClient("/nonexistent.sock", "k8s.io"), interval=1.0)
    network = NetworkReadiness(Path("/nonexistent"), ("/usr/lib/cni",))
    status_handlers = StatusHandlers(
        settings, health, network, PodCidrStore(Path("/nonexistent/cidr")), CgroupDriver.CGROUPFS
    )

    def touch_container() -> None:
        container.exit_code = 0  # any assignment drops the record's encodings

    def touch_sandbox() -> None:
        sandbox.pid = 4242

    def touch_status() -> None:
        health.serving = not health.serving  # RuntimeReady flips: a new answer

    rows = []
    for verbose in (False, True):
        container_call = lambda v=verbose: container_handlers.container_status(  # noqa: E731
            cri.ContainerStatusRequest(container.id, verbose=v)
        )
        pod_call = lambda v=verbose: pod_handlers.pod_sandbox_status(  # noqa: E731
            cri.PodSandboxStatusRequest(sandbox.id, verbose=v)
        )
        status_call = lambda v=verbose: status_handlers.status(  # noqa: E731
            cri.StatusRequest(verbose=v)
        )
        rows += [
            (f"ContainerStatus verbose={verbose}", container_call, touch_container),
            (f"PodSandboxStatus verbose={verbose}", pod_call, touch_sandbox),
            (f"Status verbose={verbose}", status_call, touch_status),
        ]
    print(f"{'call':34} {'unchanged µs':>14} {'changed µs':>12}")
    for name, call, change in rows:
        cached = await per_call_us(call, calls)
        fresh = await per_call_us(call, max(calls // 4, 1), change)
        print(f"{name:34} {cached:14.1f} {fresh:12.1f}")


async def live(calls: int) -> None:
    base = short_tempdir("crishim-verbose-")
    wanted = [e for e in catalog() if any(n in POD_IMAGES for n in e.names())]
    async with ServedCatalog(entries=wanted) as served:
        image = served.local("library/busybox:latest")
        hosts_dir = served.write_hosts_dir(base / "certs.d")
        local = image.split("/")[0]
        (hosts_dir / local).mkdir(parents=True, exist_ok=True)
        (hosts_dir / local / "hosts.toml").write_text(
            f'server = "http://{local}"\n\n[host."http://{local}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
        build = ContainerdBuild.find(peer_path("CONTAINERD2"))
        async with start_runtimes(base, [build], hosts_dir, "10.243") as runtimes:
            pair = runtimes.pairs[0]
            requests: dict[str, list[tuple[str, str, Any]]] = {}
            clients = {name: CriClient.connect(runtimes.endpoints[name]) for name in runtimes.names}
            pods: dict[str, str] = {}
            try:
                for name, client in clients.items():
                    requests[name], pods[name] = await _set_up(client, image, base / name[:8])
                times: dict[tuple[str, str], list[float]] = {}
                for _ in range(calls):
                    for name, client in clients.items():
                        for op, service, request in requests[name]:
                            start = time.perf_counter()
                            await raw_call(client, op, request, service)
                            times.setdefault((op, name), []).append(time.perf_counter() - start)
            finally:
                for name, client in clients.items():
                    if name in pods:
                        await client.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pods[name]))
                        await client.runtime.remove_pod_sandbox(
                            cri.RemovePodSandboxRequest(pods[name])
                        )
                    client.close()
    head = f"{'call (verbose=true)':22} {pair.anchor + ' ms':>22} {pair.shim + ' ms':>22}"
    print(f"{head} {'ratio':>7}")
    for op, _, _ in requests[pair.anchor]:
        theirs = statistics.median(times[(op, pair.anchor)]) * 1000
        ours = statistics.median(times[(op, pair.shim)]) * 1000
        print(f"{op:22} {theirs:22.3f} {ours:22.3f} {ours / theirs:6.2f}x")


async def _set_up(
    client: CriClient, image: str, logs: Path
) -> tuple[list[tuple[str, str, Any]], str]:
    """A pod with a running container; the verbose requests to time on them."""
    await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="verbose", namespace="bench", uid=f"uid-{logs.name}"),
        log_directory=str(logs),
    )
    pod = await client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app"),
        image=cri.ImageSpec(image=image),
        command=["sleep", "3600"],
        log_path="app.log",
    )
    created = await client.runtime.create_container(
        cri.CreateContainerRequest(pod.pod_sandbox_id, container, sandbox_config=config)
    )
    await client.runtime.start_container(cri.StartContainerRequest(created.container_id))
    runtime, images = "runtime.v1.RuntimeService", "runtime.v1.ImageService"
    return [
        ("ContainerStatus", runtime, cri.ContainerStatusRequest(created.container_id, True)),
        ("PodSandboxStatus", runtime, cri.PodSandboxStatusRequest(pod.pod_sandbox_id, True)),
        ("Status", runtime, cri.StatusRequest(verbose=True)),
        ("ImageStatus", images, cri.ImageStatusRequest(cri.ImageSpec(image=image), True)),
        # An empty call: each server's per-call floor, for scale.
        ("Version", runtime, cri.VersionRequest()),
    ], pod.pod_sandbox_id


async def raw_call(client: CriClient, method: str, request: Any, service: str) -> bytes:
    """The reply as wire bytes: the runtime and transport, not this client's decode."""
    async with client.channel.request(
        f"/{service}/{method}", Cardinality.UNARY_UNARY, type(request), RawReply
    ) as stream:
        await stream.send_message(request, end=True)
        reply = await stream.recv_message()
    assert reply is not None
    return reply.data


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--live", action="store_true", help="over the socket, against containerd")
    args = parser.parse_args()
    asyncio.run(live(args.calls) if args.live else main(args.calls))


if __name__ == "__main__":
    cli()
