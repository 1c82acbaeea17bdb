"""kubelet retries: a RunPodSandbox or CreateContainer whose caller timed out
still completes on our side and is handed to the retry with the same name and
attempt, whether the retry arrives while it runs or after it finished."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .conftest import CriClient, wait_for
from .pods import pod_config
from .support.catalog import ServedCatalog

REUSED = ("retried run joins", "sandbox reused", "retried create joins", "container reused")


def reuse_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(REUSED)]


async def pods_named(client: CriClient, name: str) -> list[str]:
    listed = await client.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
    return [p.id for p in listed.items if p.metadata is not None and p.metadata.name == name]


@pytest.mark.parametrize("after_done", [False, True], ids=["retry-in-flight", "retry-after-done"])
async def test_timed_out_run_and_create_are_reused(
    pods: CriClient,
    pod_shim: Shim,
    pod_images: ServedCatalog,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    after_done: bool,
) -> None:
    image = pod_images.local("library/busybox:latest")
    await pods.image.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    name = f"retry-{int(after_done)}"
    config = pod_config(name, log_directory=str(tmp_path / "logs"))
    caplog.set_level(logging.INFO, logger="cri_shim")

    # Whichever side notices the deadline first: the client (TimeoutError) or the
    # server, which answers DEADLINE_EXCEEDED from the grpc-timeout header.
    with pytest.raises((TimeoutError, GRPCError)) as caught:
        await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config), timeout=0.05)
    if isinstance(caught.value, GRPCError):
        assert caught.value.status is Status.DEADLINE_EXCEEDED
    if after_done:

        async def run_done() -> bool:
            listed = await pods.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
            ready = cri.PodSandboxState.SANDBOX_READY
            return any(
                p.metadata and p.metadata.name == name and p.state == ready for p in listed.items
            )

        assert await wait_for(run_done, timeout=60)
    pod_id = (
        await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    ).pod_sandbox_id
    assert await pods_named(pods, name) == [pod_id]
    assert len(reuse_messages(caplog)) == 1

    request = cri.CreateContainerRequest(
        pod_sandbox_id=pod_id,
        config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="app", attempt=2),
            image=cri.ImageSpec(image=image),
            command=["sleep", "60"],
        ),
        sandbox_config=config,
    )
    # A create can beat even this deadline; then the retry finds it CREATED.
    with contextlib.suppress(TimeoutError, GRPCError):
        await pods.runtime.create_container(request, timeout=0.01)
    if after_done:

        async def create_done() -> bool:
            listed = await pods.runtime.list_containers(
                cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id))
            )
            return bool(listed.containers)

        assert await wait_for(create_done, timeout=60)
    container_id = (await pods.runtime.create_container(request)).container_id
    listed = await pods.runtime.list_containers(
        cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id))
    )
    assert [c.id for c in listed.containers] == [container_id]
    assert len(reuse_messages(caplog)) == 2
    await pods.runtime.start_container(cri.StartContainerRequest(container_id))
    await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))
