"""Containers end to end on real containerd + runc: lifecycle, CRI logs,
ExecSync, events. Images come from the project's local registry."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from cri_shim.container.exec_sync import PROCESS_TYPE_URL, process_spec
from cri_shim.container.io import make_fifo
from cri_shim.container.lifecycle import METADATA_EXTENSION
from cri_shim.containerd.runtime import TaskStatus, pack_json, unpack_json
from cri_shim.gen.containerd.services.tasks import v1 as tasks_v1
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .conftest import CriClient, wait_for
from .pods import make_container, wait_exited

LOG_LINE = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z) (stdout|stderr) ([FP]) (.*)$")


def log_entries(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    entries = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        match = LOG_LINE.match(line)
        assert match, line
        entries.append((match.group(3), match.group(4), match.group(5)))
    return entries


async def test_lifecycle_exit_codes_and_reasons(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    ok = await make_container(pods, pod, busybox, ["sh", "-c", "exit 0"], name="ok")
    bad = await make_container(pods, pod, busybox, ["sh", "-c", "exit 3"], name="bad")
    ok_status, bad_status = await wait_exited(pods, ok), await wait_exited(pods, bad)
    assert (ok_status.exit_code, ok_status.reason) == (0, "Completed")
    assert (bad_status.exit_code, bad_status.reason) == (3, "Error")
    assert bad_status.started_at <= bad_status.finished_at
    assert bad_status.image_id.startswith("sha256:")
    listed = await pods.runtime.list_containers(
        cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod[0]))
    )
    assert {c.id for c in listed.containers} >= {ok, bad}
    for _ in range(2):
        await pods.runtime.stop_container(cri.StopContainerRequest(ok, timeout=1))
        await pods.runtime.remove_container(cri.RemoveContainerRequest(ok))
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.container_status(cri.ContainerStatusRequest(ok))
    assert caught.value.status is Status.NOT_FOUND


async def test_exit_is_recorded_in_containerd_before_the_task_is_deleted(
    pods: CriClient,
    pod: tuple[str, cri.PodSandboxConfig],
    busybox: str,
    pod_shim: Shim,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shim killed right after deleting an exited task must still find the exit
    code on restart, so the record has to be written first."""
    manager = pod_shim.container_manager
    assert manager is not None
    ops = manager.ops
    recorded: dict[str, object] = {}
    delete_task = ops.delete_task

    async def checking_delete_task(container_id: str) -> None:
        record = await ops.get_container(container_id)
        if record is not None:
            data = unpack_json(record.extensions.get(METADATA_EXTENSION))
            recorded[container_id] = data.get("exitCode") if "finishedAt" in data else None
        await delete_task(container_id)

    monkeypatch.setattr(ops, "delete_task", checking_delete_task)
    quitter = await make_container(pods, pod, busybox, ["sh", "-c", "exit 7"], name="quitter")
    status = await wait_exited(pods, quitter)
    assert status.exit_code == 7

    async def task_deleted() -> bool:  # the exit is visible before the delete happens
        return quitter in recorded

    assert await wait_for(task_deleted, timeout=30)
    assert recorded[quitter] == 7


async def test_an_exec_abandoned_by_a_killed_shim_is_released_at_start_up(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str, pod_shim: Shim
) -> None:
    """What a SIGKILL between Tasks.Exec/Start and opening the exec's FIFOs
    leaves: the runc shim blocked opening them for writing, which stalls every
    task it serves (the pod's pause reads as UNKNOWN). Start-up releases it."""
    manager = pod_shim.container_manager
    assert manager is not None
    container = await make_container(pods, pod, busybox, ["sleep", "1000"], name="abandon")
    directory = manager.io_dir(container) / "exec" / "exec-abandoned"
    directory.mkdir(parents=True)
    for name in ("stdout", "stderr"):
        make_fifo(directory / name)
    client = manager.ops.client
    spec = await manager.load_spec(container)
    await client.call(
        "Tasks.Exec",
        client.tasks.exec(
            tasks_v1.ExecProcessRequest(
                container_id=container,
                exec_id="exec-abandoned",
                stdout=str(directory / "stdout"),
                stderr=str(directory / "stderr"),
                spec=pack_json(PROCESS_TYPE_URL, process_spec(spec, ["echo", "lost"])),
            )
        ),
    )
    start = asyncio.create_task(manager.ops.start_task(container, "exec-abandoned"))
    try:

        async def pause_status() -> int:
            reply = await client.tasks.get(tasks_v1.GetRequest(container_id=pod[0]))
            assert reply.process is not None
            return int(reply.process.status)

        await asyncio.sleep(1.0)
        assert not start.done()
        assert await pause_status() == TaskStatus.UNKNOWN  # the whole runc shim is stuck

        assert await manager.release_abandoned_execs() == 1
        await asyncio.wait_for(start, 10)
        assert await pause_status() == TaskStatus.RUNNING
        gone = await wait_for(lambda: _absent(directory), timeout=15)
        assert gone
    finally:
        start.cancel()


async def _absent(path: Path) -> bool:
    return not path.exists()


async def test_stop_sends_sigterm_then_kills(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    graceful = await make_container(
        pods,
        pod,
        busybox,
        ["sh", "-c", "trap 'exit 7' TERM; while :; do sleep 0.1; done"],
        name="graceful",
    )
    stubborn = await make_container(
        pods,
        pod,
        busybox,
        ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"],
        name="stubborn",
    )
    await asyncio.sleep(0.5)
    await pods.runtime.stop_container(cri.StopContainerRequest(graceful, timeout=10))
    assert (await wait_exited(pods, graceful, 1)).exit_code == 7
    started = time.monotonic()
    await pods.runtime.stop_container(cri.StopContainerRequest(stubborn, timeout=1))
    assert time.monotonic() - started < 5
    assert (await wait_exited(pods, stubborn, 1)).exit_code == 137


async def test_cri_log_format_with_partial_and_long_lines(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    script = "echo out1; echo err1 >&2; head -c 20000 /dev/zero | tr '\\0' a; echo; printf tail"
    container = await make_container(pods, pod, busybox, ["sh", "-c", script], name="logger")
    status = await wait_exited(pods, container)
    await asyncio.sleep(0.2)
    entries = log_entries(Path(status.log_path))
    assert (b"stdout", b"F", b"out1") in entries
    assert (b"stderr", b"F", b"err1") in entries
    stdout = [e for e in entries if e[0] == b"stdout"]
    long_parts = [e for e in stdout if set(e[2]) == {ord("a")}]
    assert [e[1] for e in long_parts] == [b"P", b"F"]
    assert sum(len(e[2]) for e in long_parts) == 20000
    assert stdout[-1] == (b"stdout", b"P", b"tail")


async def test_reopen_container_log_after_rotation(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    container = await make_container(
        pods,
        pod,
        busybox,
        ["sh", "-c", "i=0; while :; do echo line$i; i=$((i+1)); sleep 0.05; done"],
        name="rotating",
    )
    status = (await pods.runtime.container_status(cri.ContainerStatusRequest(container))).status
    assert status is not None
    log_path = Path(status.log_path)
    await asyncio.sleep(0.5)
    log_path.rename(log_path.with_suffix(".1"))
    await pods.runtime.reopen_container_log(cri.ReopenContainerLogRequest(container))
    await asyncio.sleep(0.5)
    assert log_path.exists() and log_entries(log_path)
    await pods.runtime.stop_container(cri.StopContainerRequest(container, timeout=0))
    old = [e[2] for e in log_entries(log_path.with_suffix(".1"))]
    new = [e[2] for e in log_entries(log_path)]
    numbers = [int(line[4:]) for line in old + new]
    assert numbers == list(range(len(numbers)))  # nothing lost or repeated across the rotation
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.reopen_container_log(cri.ReopenContainerLogRequest(container))
    assert caught.value.status is Status.FAILED_PRECONDITION


async def test_exec_sync_output_exit_code_and_hard_timeout(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    container = await make_container(pods, pod, busybox, ["sleep", "3600"], name="exec")
    reply = await pods.runtime.exec_sync(
        cri.ExecSyncRequest(
            container, cmd=["sh", "-c", "echo hi; echo oops >&2; exit 4"], timeout=10
        )
    )
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"hi\n", b"oops\n", 4)
    started = time.monotonic()
    with pytest.raises(GRPCError) as caught:
        # The background child keeps stdout open long after the shell is killed.
        await pods.runtime.exec_sync(
            cri.ExecSyncRequest(container, cmd=["sh", "-c", "sleep 30 & sleep 30"], timeout=1)
        )
    assert caught.value.status is Status.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


async def test_run_as_user_and_events(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    seen: list[tuple[str, cri.ContainerEventType]] = []

    async def watch() -> None:
        async for event in pods.runtime.get_container_events(cri.GetEventsRequest()):
            seen.append((event.container_id, event.container_event_type))

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    context = cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(1234))
    container = await make_container(
        pods,
        pod,
        busybox,
        ["sh", "-c", "id -u"],
        name="user",
        linux=cri.LinuxContainerConfig(security_context=context),
    )
    status = await wait_exited(pods, container)
    await pods.runtime.remove_container(cri.RemoveContainerRequest(container))
    await asyncio.sleep(0.3)
    watcher.cancel()
    assert [e[2] for e in log_entries(Path(status.log_path))] == [b"1234"]
    kinds = [kind for cid, kind in seen if cid == container]
    assert kinds == [
        cri.ContainerEventType.CONTAINER_CREATED_EVENT,
        cri.ContainerEventType.CONTAINER_STARTED_EVENT,
        cri.ContainerEventType.CONTAINER_STOPPED_EVENT,
        cri.ContainerEventType.CONTAINER_DELETED_EVENT,
    ]


async def test_bad_requests(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    with pytest.raises(GRPCError) as caught:
        await make_container(
            pods, pod, busybox, ["true"], name="escape", start=False, log_path="../../etc/x"
        )
    assert caught.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(GRPCError) as caught:
        await make_container(
            pods, pod, "127.0.0.1:1/never/pulled:1", ["true"], name="noimage", start=False
        )
    assert caught.value.status is Status.NOT_FOUND
    with pytest.raises(GRPCError) as caught:
        await pods.runtime.create_container(
            cri.CreateContainerRequest(
                pod_sandbox_id="f" * 64,
                config=cri.ContainerConfig(
                    metadata=cri.ContainerMetadata(name="x"), image=cri.ImageSpec(image=busybox)
                ),
            )
        )
    assert caught.value.status is Status.NOT_FOUND
    await pods.runtime.stop_container(cri.StopContainerRequest("e" * 64))
    await pods.runtime.remove_container(cri.RemoveContainerRequest("e" * 64))
