"""Hostile input: random CRI requests for many RPCs against a running shim.

Every answer must be a success or a gRPC status that blames the request
(INVALID_ARGUMENT, NOT_FOUND, ...), never INTERNAL/UNKNOWN from a bug of ours;
no call hangs (DEADLINE_EXCEEDED, UNAVAILABLE from a live containerd); the
server stays up, and once the pods the fuzzer managed to create are removed,
containerd holds what it held before (containers, tasks, snapshots, leases,
content), and no mount or netns pin is left.
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
from cri_shim.gen.containerd.services.content import v1 as content_v1
from cri_shim.gen.containerd.services.leases import v1 as leases_v1
from cri_shim.gen.containerd.services.snapshots import v1 as snapshots_v1
from cri_shim.gen.containerd.services.tasks import v1 as tasks_v1
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .conftest import CriClient, make_settings, short_tempdir, wait_for
from .pods import CNI_BIN, pod_config
from .support.catalog import ServedCatalog

# More for a longer hunt: CRI_SHIM_FUZZ_EXAMPLES=5000.
EXAMPLES = int(os.environ.get("CRI_SHIM_FUZZ_EXAMPLES", "300"))
NAMESPACE = "crishim-fuzz"
# Statuses that say "our bug", not "your request".
FORBIDDEN = {Status.INTERNAL, Status.UNKNOWN, Status.DATA_LOSS}
# Statuses that say "it hung" while containerd is up: failures as well. ExecSync
# answers DEADLINE_EXCEEDED when the command outlives the request's own timeout,
# as containerd's CRI does; that one is the request's doing.
HANGS = {Status.DEADLINE_EXCEEDED, Status.UNAVAILABLE}
REQUEST_DEADLINES = {"exec_sync"}
# Answers that are the request's doing although UNKNOWN, as containerd's CRI gives
# them (tests/test_parity_behaviour.py): runc refusing to start a command (missing,
# not executable, ...) or a hostname on a hostNetwork pod, stats of a container
# that has no task.
CONTAINERD_UNKNOWNS = {
    "exec_sync": "unable to start container process: exec: ",
    "run_pod_sandbox": "unable to set hostname without a private UTS namespace",
    "container_stats": "unexpected metrics response: []",
}

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
    # Ids that later requests aim at: a ring of fixed size, so hypothesis sees the
    # same strategy shape on every draw (only the values change).
    ids: list[str] = field(default_factory=lambda: [f"not-made-yet-{i}" for i in range(8)])
    pods: list[str] = field(default_factory=list)  # the pods it made, ring as well
    count: int = 0

    def __post_init__(self) -> None:
        self.pods = [self.pod_id] * 4

    def made(self, object_id: str, *, pod: bool) -> None:
        self.ids[self.count % len(self.ids)] = object_id
        if pod:
            self.pods[self.count % len(self.pods)] = object_id
        self.count += 1


# CheckpointContainer locations that must be refused, whatever the container.
BAD_LOCATIONS = [
    "",
    ".",
    "..",
    "a/../../b",
    "/",
    "/proc/self/root",
    "/nonexistent-dir/c.tar",
    "\x00",
    "/a\x00b",
    "x" * 5000,
]


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


NAME = st.text("abcxyz019-", min_size=1, max_size=12).filter(
    lambda n: n[0].isalnum() and n[-1].isalnum()
)


def plausible_container_configs(target: Target) -> st.SearchStrategy[cri.ContainerConfig]:
    """Configs that can succeed, so creates, starts and removals really happen and
    what they leave behind is checked; a few fields still random."""
    return st.builds(
        cri.ContainerConfig,
        metadata=st.builds(cri.ContainerMetadata, name=NAME, attempt=st.integers(0, 2)),
        image=st.just(cri.ImageSpec(image=target.image)),
        command=st.sampled_from([["sleep", "3600"], ["true"], ["sh", "-c", "exit 3"], []]),
        envs=st.lists(st.builds(cri.KeyValue, key=NAME, value=st.binary(max_size=8)), max_size=2),
        labels=labels,
        log_path=st.one_of(st.just(""), NAME.map(lambda n: f"{n}.log")),
        tty=st.booleans(),
        stdin=st.booleans(),
    )


def plausible_pod_configs(target: Target) -> st.SearchStrategy[cri.PodSandboxConfig]:
    """Host-network pod configs that can succeed (the shim has no CNI config)."""
    return st.builds(
        cri.PodSandboxConfig,
        metadata=st.builds(
            cri.PodSandboxMetadata, name=NAME, uid=NAME, namespace=NAME, attempt=st.integers(0, 2)
        ),
        log_directory=st.just(str(target.shim.settings.state_path / "fuzzlogs")),
        hostname=st.one_of(st.just(""), NAME),
        labels=labels,
        linux=st.just(
            cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(network=cri.NamespaceMode.NODE)
                )
            )
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

    def rt(name: str, make: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Call]]:
        """A RuntimeService call of `name` with requests drawn from `make`."""
        return make.map(lambda req: (name, lambda c: getattr(c.runtime, name)(req)))

    def im(name: str, make: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Call]]:
        """An ImageService call of `name` with requests drawn from `make`."""
        return make.map(lambda req: (name, lambda c: getattr(c.image, name)(req)))

    def rts(name: str, make: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Call]]:
        """A RuntimeService server stream of `name`, read to its end."""
        return make.map(lambda req: (name, lambda c: drain(getattr(c.runtime, name)(req))))

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
    plausible_create = rt(
        "create_container",
        st.builds(
            cri.CreateContainerRequest,
            pod_sandbox_id=st.sampled_from(target.pods),
            config=plausible_container_configs(target),
            sandbox_config=st.just(target.pod),
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
        # Requests that can succeed, so real objects are made (and must be cleaned up).
        rt(
            "run_pod_sandbox",
            st.builds(cri.RunPodSandboxRequest, config=plausible_pod_configs(target)),
        ),
        plausible_create,
        plausible_create,  # twice: a pod the fuzz removed refuses some
        rt("start_container", st.builds(cri.StartContainerRequest, st.sampled_from(target.ids))),
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
        rt(
            "update_pod_sandbox_resources",
            st.builds(
                cri.UpdatePodSandboxResourcesRequest,
                pod_sandbox_id=some_id,
                overhead=st.one_of(
                    st.none(), st.builds(cri.LinuxContainerResources, cpu_shares=number)
                ),
                resources=st.one_of(
                    st.none(),
                    st.builds(
                        cri.LinuxContainerResources,
                        cpu_period=number,
                        cpu_quota=number,
                        cpu_shares=number,
                        memory_limit_in_bytes=number,
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
            "checkpoint_container",
            st.builds(
                cri.CheckpointContainerRequest,
                container_id=some_id,
                # Never a writable path: a running target would really be checkpointed there.
                location=st.sampled_from(BAD_LOCATIONS),
                timeout=number,
            ),
        ),
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


async def held(target: Target) -> dict[str, set[str]]:
    """What containerd holds in the shim's namespace, and the shim's mounts and
    netns pins on the host, by name: what the fuzz must leave as it found it."""
    client = target.shim.client
    assert client is not None
    containers = await client.containers.list(containers_v1.ListContainersRequest())
    tasks = await client.tasks.list(tasks_v1.ListTasksRequest())
    leases = await client.leases.list(leases_v1.ListRequest())
    snapshots: set[str] = set()
    async for reply in client.snapshots.list(
        snapshots_v1.ListSnapshotsRequest(snapshotter="overlayfs")
    ):
        snapshots |= {f"{info.kind.name}:{info.name}" for info in reply.info}
    content: set[str] = set()
    async for listed in client.content.list(content_v1.ListContentRequest()):
        content |= {info.digest for info in listed.info}
    netns = Path(target.shim.settings.cni.netns_dir)
    state = str(target.shim.settings.state_path)
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    return {
        "containers": {c.id for c in containers.containers},
        "tasks": {f"{t.id}:{t.status}" for t in tasks.tasks},
        "snapshots": snapshots,
        "leases": {lease.id for lease in leases.leases},
        "content": content,
        "mounts": {line.split()[4] for line in mountinfo if f" {state}/" in line},
        "netns": set(os.listdir(netns)) if netns.exists() else set(),
    }


async def make_targets(target: Target) -> None:
    """Two pods with a running and a created container each, made before the fuzz
    (which aims at them, and makes more when its draws allow): the check that
    everything is gone afterwards then always covers real objects."""
    for index in range(2):
        config = pod_config(
            f"fuzz-target-{index}",
            log_directory=str(target.shim.settings.state_path / "fuzzlogs"),
            linux=target.pod.linux,
        )
        reply = await target.client.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
        target.made(reply.pod_sandbox_id, pod=True)
        for name, start in (("running", True), ("created", False)):
            made = await target.client.runtime.create_container(
                cri.CreateContainerRequest(
                    pod_sandbox_id=reply.pod_sandbox_id,
                    config=cri.ContainerConfig(
                        metadata=cri.ContainerMetadata(name=name),
                        image=cri.ImageSpec(image=target.image),
                        command=["sleep", "3600"],
                        log_path=f"{name}.log",
                    ),
                    sandbox_config=config,
                )
            )
            if start:
                await target.client.runtime.start_container(
                    cri.StartContainerRequest(made.container_id)
                )
            target.made(made.container_id, pod=False)


async def test_random_requests_get_grpc_errors_only(target: Target) -> None:
    before = await held(target)
    await make_targets(target)
    loop = asyncio.get_running_loop()
    sent: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    succeeded: Counter[str] = Counter()
    bugs: list[str] = []

    async def send(name: str, call: Call) -> None:
        sent[name] += 1
        try:
            reply = await asyncio.wait_for(call(target.client), 30)
            statuses["OK"] += 1
            succeeded[name] += 1
            made = getattr(reply, "container_id", "") or getattr(reply, "pod_sandbox_id", "")
            if name in ("create_container", "run_pod_sandbox") and made:
                target.made(made, pod=name == "run_pod_sandbox")
        except TimeoutError:
            statuses["no answer in 30s"] += 1
            bugs.append(f"{name}: no answer in 30s")
        except GRPCError as err:
            statuses[err.status.name] += 1
            hung = err.status in HANGS and not (
                err.status is Status.DEADLINE_EXCEEDED and name in REQUEST_DEADLINES
            )
            refused = err.status is Status.UNKNOWN and CONTAINERD_UNKNOWNS.get(name, "\0") in (
                err.message or ""
            )
            if (err.status in FORBIDDEN and not refused) or hung:
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
    print(
        f"fuzz: {sum(sent.values())} requests over {len(sent)} RPCs; statuses {dict(statuses)};"
        f" succeeded {dict(succeeded)}"
    )
    assert not bugs, "\n".join(sorted(set(bugs))[:20])

    listed = await target.client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
    for item in listed.items:
        if item.id != target.pod_id:
            await target.client.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(item.id))
    containers = await target.client.runtime.list_containers(cri.ListContainersRequest())
    for container in containers.containers:
        await target.client.runtime.remove_container(cri.RemoveContainerRequest(container.id))

    async def as_before() -> bool:
        return await held(target) == before

    # Removal is synchronous, but containerd's GC of released content is not.
    if not await wait_for(as_before, timeout=20):
        after = await held(target)
        changed = {
            kind: {"added": after[kind] - items, "gone": items - after[kind]}
            for kind, items in before.items()
            if after[kind] != items
        }
        raise AssertionError(f"containerd or the host changed: {changed}")
