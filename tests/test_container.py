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
from cri_shim.containerd.embedded import EmbeddedContainerd
from cri_shim.containerd.runtime import TaskStatus, pack_json, unpack_json
from cri_shim.gen.containerd.services.tasks import v1 as tasks_v1
from cri_shim.gen.runtime import v1 as cri
from cri_shim.server import Shim

from .conftest import CriClient, wait_for
from .pods import make_container, pod_config, wait_exited

LOG_LINE = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z) (stdout|stderr) ([FP]) (.*)$")


def log_entries(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    entries = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        match = LOG_LINE.match(line)
        assert match, line
        entries.append((match.group(3), match.group(4), match.group(5)))
    return entries


async def logged(pods: CriClient, container_id: str, text: bytes) -> bool:
    """True once a line of the container's log is exactly `text`."""
    status = (await pods.runtime.container_status(cri.ContainerStatusRequest(container_id))).status
    assert status is not None
    path = Path(status.log_path)
    return path.exists() and any(entry[2] == text for entry in log_entries(path))


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
    pods: CriClient,
    pod: tuple[str, cri.PodSandboxConfig],
    busybox: str,
    pod_shim: Shim,
    containerd: EmbeddedContainerd,
) -> None:
    """What a SIGKILL between Tasks.Exec/Start and opening the exec's FIFOs
    leaves: the runc shim blocked opening them for writing. containerd 1.6's
    shim then stalls every task it serves (the pod's pause reads as UNKNOWN);
    2.x's keeps serving the others, but the exec's start still hangs. Start-up
    releases it."""
    manager = pod_shim.container_manager
    assert manager is not None
    container = await make_container(pods, pod, busybox, ["sleep", "1000"], name="abandon")
    directory = manager.io_dir(container) / "exec" / "exec-abandoned"
    directory.mkdir(parents=True)
    for name in ("stdout", "stderr"):
        make_fifo(directory / name)
    client = pod_shim.client
    assert client is not None
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

        async def shim_stuck() -> bool:
            return await pause_status() == TaskStatus.UNKNOWN

        if containerd.major < 2:
            assert await wait_for(shim_stuck, timeout=30)  # the whole runc shim is stuck
        else:
            assert await pause_status() == TaskStatus.RUNNING  # only the exec waits
        assert not start.done()

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
        ["sh", "-c", "trap 'exit 7' TERM; echo trapped; while :; do sleep 0.1; done"],
        name="graceful",
    )
    stubborn = await make_container(
        pods,
        pod,
        busybox,
        ["sh", "-c", "trap '' TERM; echo trapped; while :; do sleep 0.1; done"],
        name="stubborn",
    )
    # The traps are set once each says so.
    assert await wait_for(lambda: logged(pods, graceful, b"trapped"), timeout=30)
    assert await wait_for(lambda: logged(pods, stubborn, b"trapped"), timeout=30)
    await pods.runtime.stop_container(cri.StopContainerRequest(graceful, timeout=10))
    assert (await wait_exited(pods, graceful, 10)).exit_code == 7
    started = time.monotonic()
    await pods.runtime.stop_container(cri.StopContainerRequest(stubborn, timeout=1))
    # Killed after its 1 s grace, not after the 10 s a missed SIGKILL would take.
    assert 1 <= time.monotonic() - started < 9
    assert (await wait_exited(pods, stubborn, 10)).exit_code == 137


async def test_cri_log_format_with_partial_and_long_lines(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    script = "echo out1; echo err1 >&2; head -c 20000 /dev/zero | tr '\\0' a; echo; printf tail"
    container = await make_container(pods, pod, busybox, ["sh", "-c", script], name="logger")
    status = await wait_exited(pods, container)
    # No wait: an exited container's log is complete, as under containerd's CRI
    # (the exit is recorded only after its output is copied).
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
    assert await wait_for(lambda: logged(pods, container, b"line3"), timeout=30)
    log_path.rename(log_path.with_suffix(".1"))
    await pods.runtime.reopen_container_log(cri.ReopenContainerLogRequest(container))
    assert log_path.exists()

    async def new_log_written() -> bool:
        return len(log_entries(log_path)) >= 3

    assert await wait_for(new_log_written, timeout=30)
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
    assert time.monotonic() - started < 15  # the 1 s timeout, not the 30 s child


async def test_run_as_user_and_events(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str, pod_shim: Shim
) -> None:
    seen: list[tuple[str, cri.ContainerEventType]] = []

    async def watch() -> None:
        async for event in pods.runtime.get_container_events(cri.GetEventsRequest()):
            seen.append((event.container_id, event.container_event_type))

    subscribed = pod_shim.container_events.subscribers
    watcher = asyncio.create_task(watch())

    async def watching() -> bool:
        return pod_shim.container_events.subscribers > subscribed

    assert await wait_for(watching, timeout=30)
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

    async def deleted_seen() -> bool:
        return (container, cri.ContainerEventType.CONTAINER_DELETED_EVENT) in seen

    assert await wait_for(deleted_seen, timeout=30)
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


async def test_exited_is_reported_only_once_the_log_is_complete(
    pods: CriClient, pod: tuple[str, cri.PodSandboxConfig], busybox: str
) -> None:
    """containerd's CRI reports EXITED after its task delete waited for the IO, so
    a client that reads the log as soon as it sees EXITED (critest's log spec)
    finds every line. Polled without pause, as a fast client would."""
    log_dir = Path(pod[1].log_directory)
    for attempt in range(3):
        name = f"talker{attempt}"
        container = await make_container(
            pods, pod, busybox, ["sh", "-c", "seq 1 30000; echo done"], name=name
        )
        while True:
            reply = await pods.runtime.container_status(cri.ContainerStatusRequest(container))
            assert reply.status is not None
            if reply.status.state == cri.ContainerState.CONTAINER_EXITED:
                break
        lines = (log_dir / f"{name}.log").read_text().splitlines()
        assert len(lines) == 30001, (attempt, len(lines), lines[-1:])
        assert lines[-1].endswith(" stdout F done")


async def test_events_carry_the_whole_pod(
    pods: CriClient, pod_shim: Shim, busybox: str, tmp_path: Path
) -> None:
    """As containerd sends them, and kubelet's evented PLEG needs them: every
    event carries the pod's sandbox status and all its containers' statuses,
    and the sandbox has events of its own under its id."""
    Event = tuple[str, cri.ContainerEventType, str, list[str]]
    seen: list[Event] = []

    async def watch() -> None:
        async for event in pods.runtime.get_container_events(cri.GetEventsRequest()):
            pod_status = event.pod_sandbox_status
            seen.append(
                (
                    event.container_id,
                    event.container_event_type,
                    pod_status.id if pod_status and pod_status.metadata else "",
                    sorted(c.id for c in event.containers_statuses),
                )
            )

    watcher = asyncio.create_task(watch())
    try:
        subscribers = pod_shim.container_events.subscribers

        async def subscribed() -> bool:
            return pod_shim.container_events.subscribers > subscribers

        assert await wait_for(subscribed, 5)
        config = pod_config("evented", log_directory=str(tmp_path))
        pod_id = (
            await pods.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
        ).pod_sandbox_id
        first = await make_container(pods, (pod_id, config), busybox, ["sleep", "60"], name="a")
        second = await make_container(pods, (pod_id, config), busybox, ["true"], name="b")
        await wait_exited(pods, second)
        await pods.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_id))
        await pods.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_id))

        async def sandbox_deleted() -> bool:
            return (pod_id, cri.ContainerEventType.CONTAINER_DELETED_EVENT) in [
                (e[0], e[1]) for e in seen
            ]

        assert await wait_for(sandbox_deleted, 10)
    finally:
        watcher.cancel()
    assert all(e[2] == pod_id for e in seen if e[0] in (pod_id, first, second)), seen
    kinds = [e[1] for e in seen if e[0] == pod_id]
    assert kinds == [
        cri.ContainerEventType.CONTAINER_CREATED_EVENT,
        cri.ContainerEventType.CONTAINER_STARTED_EVENT,
        cri.ContainerEventType.CONTAINER_STOPPED_EVENT,
        cri.ContainerEventType.CONTAINER_DELETED_EVENT,
    ]
    started_b = next(
        e for e in seen if e[0] == second and e[1] == cri.ContainerEventType.CONTAINER_STARTED_EVENT
    )
    assert started_b[3] == sorted([first, second])  # all the pod's containers
