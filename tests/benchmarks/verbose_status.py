"""Micro-benchmark of the status handlers, in process (no containerd, no gRPC):
what one ContainerStatus / PodSandboxStatus / Status call costs the shim's
event loop, plain and verbose, encoding included (grpclib's codec calls
SerializeToString on the reply).

    python -m tests.benchmarks.verbose_status [--calls 2000]

critest's benchmark calls ContainerStatus and PodSandboxStatus with
verbose=true once per lifecycle step; kubelet polls Status. Each record is
asked `--calls` times with nothing changing (the cached case), then as many
times with a field assigned before every call (each answer built afresh).
Prints µs per call. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cri_shim.containerd.client import ContainerdClient
from cri_shim.containerd.health import ContainerdHealth
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


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.calls))


if __name__ == "__main__":
    cli()
