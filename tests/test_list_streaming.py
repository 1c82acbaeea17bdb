"""The Stream* list RPCs (kubelet's CRIListStreaming): the batches of a stream,
joined, are the List* answer; filters work as in List*; no message exceeds the
configured item count or byte budget; an empty result streams no message at
all (containerd's behaviour: the stream just ends).

Containers are created, not started, where running is not needed (hundreds
of runc tasks would take minutes on a small machine).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest_asyncio
from grpclib.const import Cardinality

from cri_shim.containerd.runtime import WireReply as RawReply
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim
from cri_shim.store.encoded import BatchLimits, batches

from .conftest import CriClient
from .pods import make_container, pod_config

MANY = 300


async def raw_stream(client: CriClient, service: str, method: str, request: Any) -> list[bytes]:
    async with client.channel.request(
        f"/runtime.v1.{service}/{method}",
        Cardinality.UNARY_STREAM,
        type(request),
        RawReply,
    ) as stream:
        await stream.send_message(request, end=True)
        return [reply.data async for reply in stream]


def item_count(body: bytes, response: type[Any]) -> int:
    return len(next(iter(response().parse(body).to_dict().values()), []))


@pytest_asyncio.fixture(loop_scope="session")
async def narrow(pod_shim: Shim) -> AsyncIterator[BatchLimits]:
    """The live shim's batch bounds, to narrow in a test; restored afterwards."""
    limits = pod_shim.batch_limits
    saved = (limits.max_items, limits.max_bytes)
    yield limits
    limits.max_items, limits.max_bytes = saved


@pytest_asyncio.fixture(loop_scope="session")
async def many(pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str) -> list[str]:
    """MANY created containers in one pod, every third labelled tier=db."""
    sem = asyncio.Semaphore(8)

    async def one(index: int) -> str:
        async with sem:
            return await make_container(
                pods,
                pod,
                busybox,
                ["sleep", "3600"],
                name=f"c{index}",
                start=False,
                labels={"tier": "db" if index % 3 == 0 else "web"},
            )

    return await asyncio.gather(*(one(i) for i in range(MANY)))


async def test_stream_containers_equals_list_in_bounded_batches(
    pods: CriClient, pod_shim: Shim, many: list[str], narrow: BatchLimits
) -> None:
    filters: list[cri.ContainerFilter | None] = [
        None,
        cri.ContainerFilter(label_selector={"tier": "db"}),
        cri.ContainerFilter(
            state=cri.ContainerStateValue(state=cri.ContainerState.CONTAINER_CREATED)
        ),
        cri.ContainerFilter(id=many[7][:12]),
        cri.ContainerFilter(pod_sandbox_id=pod_shim.containers.by_id.get(many[0]).sandbox_id),
    ]
    for max_items, max_bytes in ((5000, 15 << 20), (7, 15 << 20), (5000, 4096)):
        narrow.max_items, narrow.max_bytes = max_items, max_bytes
        for wanted in filters:
            listed = bytes(
                await pods.runtime.list_containers(cri.ListContainersRequest(filter=wanted))
            )
            bodies = await raw_stream(
                pods, "RuntimeService", "StreamContainers", cri.StreamContainersRequest(wanted)
            )
            assert b"".join(bodies) == listed
            assert all(len(body) <= max_bytes for body in bodies)
            counts = [item_count(b, cri.StreamContainersResponse) for b in bodies]
            assert all(0 < n <= max_items for n in counts)
            if wanted is None:
                assert sum(counts) == MANY
                if max_items == 7:
                    assert len(bodies) == -(-MANY // 7)
                if max_bytes == 4096:
                    assert len(bodies) > 1
    # The decoding client sees the same containers, batch after batch.
    decoded = [
        c.id
        async for batch in pods.runtime.stream_containers(cri.StreamContainersRequest())
        for c in batch.containers
    ]
    assert sorted(decoded) == sorted(many)


async def test_empty_results_stream_no_message(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig]
) -> None:
    nothing = "f" * 64
    for service, method, request in (
        (
            "RuntimeService",
            "StreamContainers",
            cri.StreamContainersRequest(cri.ContainerFilter(id=nothing)),
        ),
        (
            "RuntimeService",
            "StreamPodSandboxes",
            cri.StreamPodSandboxesRequest(cri.PodSandboxFilter(id=nothing)),
        ),
        (
            "RuntimeService",
            "StreamContainerStats",
            cri.StreamContainerStatsRequest(cri.ContainerStatsFilter(id=nothing)),
        ),
        (
            "RuntimeService",
            "StreamPodSandboxStats",
            cri.StreamPodSandboxStatsRequest(cri.PodSandboxStatsFilter(id=nothing)),
        ),
        (
            "ImageService",
            "StreamImages",
            cri.StreamImagesRequest(cri.ImageFilter(cri.ImageSpec(image="no/such:image"))),
        ),
    ):
        assert await raw_stream(pods, service, method, request) == [], method
    # Pod metrics have no filter: with no ready pod there are none.
    await pods.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod[0]))
    metrics_request = cri.StreamPodSandboxMetricsRequest()
    assert (
        await raw_stream(pods, "RuntimeService", "StreamPodSandboxMetrics", metrics_request) == []
    )


async def test_stream_pod_sandboxes_equals_list(pods: CriClient, narrow: BatchLimits) -> None:
    ids = []
    for index in range(5):
        config = pod_config(f"sp{index}", labels={"group": "odd" if index % 2 else "even"})
        reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
        ids.append(reply.pod_sandbox_id)
    await pods.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(ids[0]))
    narrow.max_items = 2
    for wanted in (
        None,
        cri.PodSandboxFilter(label_selector={"group": "odd"}),
        cri.PodSandboxFilter(
            state=cri.PodSandboxStateValue(state=cri.PodSandboxState.SANDBOX_READY)
        ),
        cri.PodSandboxFilter(id=ids[3][:10]),
    ):
        listed = bytes(await pods.runtime.list_pod_sandbox(cri.ListPodSandboxRequest(wanted)))
        bodies = await raw_stream(
            pods, "RuntimeService", "StreamPodSandboxes", cri.StreamPodSandboxesRequest(wanted)
        )
        assert b"".join(bodies) == listed
        counts = [item_count(b, cri.StreamPodSandboxesResponse) for b in bodies]
        assert all(0 < n <= 2 for n in counts)
    everything = [
        p.id
        async for batch in pods.runtime.stream_pod_sandboxes(cri.StreamPodSandboxesRequest())
        for p in batch.pod_sandboxes
    ]
    assert set(ids) <= set(everything)


async def test_stream_stats_and_images_match_their_lists(
    pods: CriClient,
    pod: tuple[str, cri.PodSandboxConfig],
    busybox: str,
    narrow: BatchLimits,
) -> None:
    running = [
        await make_container(pods, pod, busybox, ["sleep", "3600"], name=f"r{i}") for i in range(3)
    ]
    narrow.max_items = 1
    container_stats = [
        s
        async for batch in pods.runtime.stream_container_stats(cri.StreamContainerStatsRequest())
        for s in batch.container_stats
    ]
    listed = await pods.runtime.list_container_stats(cri.ListContainerStatsRequest())
    # Figures move between two calls; which containers, and their attributes, do not.
    assert sorted(
        (s.attributes.id, bytes(s.attributes)) for s in container_stats if s.attributes
    ) == sorted((s.attributes.id, bytes(s.attributes)) for s in listed.stats if s.attributes)
    assert set(running) <= {s.attributes.id for s in container_stats if s.attributes}
    one = await raw_stream(
        pods,
        "RuntimeService",
        "StreamContainerStats",
        cri.StreamContainerStatsRequest(cri.ContainerStatsFilter(id=running[1])),
    )
    assert len(one) == 1
    attributes = cri.StreamContainerStatsResponse().parse(one[0]).container_stats[0].attributes
    assert attributes is not None and attributes.id == running[1]

    pod_stats = [
        s
        async for batch in pods.runtime.stream_pod_sandbox_stats(
            cri.StreamPodSandboxStatsRequest(cri.PodSandboxStatsFilter(id=pod[0]))
        )
        for s in batch.pod_sandbox_stats
    ]
    assert [s.attributes.id for s in pod_stats if s.attributes] == [pod[0]]

    narrow.max_items = 5000
    for wanted in (None, cri.ImageFilter(cri.ImageSpec(image=busybox))):
        listed_images = bytes(await pods.image.list_images(cri.ListImagesRequest(wanted)))
        bodies = await raw_stream(
            pods, "ImageService", "StreamImages", cri.StreamImagesRequest(wanted)
        )
        assert b"".join(bodies) == listed_images
        assert bodies
    for container_id in running:
        await pods.runtime.stop_container(cri.StopContainerRequest(container_id, 0))


def frames(sizes: list[int]) -> Iterator[bytes]:
    return (bytes([index % 256]) * size for index, size in enumerate(sizes))


def test_batches_bounds() -> None:
    """An item over the byte budget goes alone; the rest fill up to either bound."""
    sizes = [10, 10, 10, 50, 200, 10, 10, 10, 10, 10]
    out = list(batches(frames(sizes), BatchLimits(max_items=3, max_bytes=60)))
    assert b"".join(out) == b"".join(frames(sizes))
    assert [len(b) for b in out] == [30, 50, 200, 30, 20]
    assert list(batches(iter(()), BatchLimits())) == []
