"""List/Status answers assembled from cached encodings must be byte-identical to
encoding the records afresh, after every kind of change to a record."""

from __future__ import annotations

import random
from typing import Any

from cri_shim.cri.container import ContainerHandlers
from cri_shim.cri.sandbox import SandboxHandlers
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim
from cri_shim.store.containers import Container, ContainerState, ContainerStore
from cri_shim.store.encoded import message_field
from cri_shim.store.sandboxes import Sandbox, SandboxState, SandboxStore
from cri_shim.store.verbose import RUNC_IDENTITY, container_info, go_json, sandbox_info

from .conftest import CriClient
from .pods import make_container, wait_exited


def sandbox(index: int) -> Sandbox:
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=f"p{index}", namespace="ns", uid=f"u{index}"),
        labels={"app": "a" if index % 2 else "b", "i": str(index)},
        annotations={"note": "x" * index},
    )
    return Sandbox(
        id=f"{index:02d}" + "s" * 62,
        name=f"p{index}_ns_u{index}_0",
        config=config,
        runtime_handler="",
        created_at=1_700_000_000_000_000_000 + index,
        image_id="sha256:" + "e" * 64,
    )


def container(index: int, sandbox_id: str) -> Container:
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=f"c{index}", attempt=index % 3),
        image=cri.ImageSpec(image="busybox"),
        labels={"app": "a" if index % 2 else "b"},
        annotations={"k": str(index)},
        mounts=[cri.Mount(container_path="/data", host_path=f"/tmp/{index}")],
    )
    made = Container(
        id=f"{index:02d}" + "c" * 62,
        name=f"c{index}_x_0",
        sandbox_id=sandbox_id,
        config=config,
        image_ref="busybox",
        image_id="sha256:" + "f" * 64,
        image_repo_ref="busybox@sha256:" + "d" * 64,
        created_at=1_700_000_000_000_000_000 + index,
        log_path=f"/logs/c{index}.log",
    )
    made.runtime.spec = {"ociVersion": "1.0.2-dev", "process": {"args": ["sh", str(index)]}}
    return made


def handlers() -> tuple[SandboxHandlers, ContainerHandlers, SandboxStore, ContainerStore]:
    sandboxes, containers = SandboxStore(), ContainerStore()
    none: Any = None
    return (
        SandboxHandlers(sandboxes, none, "runc"),
        ContainerHandlers(containers, sandboxes, none, none),
        sandboxes,
        containers,
    )


async def assert_identical(
    sh: SandboxHandlers,
    ch: ContainerHandlers,
    sandboxes: SandboxStore,
    containers: ContainerStore,
) -> None:
    """Every List/Status answer (with and without filters) equals the fresh encoding."""
    sandbox_filters: list[cri.PodSandboxFilter | None] = [
        None,
        cri.PodSandboxFilter(label_selector={"app": "a"}),
        cri.PodSandboxFilter(state=cri.PodSandboxStateValue(cri.PodSandboxState.SANDBOX_READY)),
        cri.PodSandboxFilter(id="01"),
    ]
    for sf in sandbox_filters:
        got = bytes(await sh.list_pod_sandbox(cri.ListPodSandboxRequest(filter=sf)))
        fresh = bytes(cri.ListPodSandboxResponse(items=[s.to_cri() for s in sandboxes.list(sf)]))
        assert got == fresh
        assert cri.ListPodSandboxResponse.parse(got) == cri.ListPodSandboxResponse.parse(fresh)
    container_filters: list[cri.ContainerFilter | None] = [
        None,
        cri.ContainerFilter(label_selector={"app": "b"}),
        cri.ContainerFilter(state=cri.ContainerStateValue(cri.ContainerState.CONTAINER_RUNNING)),
        cri.ContainerFilter(pod_sandbox_id="01"),
    ]
    for cf in container_filters:
        got = bytes(await ch.list_containers(cri.ListContainersRequest(filter=cf)))
        fresh = bytes(
            cri.ListContainersResponse(containers=[c.to_cri() for c in containers.list(cf)])
        )
        assert got == fresh
    for s in sandboxes.list(None):
        for verbose in (False, True):
            got = bytes(
                await sh.pod_sandbox_status(cri.PodSandboxStatusRequest(s.id, verbose=verbose))
            )
            info = {"info": go_json(sandbox_info(s, RUNC_IDENTITY))} if verbose else {}
            assert got == bytes(cri.PodSandboxStatusResponse(status=s.to_status(), info=info))
    for c in containers.list(None):
        for verbose in (False, True):
            got = bytes(await ch.container_status(cri.ContainerStatusRequest(c.id, verbose)))
            fresh_info = go_json(container_info(c, c.runtime.spec, RUNC_IDENTITY))
            info = {"info": fresh_info} if verbose else {}
            assert got == bytes(cri.ContainerStatusResponse(status=c.to_status(), info=info))


async def test_cached_encodings_follow_every_change() -> None:
    sh, ch, sandboxes, containers = handlers()
    await assert_identical(sh, ch, sandboxes, containers)  # empty
    pods = [sandbox(i) for i in range(4)]
    for p in pods:
        sandboxes.add(p)
    await assert_identical(sh, ch, sandboxes, containers)
    ctrs = [container(i, pods[i % 4].id) for i in range(8)]
    for c in ctrs:
        containers.add(c)
    await assert_identical(sh, ch, sandboxes, containers)
    # Sandbox changes: network, start, stop.
    pods[1].ip, pods[1].additional_ips = "10.0.0.2", ["fd00::2"]
    pods[1].network_ready = True
    pods[1].pid, pods[1].state = 42, SandboxState.READY
    pods[2].state = SandboxState.READY
    await assert_identical(sh, ch, sandboxes, containers)
    pods[2].state, pods[2].pid = SandboxState.NOTREADY, 0
    # Container changes: start, resources, user, exit, start failure, unknown.
    ctrs[0].pid, ctrs[0].state, ctrs[0].started_at = 7, ContainerState.RUNNING, 5
    ctrs[1].state = ContainerState.RUNNING
    ctrs[1].resources = cri.LinuxContainerResources(cpu_shares=512, memory_limit_in_bytes=1 << 26)
    ctrs[1].user = (1000, 1000, (10, 11))
    await assert_identical(sh, ch, sandboxes, containers)
    ctrs[0].state, ctrs[0].exit_code, ctrs[0].finished_at = ContainerState.EXITED, 137, 9
    ctrs[0].reason, ctrs[0].oom_killed = "OOMKilled", True
    ctrs[2].state, ctrs[2].exit_code = ContainerState.EXITED, 128
    ctrs[2].reason, ctrs[2].message = "StartError", "exec: not found"
    ctrs[3].state = ContainerState.UNKNOWN
    ctrs[1].resources = cri.LinuxContainerResources(cpu_shares=1024)
    await assert_identical(sh, ch, sandboxes, containers)
    # Verbose-only changes: a new stored spec (UpdateContainerResources), removal under
    # way, a pod's CNI result, spec and image, its task deleted.
    ctrs[4].runtime.spec = {"ociVersion": "1.0.2-dev", "linux": {"resources": {"cpu": {}}}}
    ctrs[5].removing = True
    pods[0].cni_result = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}
    pods[0].spec = {"ociVersion": "1.0.2-dev"}
    pods[0].image = "registry.k8s.io/pause:3.9"
    pods[0].task_deleted = True
    await assert_identical(sh, ch, sandboxes, containers)
    # Removal.
    containers.remove(ctrs[0])
    sandboxes.remove(pods[3])
    await assert_identical(sh, ch, sandboxes, containers)


async def test_random_changes_never_serve_stale_bytes() -> None:
    sh, ch, sandboxes, containers = handlers()
    rng = random.Random(7)
    pods = [sandbox(i) for i in range(5)]
    for p in pods:
        sandboxes.add(p)
    ctrs = [container(i, pods[i % 5].id) for i in range(20)]
    for c in ctrs:
        containers.add(c)
    for _ in range(60):
        c = rng.choice(ctrs)
        c.state = rng.choice(list(ContainerState))
        c.exit_code = rng.randrange(3)
        p = rng.choice(pods)
        p.state = rng.choice(list(SandboxState))
        p.ip = f"10.0.0.{rng.randrange(250)}"
        await assert_identical(sh, ch, sandboxes, containers)


def test_message_field_matches_betterproto() -> None:
    for size in (0, 1, 127, 128, 300, 20000):
        item = cri.PodSandbox(id="x" * size) if size else cri.PodSandbox()
        assert message_field(1, bytes(item)) == bytes(cri.ListPodSandboxResponse(items=[item]))


async def test_real_lifecycle_wire_bytes_match_fresh(
    pods: CriClient, pod_shim: Shim, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    """On the wire, through a real create/start/exit/stop/remove."""

    async def check() -> None:
        for s in pod_shim.sandboxes.list(None):
            status = await pods.runtime.pod_sandbox_status(cri.PodSandboxStatusRequest(s.id))
            assert bytes(status) == bytes(cri.PodSandboxStatusResponse(status=s.to_status()))
        listed = await pods.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
        fresh = [s.to_cri() for s in pod_shim.sandboxes.list(None)]
        assert bytes(listed) == bytes(cri.ListPodSandboxResponse(items=fresh))
        for c in pod_shim.containers.list(None):
            container_status = await pods.runtime.container_status(cri.ContainerStatusRequest(c.id))
            expected = cri.ContainerStatusResponse(status=c.to_status())
            assert bytes(container_status) == bytes(expected)
        reply = await pods.runtime.list_containers(cri.ListContainersRequest())
        fresh_c = [c.to_cri() for c in pod_shim.containers.list(None)]
        assert bytes(reply) == bytes(cri.ListContainersResponse(containers=fresh_c))

    await check()
    sleeper = await make_container(
        pods, pod, busybox, ["sleep", "3600"], name="sleeper", start=False
    )
    await check()
    await pods.runtime.start_container(cri.StartContainerRequest(sleeper))
    await check()
    quick = await make_container(pods, pod, busybox, ["sh", "-c", "exit 3"], name="quick")
    status = await wait_exited(pods, quick)
    assert status.exit_code == 3
    await check()
    await pods.runtime.stop_container(cri.StopContainerRequest(sleeper, 0))
    await check()
    await pods.runtime.remove_container(cri.RemoveContainerRequest(quick))
    await check()
    await pods.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod[0]))
    await check()
