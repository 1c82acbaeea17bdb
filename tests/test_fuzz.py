"""Hostile input: random CRI requests for many RPCs against a running shim.

Every answer must be a success or a gRPC status that blames the request
(INVALID_ARGUMENT, NOT_FOUND, ...), never INTERNAL/UNKNOWN from a bug of ours;
the server stays up, and once the pods the fuzzer managed to create are
removed, containerd holds what it held before and no netns pin is left.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_asyncio
from grpclib import GRPCError
from grpclib.const import Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .conftest import CriClient, make_settings, short_tempdir
from .pods import CNI_BIN, pod_config
from .support.catalog import ServedCatalog

# More for a longer hunt: CRI_SHIM_FUZZ_EXAMPLES=5000.
EXAMPLES = int(os.environ.get("CRI_SHIM_FUZZ_EXAMPLES", "300"))
NAMESPACE = "crishim-fuzz"
# Statuses that say "our bug", not "your request".
FORBIDDEN = {Status.INTERNAL, Status.UNKNOWN, Status.DATA_LOSS}

HOSTILE = [
    "",
    ".",
    "..",
    "../",
    "../../etc/passwd",
    "/",
    "/etc/shadow",
    "a/../../b",
    "x" * 5000,
    "\x00",
    "a\x00b",
    "/proc/self/root",
    "*",
    "-",
    "ü\u202e",
]
text = st.one_of(
    st.sampled_from(HOSTILE), st.text(max_size=40), st.text(min_size=300, max_size=600)
)
number = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 1, 2**31 - 1]))
enum = st.integers(0, 130)
labels = st.dictionaries(text, text, max_size=3)


@dataclass
class Target:
    shim: Shim
    client: CriClient
    pod_id: str
    pod: cri.PodSandboxConfig
    image: str
    ids: list[str] = field(default_factory=list)


def ids(target: Target) -> st.SearchStrategy[str]:
    return st.one_of(
        text, st.sampled_from([target.pod_id, *target.ids]), st.just(target.pod_id[:6])
    )


def metadata(name: st.SearchStrategy[str]) -> st.SearchStrategy[cri.PodSandboxMetadata]:
    return st.builds(
        cri.PodSandboxMetadata,
        name=name,
        uid=text,
        namespace=text,
        attempt=st.integers(0, 2**32 - 1),
    )


def pod_configs(target: Target) -> st.SearchStrategy[cri.PodSandboxConfig]:
    return st.builds(
        cri.PodSandboxConfig,
        metadata=st.one_of(st.none(), metadata(text)),
        hostname=text,
        log_directory=st.one_of(text, st.just(str(target.shim.settings.state_path / "fuzzlogs"))),
        dns_config=st.one_of(
            st.none(),
            st.builds(
                cri.DnsConfig,
                servers=st.lists(text, max_size=3),
                searches=st.lists(text, max_size=3),
            ),
        ),
        port_mappings=st.lists(
            st.builds(
                cri.PortMapping,
                protocol=enum,
                container_port=number,
                host_port=number,
                host_ip=text,
            ),
            max_size=2,
        ),
        labels=labels,
        annotations=labels,
        linux=st.one_of(
            st.none(),
            st.builds(
                cri.LinuxPodSandboxConfig,
                cgroup_parent=text,
                sysctls=labels,
                security_context=st.one_of(
                    st.none(),
                    st.builds(
                        cri.LinuxSandboxSecurityContext,
                        namespace_options=st.builds(
                            cri.NamespaceOption, network=enum, pid=enum, ipc=enum, target_id=text
                        ),
                        seccomp=st.one_of(
                            st.none(),
                            st.builds(cri.SecurityProfile, profile_type=enum, localhost_ref=text),
                        ),
                        run_as_user=st.one_of(st.none(), st.builds(cri.Int64Value, value=number)),
                        supplemental_groups=st.lists(number, max_size=3),
                    ),
                ),
            ),
        ),
    )


def container_configs(target: Target) -> st.SearchStrategy[cri.ContainerConfig]:
    return st.builds(
        cri.ContainerConfig,
        metadata=st.one_of(
            st.none(), st.builds(cri.ContainerMetadata, name=text, attempt=st.integers(0, 5))
        ),
        image=st.one_of(
            st.none(), st.builds(cri.ImageSpec, image=st.one_of(text, st.just(target.image)))
        ),
        command=st.lists(text, max_size=3),
        args=st.lists(text, max_size=3),
        working_dir=text,
        envs=st.lists(st.builds(cri.KeyValue, key=text, value=st.binary(max_size=20)), max_size=3),
        mounts=st.lists(
            st.builds(
                cri.Mount,
                container_path=text,
                host_path=text,
                readonly=st.booleans(),
                propagation=enum,
            ),
            max_size=2,
        ),
        devices=st.lists(
            st.builds(cri.Device, container_path=text, host_path=text, permissions=text), max_size=2
        ),
        labels=labels,
        annotations=labels,
        log_path=text,
        stdin=st.booleans(),
        tty=st.booleans(),
        stop_signal=enum,
        linux=st.one_of(
            st.none(),
            st.builds(
                cri.LinuxContainerConfig,
                resources=st.one_of(
                    st.none(),
                    st.builds(
                        cri.LinuxContainerResources,
                        cpu_period=number,
                        cpu_quota=number,
                        cpu_shares=number,
                        memory_limit_in_bytes=number,
                        oom_score_adj=number,
                        cpuset_cpus=text,
                        cpuset_mems=text,
                    ),
                ),
                security_context=st.one_of(
                    st.none(),
                    st.builds(
                        cri.LinuxContainerSecurityContext,
                        capabilities=st.one_of(
                            st.none(),
                            st.builds(
                                cri.Capability,
                                add_capabilities=st.lists(text, max_size=2),
                                drop_capabilities=st.lists(text, max_size=2),
                            ),
                        ),
                        privileged=st.booleans(),
                        namespace_options=st.one_of(
                            st.none(),
                            st.builds(
                                cri.NamespaceOption,
                                network=enum,
                                pid=enum,
                                ipc=enum,
                                target_id=text,
                            ),
                        ),
                        seccomp=st.one_of(
                            st.none(),
                            st.builds(cri.SecurityProfile, profile_type=enum, localhost_ref=text),
                        ),
                        apparmor=st.one_of(
                            st.none(),
                            st.builds(cri.SecurityProfile, profile_type=enum, localhost_ref=text),
                        ),
                        run_as_user=st.one_of(st.none(), st.builds(cri.Int64Value, value=number)),
                        run_as_username=text,
                        masked_paths=st.lists(text, max_size=2),
                        readonly_paths=st.lists(text, max_size=2),
                    ),
                ),
            ),
        ),
    )


Call = Callable[[CriClient], Awaitable[Any]]


async def drain(stream: AsyncIterator[Any]) -> int:
    """A server stream read to its end (the fuzz cares about its status only)."""
    return len([batch async for batch in stream])


def calls(target: Target) -> st.SearchStrategy[tuple[str, Call]]:
    """(rpc name, coroutine factory) for one random request."""
    rt = lambda name, make: make.map(lambda req: (name, lambda c: getattr(c.runtime, name)(req)))  # noqa: E731
    im = lambda name, make: make.map(lambda req: (name, lambda c: getattr(c.image, name)(req)))  # noqa: E731
    rts = lambda name, make: make.map(  # noqa: E731
        lambda req: (name, lambda c: drain(getattr(c.runtime, name)(req)))
    )
    some_id = ids(target)
    container_filters = st.one_of(
        st.none(),
        st.builds(
            cri.ContainerFilter,
            id=some_id,
            pod_sandbox_id=some_id,
            state=st.one_of(st.none(), st.builds(cri.ContainerStateValue, state=enum)),
            label_selector=labels,
        ),
    )
    pod_filters = st.one_of(
        st.none(),
        st.builds(
            cri.PodSandboxFilter,
            id=some_id,
            state=st.one_of(st.none(), st.builds(cri.PodSandboxStateValue, state=enum)),
            label_selector=labels,
        ),
    )
    container_stats_filters = st.one_of(
        st.none(),
        st.builds(
            cri.ContainerStatsFilter, id=some_id, pod_sandbox_id=some_id, label_selector=labels
        ),
    )
    pod_stats_filters = st.one_of(
        st.none(), st.builds(cri.PodSandboxStatsFilter, id=some_id, label_selector=labels)
    )
    image_filters = st.one_of(
        st.none(),
        st.builds(
            cri.ImageFilter, image=st.one_of(st.none(), st.builds(cri.ImageSpec, image=text))
        ),
    )
    return st.one_of(
        rt("version", st.builds(cri.VersionRequest, version=text)),
        rt("status", st.builds(cri.StatusRequest, verbose=st.booleans())),
        rt(
            "run_pod_sandbox",
            st.builds(
                cri.RunPodSandboxRequest,
                config=st.one_of(st.none(), pod_configs(target)),
                runtime_handler=st.one_of(st.just(""), text),
            ),
        ),
        rt("stop_pod_sandbox", st.builds(cri.StopPodSandboxRequest, pod_sandbox_id=text)),
        rt("remove_pod_sandbox", st.builds(cri.RemovePodSandboxRequest, pod_sandbox_id=text)),
        rt(
            "pod_sandbox_status",
            st.builds(cri.PodSandboxStatusRequest, pod_sandbox_id=some_id, verbose=st.booleans()),
        ),
        rt(
            "list_pod_sandbox",
            st.builds(
                cri.ListPodSandboxRequest,
                filter=pod_filters,
            ),
        ),
        rt(
            "create_container",
            st.builds(
                cri.CreateContainerRequest,
                pod_sandbox_id=some_id,
                config=st.one_of(st.none(), container_configs(target)),
                sandbox_config=st.one_of(st.none(), st.just(target.pod)),
            ),
        ),
        rt("start_container", st.builds(cri.StartContainerRequest, container_id=some_id)),
        rt(
            "stop_container",
            st.builds(cri.StopContainerRequest, container_id=some_id, timeout=st.integers(-5, 1)),
        ),
        rt("remove_container", st.builds(cri.RemoveContainerRequest, container_id=some_id)),
        rt(
            "container_status",
            st.builds(cri.ContainerStatusRequest, container_id=some_id, verbose=st.booleans()),
        ),
        rt(
            "list_containers",
            st.builds(
                cri.ListContainersRequest,
                filter=container_filters,
            ),
        ),
        rt(
            "update_container_resources",
            st.builds(
                cri.UpdateContainerResourcesRequest,
                container_id=some_id,
                linux=st.one_of(
                    st.none(),
                    st.builds(
                        cri.LinuxContainerResources,
                        cpu_period=number,
                        cpu_quota=number,
                        cpu_shares=number,
                        memory_limit_in_bytes=number,
                        cpuset_cpus=text,
                        unified=labels,
                    ),
                ),
            ),
        ),
        rt("container_stats", st.builds(cri.ContainerStatsRequest, container_id=some_id)),
        rt(
            "list_container_stats",
            st.builds(
                cri.ListContainerStatsRequest,
                filter=container_stats_filters,
            ),
        ),
        rt("pod_sandbox_stats", st.builds(cri.PodSandboxStatsRequest, pod_sandbox_id=some_id)),
        rts(
            "stream_containers",
            st.builds(
                cri.StreamContainersRequest,
                filter=container_filters,
            ),
        ),
        rts(
            "stream_pod_sandboxes",
            st.builds(
                cri.StreamPodSandboxesRequest,
                filter=pod_filters,
            ),
        ),
        rts(
            "stream_container_stats",
            st.builds(
                cri.StreamContainerStatsRequest,
                filter=container_stats_filters,
            ),
        ),
        rts(
            "stream_pod_sandbox_stats",
            st.builds(
                cri.StreamPodSandboxStatsRequest,
                filter=pod_stats_filters,
            ),
        ),
        rts("stream_pod_sandbox_metrics", st.builds(cri.StreamPodSandboxMetricsRequest)),
        rt(
            "exec",
            st.builds(
                cri.ExecRequest,
                container_id=some_id,
                cmd=st.lists(text, max_size=2),
                tty=st.booleans(),
                stdout=st.booleans(),
            ),
        ),
        rt("attach", st.builds(cri.AttachRequest, container_id=some_id, stdout=st.booleans())),
        rt(
            "port_forward",
            st.builds(
                cri.PortForwardRequest, pod_sandbox_id=some_id, port=st.lists(number, max_size=2)
            ),
        ),
        rt("reopen_container_log", st.builds(cri.ReopenContainerLogRequest, container_id=some_id)),
        rt(
            "exec_sync",
            st.builds(
                cri.ExecSyncRequest,
                container_id=some_id,
                cmd=st.lists(text, max_size=3),
                timeout=st.integers(0, 1),
            ),
        ),
        rt(
            "update_runtime_config",
            st.builds(
                cri.UpdateRuntimeConfigRequest,
                runtime_config=st.one_of(
                    st.none(),
                    st.builds(
                        cri.RuntimeConfig,
                        network_config=st.one_of(
                            st.none(), st.builds(cri.NetworkConfig, pod_cidr=text)
                        ),
                    ),
                ),
            ),
        ),
        im(
            "image_status",
            st.builds(
                cri.ImageStatusRequest,
                image=st.one_of(st.none(), st.builds(cri.ImageSpec, image=text)),
                verbose=st.booleans(),
            ),
        ),
        im(
            "list_images",
            st.builds(
                cri.ListImagesRequest,
                filter=image_filters,
            ),
        ),
        im(
            "remove_image",
            st.builds(
                cri.RemoveImageRequest,
                image=st.one_of(st.none(), st.builds(cri.ImageSpec, image=text)),
            ),
        ),
        im("image_fs_info", st.builds(cri.ImageFsInfoRequest)),
        st.builds(
            cri.StreamImagesRequest,
            filter=image_filters,
        ).map(lambda req: ("stream_images", lambda c: drain(c.image.stream_images(req)))),
        im(
            "pull_image",
            st.builds(
                cri.PullImageRequest,
                image=st.one_of(
                    st.none(), st.builds(cri.ImageSpec, image=st.sampled_from(HOSTILE))
                ),
            ),
        ),
    )


@pytest_asyncio.fixture(loop_scope="session")
async def target(
    containerd: EmbeddedContainerd, pod_images: ServedCatalog
) -> AsyncIterator[Target]:
    """A shim of its own (own namespace, no CNI config: host-network pods only)
    with one running pod and busybox, so container calls reach deep."""
    base = short_tempdir("crishim-fuzz-")
    settings = make_settings(
        base,
        containerd.address,
        registry__config_path=str(pod_images.write_hosts_dir(base / "certs.d")),
        cni__bin_dirs=(CNI_BIN,),
        cni__netns_dir=str(base / "netns"),
        containerd__namespace=NAMESPACE,
    )
    shim = Shim(settings)
    await shim.start()
    client = CriClient.connect(shim.socket_path)
    image = pod_images.local("library/busybox:latest")
    await client.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    config = pod_config(
        "fuzz",
        log_directory=str(base / "logs"),
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(network=cri.NamespaceMode.NODE)
            )
        ),
    )
    pod_id = (
        await client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    ).pod_sandbox_id
    yield Target(shim, client, pod_id, config, image)
    listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
    for item in listed.items:
        await client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(item.id))
    client.close()
    await shim.stop()


async def containerd_objects(target: Target) -> int:
    assert target.shim.client is not None
    reply = await target.shim.client.containers.list(containers_v1.ListContainersRequest())
    return len(reply.containers)


def netns_pins(target: Target) -> int:
    path = Path(target.shim.settings.cni.netns_dir)
    return len(os.listdir(path)) if path.exists() else 0


async def test_random_requests_get_grpc_errors_only(target: Target) -> None:
    before = (await containerd_objects(target), netns_pins(target))
    loop = asyncio.get_running_loop()
    sent: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    bugs: list[str] = []

    async def send(name: str, call: Call) -> None:
        sent[name] += 1
        try:
            await asyncio.wait_for(call(target.client), 30)
            statuses["OK"] += 1
        except GRPCError as err:
            statuses[err.status.name] += 1
            if err.status in FORBIDDEN:
                bugs.append(f"{name}: {err.status.name}: {err.message}")

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        name, call = data.draw(calls(target))
        asyncio.run_coroutine_threadsafe(send(name, call), loop).result()

    await asyncio.to_thread(fuzz)
    # Still serving.
    assert (await target.client.runtime.version(cri.VersionRequest())).runtime_name
    print(f"fuzz: {sum(sent.values())} requests over {len(sent)} RPCs; statuses {dict(statuses)}")
    assert not bugs, "\n".join(sorted(set(bugs))[:20])

    listed = await target.client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
    for item in listed.items:
        if item.id != target.pod_id:
            await target.client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(item.id))
    containers = await target.client.runtime.list_containers(cri.ListContainersRequest())
    for container in containers.containers:
        await target.client.runtime.remove_container(cri.RemoveContainerRequest(container.id))
    assert (await containerd_objects(target), netns_pins(target)) == before
