"""Branches of the container and pod lifecycle no other test takes: the stop
signal an image or a request asks for, a name clash, creating or starting in a pod that is
not ready, the pause process dying, and the pod's /etc/hosts and hostname."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import pytest_asyncio
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .conftest import CriClient, pull_into, wait_for
from .pods import make_container, pod_config, wait_exited
from .support.catalog import ServedCatalog

LOOP = "while :; do sleep 0.1; done"


async def logged(pods: CriClient, container_id: str, text: bytes) -> bool:
    status = (await pods.runtime.container_status(cri.ContainerStatusRequest(container_id))).status
    assert status is not None
    path = Path(status.log_path)
    return path.exists() and any(
        line.endswith(b" " + text) for line in path.read_bytes().split(b"\n")
    )


async def test_stop_signal_from_the_request(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    """StopContainer sends the request's stop signal (SIGUSR1 here), not SIGTERM:
    the shell, pid 1 without a TERM handler, would ignore SIGTERM and end 137."""
    container = await make_container(
        pods,
        pod,
        busybox,
        ["sh", "-c", f"trap 'exit 42' USR1; echo trapped; {LOOP}"],
        name="usr1",
        stop_signal=cri.Signal.SIGUSR1,
    )
    assert await wait_for(lambda: logged(pods, container, b"trapped"), timeout=30)
    await pods.runtime.stop_container(cri.StopContainerRequest(container, timeout=30))
    assert (await wait_exited(pods, container)).exit_code == 42


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def stopsignal_image(pod_shim: Shim, pod_images: ServedCatalog) -> str:
    """busybox with STOPSIGNAL SIGUSR2, its command logging the signal it gets."""
    return await pull_into(pod_shim, pod_images.local("test/stopsignal:1"))


@pytest.mark.parametrize(
    ("requested", "caught", "exit_code"),
    [
        pytest.param(cri.Signal.RUNTIME_DEFAULT, b"caught USR2", 12, id="image"),
        pytest.param(cri.Signal.SIGUSR1, b"caught USR1", 10, id="request-over-image"),
    ],
)
async def test_stop_signal_from_the_image(
    pods: CriClient,
    pod: tuple[str, cri.PodSandboxConfig],
    stopsignal_image: str,
    requested: cri.Signal,
    caught: bytes,
    exit_code: int,
) -> None:
    """Without a stop signal in the request StopContainer sends the image's
    STOPSIGNAL (SIGUSR2, not SIGTERM); a request's stop signal wins over it. The
    container's own trap says which signal arrived, in its log and exit code."""
    container = await make_container(
        pods, pod, stopsignal_image, [], name="stopsig", stop_signal=requested
    )
    assert await wait_for(lambda: logged(pods, container, b"ready"), timeout=30)
    await pods.runtime.stop_container(cri.StopContainerRequest(container, timeout=30))
    status = await wait_exited(pods, container)
    assert await logged(pods, container, caught)
    assert status.exit_code == exit_code


async def test_name_clash_with_a_started_container(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    first = await make_container(pods, pod, busybox, ["sleep", "3600"], name="dup")
    with pytest.raises(GRPCError) as caught:
        await make_container(pods, pod, busybox, ["sleep", "3600"], name="dup")
    assert caught.value.status is Status.FAILED_PRECONDITION  # containerd's code
    assert "dup" in (caught.value.message or "") and first in (caught.value.message or "")
    # Removing the first frees the name.
    await pods.runtime.remove_container(cri.RemoveContainerRequest(first))
    second = await make_container(pods, pod, busybox, ["sleep", "3600"], name="dup")
    assert second != first


async def test_create_and_start_in_a_pod_that_is_not_ready(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    created = await make_container(pods, pod, busybox, ["true"], name="late", start=False)
    await pods.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod[0]))
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.start_container(cri.StartContainerRequest(created))
    assert caught.value.status is Status.FAILED_PRECONDITION
    assert "not ready" in (caught.value.message or "")
    with pytest.raises(GRPCError) as caught:
        await make_container(pods, pod, busybox, ["true"], name="later", start=False)
    assert caught.value.status is Status.FAILED_PRECONDITION
    assert "not ready" in (caught.value.message or "")


async def test_pause_process_dying_makes_the_pod_not_ready(pods: CriClient) -> None:
    reply = await pods.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod_config("pausedies"))
    )
    try:
        verbose = await pods.runtime.pod_sandbox_status(
            cri.PodSandboxStatusRequest(reply.pod_sandbox_id, verbose=True)
        )
        pid = json.loads(verbose.info["info"])["pid"]
        assert isinstance(pid, int) and pid > 0
        os.kill(pid, signal.SIGKILL)

        async def not_ready() -> bool:
            status = (
                await pods.runtime.pod_sandbox_status(
                    cri.PodSandboxStatusRequest(reply.pod_sandbox_id)
                )
            ).status
            assert status is not None
            return status.state == cri.PodSandboxState.SANDBOX_NOTREADY

        assert await wait_for(not_ready, timeout=30)
        listed = await pods.runtime.list_pod_sandbox(
            cri.ListPodSandboxRequest(cri.PodSandboxFilter(id=reply.pod_sandbox_id))
        )
        assert [p.state for p in listed.items] == [cri.PodSandboxState.SANDBOX_NOTREADY]
    finally:
        await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(reply.pod_sandbox_id))


async def test_hostname_and_hosts_files(pods: CriClient, busybox: str, tmp_path: Path) -> None:
    """As containerd's CRI writes them: /etc/hostname holds the pod's hostname and
    a newline; /etc/hosts is a copy of the node's."""
    config = pod_config("files", hostname="web-0", log_directory=str(tmp_path / "logs"))
    reply = await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    try:
        container = await make_container(
            pods, (reply.pod_sandbox_id, config), busybox, ["sleep", "3600"], name="files"
        )
        hostname = await pods.runtime.exec_sync(
            cri.ExecSyncRequest(container, cmd=["cat", "/etc/hostname"], timeout=10)
        )
        assert (hostname.exit_code, hostname.stdout) == (0, b"web-0\n")
        uname = await pods.runtime.exec_sync(
            cri.ExecSyncRequest(container, cmd=["hostname"], timeout=10)
        )
        assert uname.stdout == b"web-0\n"
        hosts = await pods.runtime.exec_sync(
            cri.ExecSyncRequest(container, cmd=["cat", "/etc/hosts"], timeout=10)
        )
        assert (hosts.exit_code, hosts.stdout) == (0, Path("/etc/hosts").read_bytes())
    finally:
        await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(reply.pod_sandbox_id))
