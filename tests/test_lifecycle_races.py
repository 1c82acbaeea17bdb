"""Container lifecycle races against the in-memory runtime (tests/fake_runtime.py):
the real ContainerManager, containerd played by dicts, each race made to
happen by holding one call at a gate. Milliseconds each; the same paths run
against real containerd in test_container.py and test_recovery.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest_asyncio

from cri_shim.container.events import ContainerEventBus
from cri_shim.container.lifecycle import ContainerEnvironment, ContainerManager
from cri_shim.gen.containerd.services.containers import v1 as containers_v1
from cri_shim.gen.runtime import v1 as cri
from cri_shim.images.store import ImageStore
from cri_shim.store.containers import Container, ContainerState, ContainerStore
from cri_shim.store.sandboxes import Sandbox, SandboxState, SandboxStore

from .fake_runtime import FakeRuntime

SIGKILL_EXIT = 137


class RecordingBus(ContainerEventBus):
    """Keeps every event published, for counting."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[cri.ContainerEventResponse] = []

    def publish_for(self, container_id: str, sandbox_id: str, kind: cri.ContainerEventType) -> None:
        # Recorded here: the bus builds an event only for a subscriber.
        self.published.append(
            cri.ContainerEventResponse(container_id=container_id, container_event_type=kind)
        )
        super().publish_for(container_id, sandbox_id, kind)


@dataclass
class World:
    fake: FakeRuntime
    manager: ContainerManager
    containers: ContainerStore
    sandbox: Sandbox
    logs: Path
    bus: RecordingBus

    def created(self, name: str = "app") -> Container:
        """A container as CreateContainer leaves it (record, containerd container, snapshot)."""
        container = Container(
            id=name * (64 // len(name)) + "0" * (64 % len(name)),
            name=f"pod_ns_uid_{name}_0",
            sandbox_id=self.sandbox.id,
            config=cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name)),
            image_ref="busybox:latest",
            image_id="sha256:" + "1" * 64,
            image_repo_ref="busybox@sha256:" + "2" * 64,
            created_at=1,
            log_path=str(self.logs / f"{name}.log"),
        )
        container.runtime.spec = {"process": {"args": ["sleep", "1"]}, "linux": {}}
        self.containers.add(container)
        self.containers.names.reserve(container.name, container.id)
        self.fake.containers[container.id] = containers_v1.Container(id=container.id)
        self.fake.snapshots.add(container.id)
        return container

    def leftovers(self) -> tuple[int, int, int, int]:
        """(records, containerd containers, snapshots, tasks) still there."""
        fake = self.fake
        return (
            len(self.containers.by_id),
            len(fake.containers),
            len(fake.snapshots),
            len(fake.tasks),
        )


@pytest_asyncio.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    fake = FakeRuntime()
    containers, sandboxes = ContainerStore(), SandboxStore()
    environment = ContainerEnvironment(
        state_dir=tmp_path / "state",
        sandbox_dirs_root=tmp_path / "sandboxes",
        cgroup_driver="cgroupfs",
        oom_score_adj_floor=None,
        seccomp_localhost_root=None,
        apparmor_available=False,
        recursive_readonly_supported=False,
    )
    bus = RecordingBus()
    manager = ContainerManager(containers, sandboxes, ImageStore(), fake, bus, environment)
    fake.on_exit = manager.on_task_exit
    sandbox = Sandbox(
        id="f" * 64,
        name="pod_ns_uid_0",
        config=cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="pod", uid="uid")),
        runtime_handler="runc",
        created_at=1,
        image_id="sha256:" + "3" * 64,
        state=SandboxState.READY,
    )
    sandboxes.add(sandbox)
    yield World(fake, manager, containers, sandbox, tmp_path / "logs", bus)
    await fake.events_delivered()


async def test_exit_before_start_returns_is_recorded_once_start_completes(world: World) -> None:
    container = world.created()
    world.fake.exit_on_start = 3  # the process dies before Tasks.Start answers
    await world.manager.start(container)
    await world.fake.events_delivered()
    assert container.state is ContainerState.EXITED
    assert (container.exit_code, container.reason) == (3, "Error")
    assert container.started_at <= container.finished_at
    assert container.runtime.io is None and container.runtime.early_exit is None
    assert container.id not in world.fake.tasks  # the exit record deleted the task
    await world.manager.remove(container)
    assert world.leftovers() == (0, 0, 0, 0)


async def test_stop_while_start_is_creating_the_task(world: World) -> None:
    container = world.created()
    world.fake.hold("create_task")
    starting = asyncio.create_task(world.manager.start(container))
    await world.fake.entered("create_task")
    await world.manager.stop(container, 0)  # still CREATED: nothing to stop yet
    world.fake.release("create_task")
    await starting
    assert container.state is ContainerState.RUNNING
    await world.manager.stop(container, 0)
    assert (container.state, container.exit_code) == (ContainerState.EXITED, SIGKILL_EXIT)
    assert container.id not in world.fake.tasks


async def test_remove_while_start_is_in_flight_stops_what_the_start_started(
    world: World,
) -> None:
    """RemoveContainer arriving during StartContainer: the start wins the lock and
    runs the task; the remove must then stop it, not fail on a running task."""
    container = world.created()
    world.fake.hold("create_task")
    starting = asyncio.create_task(world.manager.start(container))
    await world.fake.entered("create_task")
    removing = asyncio.create_task(world.manager.remove(container))
    await asyncio.sleep(0)
    world.fake.release("create_task")
    await starting
    await removing
    await world.fake.events_delivered()
    assert world.leftovers() == (0, 0, 0, 0)


async def test_kill_during_remove_waits_for_the_exit_record(world: World) -> None:
    """StopContainer (a kill) while RemoveContainer is recording the exit: it
    returns only once the exit is recorded, and both calls succeed."""
    container = world.created()
    await world.manager.start(container)
    world.fake.hold("delete_task")
    removing = asyncio.create_task(world.manager.remove(container))
    await world.fake.entered("delete_task")
    stopping = asyncio.create_task(world.manager.stop(container, 10))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not stopping.done()  # the exit is not fully recorded yet
    world.fake.release("delete_task")
    await asyncio.gather(removing, stopping)
    assert (container.state, container.exit_code) == (ContainerState.EXITED, SIGKILL_EXIT)
    assert world.leftovers() == (0, 0, 0, 0)


async def test_exit_event_and_stop_record_one_exit(world: World) -> None:
    """The event stream and StopContainer's own Wait both see the exit: recorded once."""
    container = world.created()
    await world.manager.start(container)
    await world.manager.stop(container, 0)
    await world.fake.events_delivered()
    kinds = [event.container_event_type for event in world.bus.published]
    assert kinds.count(cri.ContainerEventType.CONTAINER_STOPPED_EVENT) == 1
    assert world.fake.calls.count("delete_task") == 1
